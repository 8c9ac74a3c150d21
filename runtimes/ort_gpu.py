"""ONNX Runtime on NVIDIA GPUs: ort-cuda and ort-trt. No CPU fallback, the provider really obtained is
checked, fp32 means fp32 (no TF32), and no option changes the precision or device behind the label."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgecnn.errors import (
    InvalidInputError,
    InvalidModelError,
    MissingDependencyError,
    RuntimeUnavailableError,
)

from . import _deps, gpu_libs
from .base import register
from .options import Option
from .ort import SPINNING, _import_ort, _OrtRuntime

TF32_ENV = "NVIDIA_TF32_OVERRIDE"
# TensorRT provider environment switches that would change the precision behind an fp32 label.
_TRT_PRECISION_ENV = ("ORT_TENSORRT_FP16_ENABLE", "ORT_TENSORRT_INT8_ENABLE", "ORT_TENSORRT_BF16_ENABLE")
# trt_options keys edgecnn owns (set them through its own options) or refuses (they change precision/device).
_TRT_OWNED = {
    "device_id": "use -O device_id",
    "trt_cuda_graph_enable": "use -O cuda_graph",
    "trt_engine_cache_enable": "use -O cache_dir", "trt_engine_cache_path": "use -O cache_dir",
    "trt_timing_cache_enable": "use -O cache_dir", "trt_timing_cache_path": "use -O cache_dir",
    "has_user_compute_stream": "not supported", "user_compute_stream": "not supported",
}
_TRT_PRECISION_KEY = re.compile(r"fp16|bf16|int8|int4|fp8|fp4|tf32|dla|strongly_typed")


def check_trt_options(opts: dict) -> str | None:
    """Why these raw TensorRT provider options are refused, or None."""
    for key in opts:
        if key in _TRT_OWNED:
            return f"{key} is set by edgecnn ({_TRT_OWNED[key]})"
        if _TRT_PRECISION_KEY.search(key):
            return (f"{key} would change the precision or device behind the row's label "
                    "(use --precision fp16 for TensorRT fp16)")
        if not key.startswith("trt_"):
            return f"{key} is not a TensorRT provider option (they start with trt_)"
    return None


def _check_cache_dir(value) -> str | None:
    folder = Path(str(value))
    return "the TensorRT engine cache must be a folder" if folder.exists() and not folder.is_dir() else None


_GPU_OPTIONS = (
    Option("device_id", int, 0, "CUDA device index", minimum=0),
    Option("io_binding", bool, False, "bind input and output on the GPU (edgecnn does the host copies)"),
    Option("cuda_graph", bool, False, "capture one CUDA graph and replay it (fixed-shape models; bench pins the "
           "batch per row)"),
    Option("cpu_fallback", bool, False, "let ONNX Runtime put nodes the GPU provider lacks on the CPU (the device "
           "then says +CPU)"),
    SPINNING,
)


def disable_tf32(precision: str) -> None:
    """fp32 means fp32: TensorRT has no per-session TF32 switch (ORT issue 26029; CUDA's use_tf32=0 does not
    reach it), and NVIDIA_TF32_OVERRIDE is read once per process. So it is set to 0 before the first GPU
    session of the process, whatever its precision, and an fp32 run refuses a process where it says otherwise."""
    current = os.environ.get(TF32_ENV)
    if current is None:
        os.environ[TF32_ENV] = "0"
    elif current != "0" and precision == "fp32":
        raise RuntimeUnavailableError(
            f"{TF32_ENV}={current} in the environment lets the GPU run fp32 as TF32; unset it (or set it to 0) "
            "for an fp32 run")


def _quiet_preload(ort) -> None:
    """onnxruntime.preload_dlls() (CUDA, cuDNN from the nvidia-* pip packages) when present, silenced.
    Called right before a session is created, never by available()."""
    if not hasattr(ort, "preload_dlls"):
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        ort.preload_dlls()


@contextlib.contextmanager
def _captured_fd2():
    """Everything written to file descriptor 2 (where ORT's C++ logger writes) inside the block."""
    out = {"text": ""}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out["text"] = f.read().decode(errors="replace")


def trt_failure_reason(log: str) -> str:
    """The most telling line of ORT's log about TensorRT not loading ('' if none)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    keys = ("nvinfer", "tensorrt", "libnvonnxparser", "cannot open shared object")
    hits = [ln for ln in lines if any(k in ln.lower() for k in keys) and ("[E:" in ln or "[W:" in ln
                                                                          or "error" in ln.lower()
                                                                          or "fail" in ln.lower())]
    if not hits:
        return ""
    best = next((ln for ln in hits if "cannot open shared object" in ln or "LoadLibrary" in ln), hits[-1])
    return re.sub(r"^\d{4}-\d\d-\d\d [\d:.]+ ", "", best)[:300]


class _OrtGpu(_OrtRuntime):
    """Shared by ort-cuda and ort-trt: no CPU fallback, provider checked, IO binding and CUDA graphs."""

    precisions = ("fp32", "fp16")
    option_specs = _GPU_OPTIONS
    memory_device = "cuda"  # where IO-bound and CUDA-graph buffers live (OrtValue device name)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        # No GPU at all is said first (cheap checks, nothing loaded), with what else is missing after it.
        visible, looked = _deps.nvidia_gpu_visible()
        want = cls.providers[0]
        ort, have, why = cls._probe("onnxruntime-gpu is not installed (pip install 'edgecnn[device-gpu]')")
        if ort is not None and want not in have:
            dists = _deps.ort_distributions()
            if "onnxruntime-gpu" not in dists:
                found = ", ".join(f"{d} {_deps.dist_version(d)}" for d in dists) or "onnxruntime"
                why = (f"onnxruntime-gpu is not installed (found {found}, which has no {want}): "
                       f"pip uninstall -y {' '.join(dists) or 'onnxruntime'} && pip install 'edgecnn[device-gpu]'")
            else:
                why = f"{want} is not in this onnxruntime-gpu build (has {', '.join(have)})"
        if not visible and "both installed" not in why:
            return False, f"no NVIDIA GPU visible ({looked})" + (f"; besides, {why}" if why else "")
        if why:
            return False, why
        # Looks for the libraries on disk; loads none (listing runtimes must not pull CUDA in).
        missing = gpu_libs.missing(ort, tensorrt=want.startswith("Tensorrt"))
        if missing:
            return False, missing
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str | None]:
        out = super().versions()
        if "onnxruntime-gpu" not in _deps.ort_distributions():
            return out
        with contextlib.suppress(Exception):
            need = gpu_libs.required_majors(_import_ort())
            out["needs"] = ", ".join(f"{k} {v}" for k, v in sorted(need.items()))
        return out

    def _load(self) -> None:
        o = self.options
        self.device_id = int(o["device_id"])
        self.io_binding = bool(o["io_binding"])
        self.cuda_graph = bool(o["cuda_graph"])
        self.cpu_fallback = bool(o["cpu_fallback"])
        self._lock = threading.Lock()
        self._graph_binding = None
        self.tf32 = False
        disable_tf32(self.precision)
        self._check_precision_env()
        if self.precision == "fp16":
            self._refuse_int8_file()
        ort = self._ort = _import_ort()  # kept: run() and run_device() use it per call
        _quiet_preload(ort)  # right before the session: CUDA/cuDNN from the nvidia-* wheels
        super()._load()
        self.actual_precision = self.precision
        if self.cuda_graph:
            self._setup_cuda_graph(ort)

    def _check_precision_env(self) -> None:
        pass

    def _refuse_int8_file(self) -> None:
        """fp16 of an int8 (QDQ) file would be neither: refused. The precision is read from the graph
        (runtimes/artifact.py: torch-free, no onnx package needed), never from the metadata."""
        from .artifact import describe

        art = describe(self.model_path)
        if art.precision == "int8":
            raise InvalidInputError(f"{self.model_path}: {self.name} fp16 refuses an int8 model "
                                    f"({art.precision_evidence}); run it with --precision fp32 (its int8 parts "
                                    "stay int8)")

    def session_options(self, ort):
        so = super().session_options(ort)
        if not self.cpu_fallback:
            # Fail at load if any node would be placed on the CPU EP instead of silently running there.
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _cuda_options(self) -> dict:
        opts = {"device_id": str(self.device_id)}
        if self.precision == "fp32":
            opts["use_tf32"] = "0"  # fp32 means fp32: no TF32 convolutions or GEMMs in the CUDA provider
        if self.cuda_graph and self.providers[0] == "CUDAExecutionProvider":
            opts["enable_cuda_graph"] = "1"
        return opts

    def _load_error(self, first_line: str) -> Exception:
        low = first_line.lower()
        # ORT's wordings for a provider option it rejects (provider_options_utils, the pybind TensorRT parser)
        if any(k in low for k in ("provider option", "ep option", "unknown option", "invalid value",
                                  "the value for the key")):
            return InvalidInputError(f"{self.name}: ONNX Runtime rejected a provider option: {first_line}")
        if any(k in low for k in ("cuda", "cudnn", "tensorrt", "gpu", "fallback", "provider")):
            return RuntimeUnavailableError(f"{self.name}: cannot create the session: {first_line}")
        return super()._load_error(first_line)

    @property
    def device(self) -> str:
        got = self._provider_got.replace("ExecutionProvider", "").replace("Tensorrt", "TensorRT")
        return f"{got}:{self.device_id}" + ("+CPU" if self.cpu_fallback else "")

    def _setup_cuda_graph(self, ort) -> None:
        shape = self.input_shape
        out_shape = self.session.get_outputs()[0].shape
        if shape[0] is None or not all(isinstance(d, int) and d > 0 for d in out_shape):
            raise InvalidInputError(f"{self.name}: cuda_graph needs a fixed-shape model (this one has a symbolic "
                                    "batch axis); export without --dynamic-batch")
        in_np = self.dummy_input(shape[0])
        self._in_val = ort.OrtValue.ortvalue_from_numpy(in_np, self.memory_device, self.device_id)
        self._out_val = ort.OrtValue.ortvalue_from_shape_and_type(list(out_shape), np.float32, self.memory_device, self.device_id)
        b = self.session.io_binding()
        b.bind_ortvalue_input(self.input_name, self._in_val)
        b.bind_ortvalue_output(self.output_name, self._out_val)
        self._graph_binding = b

    def graph_input(self):
        """cuda_graph mode: the device input buffer the captured graph reads (write into it, then
        run_device(it): no copy)."""
        if self._graph_binding is None:
            raise InvalidInputError(f"{self.name}: graph_input() needs cuda_graph=true")
        return self._in_val

    def run_device(self, x):
        """Run on an input already on the GPU (an OrtValue); returns the output OrtValue, still on the GPU.

        In cuda_graph mode the graph replays on the addresses it captured: x is copied into the captured
        input buffer (no copy if x is graph_input()), and the captured output buffer is returned; it is
        overwritten by the next run, so read or copy it first. Replays are serialized by a lock."""
        if self.closed:
            raise InvalidInputError(f"runtime {self.name} was closed; load the model again to run it")
        if self._graph_binding is not None:
            if list(x.shape()) != list(self._in_val.shape()):
                raise InvalidInputError(f"{self.name}: cuda_graph input must have shape {self._in_val.shape()}, "
                                        f"got {x.shape()}")
            with self._lock:
                if x is not self._in_val:
                    if hasattr(self._ort, "copy_tensors"):
                        self._ort.copy_tensors([x], [self._in_val])
                    else:
                        self._in_val.update_inplace(x.numpy())
                self.session.run_with_iobinding(self._graph_binding)
                return self._out_val
        b = self.session.io_binding()
        b.bind_ortvalue_input(self.input_name, x)
        b.bind_output(self.output_name, self.memory_device, self.device_id)
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._graph_binding is not None:
            with self._lock:  # one set of device buffers: replays are serialized
                self._in_val.update_inplace(x)
                self.session.run_with_iobinding(self._graph_binding)
                return self._graph_binding.copy_outputs_to_cpu()[0]
        if self.io_binding:
            b = self.session.io_binding()
            b.bind_ortvalue_input(self.input_name, self._ort.OrtValue.ortvalue_from_numpy(x, self.memory_device, self.device_id))
            b.bind_output(self.output_name, self.memory_device, self.device_id)
            self.session.run_with_iobinding(b)
            return b.copy_outputs_to_cpu()[0]
        return super()._run(x)

    def _release(self) -> None:
        """Drop the graph binding and its device buffers before the session (frees the GPU memory)."""
        lock = self.__dict__.get("_lock")
        with lock if lock is not None else contextlib.nullcontext():
            for name in ("_graph_binding", "_in_val", "_out_val"):
                self.__dict__.pop(name, None)
            self._graph_binding = None
            super()._release()


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
    option_specs = _GPU_OPTIONS + (
        Option("cache_dir", str, None, "folder for TensorRT engine and timing caches", check=_check_cache_dir,
               metavar="DIR"),
        Option("trt_options", dict, None, "raw TensorRT provider options, JSON or 'k=v;k=v' (e.g. trt_profile_*); "
               "none that changes precision or device", check=check_trt_options),
    )

    def _check_precision_env(self) -> None:
        if self.precision != "fp32":
            return
        on = [k for k in _TRT_PRECISION_ENV if os.environ.get(k, "0").strip().lower() not in ("", "0", "false")]
        if on:
            raise RuntimeUnavailableError(f"{self.name}: {on[0]}={os.environ[on[0]]} in the environment would run "
                                          "this fp32 row at another precision; unset it")

    def provider_list(self) -> list:
        trt = {"device_id": str(self.device_id), "trt_fp16_enable": str(self.precision == "fp16")}
        cache = self.options.get("cache_dir")
        if cache:
            folder = Path(cache)
            folder.mkdir(parents=True, exist_ok=True)
            trt.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder)})
        if self.cuda_graph:
            trt["trt_cuda_graph_enable"] = "True"
        # Raw options first, edgecnn's own last: none of them can override precision or device (and
        # check_trt_options has refused any that would).
        raw = dict(self.options.get("trt_options") or {})
        return [("TensorrtExecutionProvider", {**raw, **trt}), ("CUDAExecutionProvider", self._cuda_options())]

    def _create_session(self, ort, source, so, providers):
        """ORT's default logger at verbose while the session is created, its output captured: when TensorRT
        does not load (missing libnvinfer, unsupported GPU, ...), the reason goes into the error."""
        log = {"text": ""}
        try:
            with _captured_fd2() as log:
                with contextlib.suppress(Exception):
                    ort.set_default_logger_severity(0)
                try:
                    return super()._create_session(ort, source, so, providers)
                finally:
                    with contextlib.suppress(Exception):  # back to edgecnn's setting (ort._import_ort)
                        ort.set_default_logger_severity(0 if os.environ.get("EDGECNN_DEBUG") else 4)
        finally:
            self._load_log = log["text"]

    def _load_error(self, first_line: str) -> Exception:
        err = super()._load_error(first_line)
        reason = trt_failure_reason(getattr(self, "_load_log", ""))
        if reason and reason not in str(err):
            return type(err)(f"{err} (ORT's log: {reason})")
        return err

    def _wrong_provider(self, got: str) -> Exception:
        reason = trt_failure_reason(getattr(self, "_load_log", ""))
        return RuntimeUnavailableError(f"{self.name}: asked for TensorRT but ONNX Runtime gave {got}"
                                       + (f": {reason}" if reason else " (ORT's log said nothing about TensorRT)"))
