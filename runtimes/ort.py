"""ONNX Runtime backends: ort-cpu (and the GPU providers, which refuse to fall back to the CPU)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import threading
from pathlib import Path

import numpy as np

from edgecnn.errors import (
    InvalidInputError,
    InvalidModelError,
    MissingDependencyError,
    RuntimeUnavailableError,
)

from . import _deps
from ._deps import dist_version, has_module, ort_conflict, ort_distributions
from .base import Runtime, register


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "device", "the ort-* runtimes") from None
    if not os.environ.get("EDGECNN_DEBUG"):
        # ORT's own (coloured) log lines would precede edgecnn's one-line error on stderr: edgecnn
        # reports what failed itself. EDGECNN_DEBUG=1 shows them.
        ort.set_default_logger_severity(4)
    return ort


def _shape_of(value_info) -> tuple:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in value_info.shape)


class _OrtRuntime(Runtime):
    providers: tuple = ("CPUExecutionProvider",)

    @staticmethod
    def _probe(not_installed: str) -> tuple[object, list[str], str]:
        """(onnxruntime module, its providers, "") or (None, [], why it cannot be used). Never raises."""
        if not has_module("onnxruntime"):
            return None, [], not_installed
        conflict = ort_conflict()
        if conflict:
            return None, [], conflict
        try:
            ort = _import_ort()
            return ort, list(ort.get_available_providers()), ""
        except Exception as e:  # noqa: BLE001 - available() never raises
            return None, [], f"onnxruntime does not import: {e}"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ort, have, why = cls._probe("onnxruntime is not installed (pip install 'edgecnn[device]')")
        if ort is None:
            return False, why
        missing = [p for p in cls.providers if p not in have]
        if missing:
            return False, f"{missing[0]} is not in this onnxruntime build (has {', '.join(have)})"
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str | None]:
        return {d: dist_version(d) for d in (ort_distributions() or ["onnxruntime"])}

    @classmethod
    def devices_seen(cls) -> list[str]:
        try:
            return [p.replace("ExecutionProvider", "") for p in _import_ort().get_available_providers()]
        except Exception:  # noqa: BLE001 - a probe, never raises
            return []

    def session_options(self, ort):
        """Defaults measured on a 2-core AVX-512 EPYC, edgecnn-exported model (benchmarks/results/peers.md):
        - graph optimization ORT_ENABLE_ALL (ORT's default, pinned here): its NCHWc layout transform gives
          5,637 img/s at batch 64 against 4,804 with BASIC or EXTENDED;
        - threads: ORT's default (one per physical core) measured the same as an explicit 2 (5,725 vs
          5,637 img/s) and beats 1 thread (3,190); set ``threads`` to share the CPU with other work;
        - intra-op spinning stays on (ORT's default): batch-1 p50 0.16-0.20 ms with it, 0.23-0.24 ms
          without; batch-64 throughput is within noise either way. ``spinning=False`` turns it off
          (saves CPU while idle between calls).
        The biggest fp32 win is not a session option but the exact Elu/MaxPool swap at export
        (exporters/passes.py): 5,968 img/s against 3,122 for the same weights without it.
        """
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads is not None:
            so.intra_op_num_threads = self.threads
        if not self.options.get("spinning", True):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # 4 (fatal only): ORT's coloured log lines would precede edgecnn's one-line error (EDGECNN_DEBUG=1 shows them)
        so.log_severity_level = 0 if os.environ.get("EDGECNN_DEBUG") else 4
        return so

    def provider_list(self) -> list:
        return list(self.providers)

    def _model_source(self) -> str | bytes:
        """What InferenceSession opens: the file path (a subclass may give converted model bytes)."""
        return str(self.model_path)

    def _load_error(self, first_line: str) -> Exception:
        return InvalidModelError(f"{self.model_path}: ONNX Runtime cannot load it: {first_line}")

    def _load(self) -> None:
        ort = _import_ort()
        try:
            self.session = ort.InferenceSession(
                self._model_source(), sess_options=self.session_options(ort),
                providers=self.provider_list(),
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self._load_error(first) from None
        got = self.session.get_providers()
        if got[0] != self.providers[0]:
            raise RuntimeUnavailableError(
                f"{self.name}: asked for {self.providers[0]} but ONNX Runtime gave {got[0]}"
            )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InvalidModelError(
                f"{self.model_path}: expected one input and one output, got {len(inputs)} and {len(outputs)}"
            )
        dtype = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}.get(inputs[0].type, inputs[0].type)
        self._set_input_spec(_shape_of(inputs[0]), dtype)
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        try:
            self._metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        except UnicodeDecodeError:
            raise InvalidModelError(f"{self.model_path}: its metadata is not valid UTF-8") from None

    @property
    def device(self) -> str:
        return self.session.get_providers()[0].replace("ExecutionProvider", "")

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as e:  # noqa: BLE001 - a graph that loads but cannot run a valid input is invalid
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(f"{self.model_path}: ONNX Runtime cannot run it: {first[:200]}") from None

    def close(self) -> None:
        self.__dict__.pop("session", None)


@register("ort-cpu")
class OrtCpu(_OrtRuntime):
    """ONNX Runtime on the CPU execution provider."""

    providers = ("CPUExecutionProvider",)

    def _load(self) -> None:
        unknown = set(self.options) - {"spinning"}
        if unknown:
            raise InvalidInputError(f"{self.name}: unknown options {', '.join(sorted(unknown))} (known: spinning)")
        super()._load()


# ---------------------------------------------------------------------------------------- GPU providers
def _quiet_preload(ort) -> None:
    """onnxruntime.preload_dlls() (CUDA, cuDNN from the nvidia-* pip packages) when present, silenced."""
    if not hasattr(ort, "preload_dlls"):
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls()


def _loads(*names: str) -> bool:
    for n in names:
        try:
            ctypes.CDLL(n)
            return True
        except OSError:
            continue
    return False


def _cuda_major() -> str | None:
    try:
        from onnxruntime.capi import build_and_package_info as info

        return str(getattr(info, "cuda_version", "") or "").split(".")[0] or None
    except Exception:  # noqa: BLE001 - older builds do not say
        return None


def gpu_libraries_missing(ort, tensorrt: bool = False) -> str | None:
    """Why CUDA (and TensorRT) cannot run here, or None: driver, CUDA runtime, cuDNN, TensorRT."""
    if not _loads("libcuda.so.1", "nvcuda.dll"):
        return "no NVIDIA driver here (libcuda.so.1 not found): no usable GPU"
    _quiet_preload(ort)
    major = _cuda_major()
    majors = [major] if major else ["13", "12"]
    if not _loads(*[f"libcudart.so.{m}" for m in majors], *[f"cudart64_{m}.dll" for m in majors]):
        return f"CUDA runtime library not found (libcudart.so.{'/'.join(majors)}): pip install nvidia-cuda-runtime-cu{majors[0]}"
    if not _loads("libcudnn.so.9", "cudnn64_9.dll"):
        return f"cuDNN library not found (libcudnn.so.9): pip install nvidia-cudnn-cu{majors[0]}"
    if tensorrt and not _loads("libnvinfer.so.10", "nvinfer_10.dll"):
        return "TensorRT library not found (libnvinfer.so.10): pip install tensorrt"
    return None


class _OrtGpu(_OrtRuntime):
    """Shared by ort-cuda and ort-trt: no CPU fallback, provider checked, IO binding and CUDA graphs."""

    precisions = ("fp32", "fp16")
    _options = ("device_id", "io_binding", "cuda_graph", "cpu_fallback", "spinning")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        # No GPU at all is said first (cheap checks, nothing loaded), with what else is missing after it.
        visible, looked = _deps.nvidia_gpu_visible()
        want = cls.providers[0]
        why = ""
        ort, have, why = cls._probe("onnxruntime-gpu is not installed (pip install 'edgecnn[gpu]')")
        if ort is not None and want not in have:
            dists = _deps.ort_distributions()
            if "onnxruntime-gpu" not in dists:
                found = ", ".join(f"{d} {_deps.dist_version(d)}" for d in dists) or "onnxruntime"
                why = (f"onnxruntime-gpu is not installed (found {found}, which has no {want}): "
                       f"pip uninstall -y {' '.join(dists) or 'onnxruntime'} && pip install 'edgecnn[gpu]'")
            else:
                why = f"{want} is not in this onnxruntime-gpu build (has {', '.join(have)})"
        if not visible and "both installed" not in why:
            return False, f"no NVIDIA GPU visible ({looked})" + (f"; besides, {why}" if why else "")
        if why:
            return False, why
        missing = gpu_libraries_missing(ort, tensorrt=want.startswith("Tensorrt"))
        if missing:
            return False, missing
        return True, ""

    def _load(self) -> None:
        unknown = set(self.options) - set(self._options)
        if unknown:
            raise InvalidInputError(f"{self.name}: unknown options {', '.join(sorted(unknown))}")
        self.device_id = int(self.options.get("device_id", 0))
        self.io_binding = bool(self.options.get("io_binding", False))
        self.cuda_graph = bool(self.options.get("cuda_graph", False))
        self._lock = threading.Lock()
        self._graph_binding = None
        ort = _import_ort()
        _quiet_preload(ort)  # before the session: CUDA/cuDNN from the nvidia-* wheels
        super()._load()
        self.actual_precision = self.precision
        if self.cuda_graph:
            self._setup_cuda_graph(ort)

    def session_options(self, ort):
        so = super().session_options(ort)
        if not self.options.get("cpu_fallback", False):
            # Fail at load if any node would be placed on the CPU EP instead of silently running there.
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _cuda_options(self) -> dict:
        opts = {"device_id": str(self.device_id)}
        if self.precision == "fp32":
            opts["use_tf32"] = "0"  # fp32 means fp32: no TF32 convolutions
        if self.cuda_graph and self.providers[0] == "CUDAExecutionProvider":
            opts["enable_cuda_graph"] = "1"
        return opts

    def _load_error(self, first_line: str) -> Exception:
        low = first_line.lower()
        if any(k in low for k in ("cuda", "cudnn", "tensorrt", "gpu", "fallback", "provider")):
            return RuntimeUnavailableError(f"{self.name}: cannot create the session: {first_line}")
        return super()._load_error(first_line)

    @property
    def device(self) -> str:
        got = self.session.get_providers()[0].replace("ExecutionProvider", "").replace("Tensorrt", "TensorRT")
        return f"{got}:{self.device_id}"

    def _setup_cuda_graph(self, ort) -> None:
        shape = self.input_shape
        out_shape = self.session.get_outputs()[0].shape
        if shape[0] is None or not all(isinstance(d, int) and d > 0 for d in out_shape):
            raise InvalidInputError(f"{self.name}: CUDA graphs need a fixed-shape model; export without --dynamic-batch")
        in_np = self.dummy_input(shape[0])
        self._in_val = ort.OrtValue.ortvalue_from_numpy(in_np, "cuda", self.device_id)
        self._out_val = ort.OrtValue.ortvalue_from_shape_and_type(list(out_shape), np.float32, "cuda", self.device_id)
        b = self.session.io_binding()
        b.bind_ortvalue_input(self.input_name, self._in_val)
        b.bind_ortvalue_output(self.output_name, self._out_val)
        self._graph_binding = b

    def run_device(self, x):
        """Run on an input already on the GPU (an OrtValue); returns the output OrtValue, still on the GPU."""
        b = self.session.io_binding()
        b.bind_ortvalue_input(self.input_name, x)
        b.bind_output(self.output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._graph_binding is not None:
            with self._lock:  # one set of device buffers: replays are serialized
                self._in_val.update_inplace(x)
                self.session.run_with_iobinding(self._graph_binding)
                return self._graph_binding.copy_outputs_to_cpu()[0]
        if self.io_binding:
            ort = _import_ort()
            b = self.session.io_binding()
            b.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id))
            b.bind_output(self.output_name, "cuda", self.device_id)
            self.session.run_with_iobinding(b)
            return b.copy_outputs_to_cpu()[0]
        return super()._run(x)


@register("ort-cuda")
class OrtCuda(_OrtGpu):
    """ONNX Runtime on the CUDA execution provider. fp16: the fp32 model is converted on load (needs onnx)."""

    providers = ("CUDAExecutionProvider",)

    def provider_list(self) -> list:
        return [("CUDAExecutionProvider", self._cuda_options())]

    def _model_source(self) -> str | bytes:
        if self.precision != "fp16":
            return str(self.model_path)
        try:
            import onnx
            from edgecnn.exporters.quantize import fp16_model
        except ImportError:
            raise MissingDependencyError("onnx", "gpu", "ort-cuda fp16 (it converts the fp32 model on load)") from None
        try:
            model = onnx.load(str(self.model_path))
        except Exception as e:  # noqa: BLE001
            raise InvalidModelError(f"{self.model_path}: not a readable ONNX file: {e}") from None
        if any(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer):
            model = fp16_model(model)
        return model.SerializeToString()


@register("ort-trt")
class OrtTensorRT(_OrtGpu):
    """ONNX Runtime on the TensorRT provider (CUDA for what TensorRT leaves). Options: cache_dir for engines."""

    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    _options = _OrtGpu._options + ("cache_dir", "trt_options")

    def provider_list(self) -> list:
        trt = {"device_id": str(self.device_id), "trt_fp16_enable": str(self.precision == "fp16")}
        cache = self.options.get("cache_dir")
        if cache:
            folder = Path(cache)
            if folder.exists() and not folder.is_dir():
                raise InvalidInputError(f"{folder}: the TensorRT engine cache must be a folder")
            folder.mkdir(parents=True, exist_ok=True)
            trt.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder)})
        if self.cuda_graph:
            trt["trt_cuda_graph_enable"] = "True"
        # Raw TensorRT provider options, e.g. trt_profile_min/opt/max_shapes for a dynamic batch axis.
        trt.update({str(k): str(v) for k, v in dict(self.options.get("trt_options") or {}).items()})
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", self._cuda_options())]
