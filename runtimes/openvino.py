"""OpenVINO backend: reads .onnx directly or IR .xml/.bin; fp32 pinned, never a silent device or precision change."""

from __future__ import annotations

import threading

import numpy as np

from edgecnn.errors import (
    InvalidModelError,
    MissingDependencyError,
    RuntimeUnavailableError,
)

from ._deps import dist_version, has_module
from .base import Runtime, register
from .options import Option

# edgecnn precision -> OpenVINO INFERENCE_PRECISION_HINT element type, and back.
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_FROM_OV = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
# Which OPTIMIZATION_CAPABILITIES entry a device must list to run a precision.
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}
_DEVICES = ("CPU", "GPU", "NPU", "AUTO")
_PERF_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def _import_ov():
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", "the openvino runtime") from None
    return ov


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return (lines[0] if lines else type(e).__name__)[:300]


def available_devices() -> list[str]:
    """The devices OpenVINO sees here (empty when it is not installed or fails to start)."""
    try:
        return list(_import_ov().Core().available_devices)
    except Exception:  # noqa: BLE001 - a probe, never raises
        return []


def _read_metadata(model) -> dict[str, str]:
    """ONNX metadata_props, which OpenVINO's ONNX frontend keeps under rt_info['framework'].

    The section survives ov.save_model, so an IR written from an edgecnn ONNX file has it too;
    plain string keys at the top of rt_info (or under 'edgecnn') are accepted as well.
    """
    out: dict[str, str] = {}
    try:
        info = model.get_rt_info()
        keys = list(info)
    except Exception:  # noqa: BLE001 - a model without rt_info has no metadata
        return out
    for section in ("framework", "edgecnn"):
        if section in keys:
            try:
                for k, v in dict(info[section]).items():
                    out.setdefault(str(k), v.astype(str) if hasattr(v, "astype") else str(v))
            except Exception:  # noqa: BLE001 - an odd section is skipped, not fatal
                continue
    for k in ("class_names", "mean", "std", "input_size", "input_layout", "edgecnn_version", "source_sha256"):
        if k not in out and k in keys:
            try:
                out[k] = info[k].astype(str)
            except Exception:  # noqa: BLE001
                continue
    return out


@register("openvino")
class OpenVino(Runtime):
    """OpenVINO Runtime. Options: device (CPU/GPU/NPU/AUTO[:...]), hint (latency/throughput).

    ``precision`` fp32 pins INFERENCE_PRECISION_HINT=f32 (CPUs with AVX-512 BF16 or AMX otherwise run
    bf16 by default); bf16/fp16 ask for that hint. The precision the compiled model reports is read
    back into ``actual_precision``; if it is not the one asked for, loading raises. One infer request
    per thread, so ``run`` may be called from several threads at once.
    """

    precisions = ("fp32", "bf16", "fp16")
    suffixes = (".onnx", ".xml")
    option_specs = (
        Option("device", str, "CPU", "OpenVINO device (GPU.1, AUTO:GPU,CPU ... accepted); one it does not see "
               "raises, never runs elsewhere", choices=_DEVICES, prefix=True),
        # Default hint: per CPU kind (runtimes/cpu.py), latency on every kind measured (synchronous run(),
        # one request per thread, fp32): amd-epyc-avx512-bf16 5,504 img/s at batch 64 and 0.25 ms p50 at
        # batch 1 against THROUGHPUT's 2,838 img/s, 0.38 ms (its streams split the cores, which a single
        # synchronous request cannot use); amd-epyc-avx2 1,584 against 840 img/s.
        Option("hint", str, None, "PERFORMANCE_HINT (default per CPU kind: latency, as one synchronous request "
               "is fastest on every kind measured)", choices=tuple(_PERF_HINTS)),
        Option("hyper_threading", bool, None, "ENABLE_HYPER_THREADING on the CPU device (default per CPU kind: on "
               "where the CPU has SMT, so every usable CPU runs a thread)"),
    )

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not has_module("openvino"):
            return False, "openvino is not installed (pip install 'edgecnn[openvino]')"
        devices = available_devices()
        if not devices:
            return False, "openvino is installed but sees no device (or fails to start)"
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str | None]:
        return {"openvino": dist_version("openvino")}

    @classmethod
    def devices_seen(cls) -> list[str]:
        try:
            core = _import_ov().Core()
            return [f"{d} ({core.get_property(d, 'FULL_DEVICE_NAME')})" for d in core.available_devices]
        except Exception:  # noqa: BLE001 - a probe, never raises
            return []

    def _load(self) -> None:
        ov = _import_ov()
        # Options are already validated and typed (option_specs); nothing is popped: self.options
        # stays what was applied.
        device = str(self.options["device"]).upper()
        self.options["device"] = device
        hint = self.options["hint"]
        base = device.split(":")[0].split(".")[0]
        core = ov.Core()
        seen = list(core.available_devices)
        if base != "AUTO" and not any(d == device or d.split(".")[0] == device for d in seen):
            raise RuntimeUnavailableError(
                f"openvino: asked for device {device} but OpenVINO sees only {', '.join(seen) or 'none'}"
            )
        if base != "AUTO":
            caps = self._capabilities(core, device)
            need = _CAPABILITY[self.precision]
            if caps is not None and need not in caps:
                raise RuntimeUnavailableError(
                    f"openvino: {device} cannot run {self.precision} (it lists {', '.join(caps)})"
                )
        try:
            model = core.read_model(str(self.model_path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises untyped RuntimeErrors
            raise InvalidModelError(f"{self.model_path}: OpenVINO cannot read it: {_first_line(e)}") from None
        self._check_io(model)
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision]}
        from .cpu import current_defaults

        cpu_defaults = current_defaults()
        if hint is None:
            hint = self.options["hint"] = cpu_defaults.openvino_hint
        config["PERFORMANCE_HINT"] = _PERF_HINTS[str(hint).lower()]
        # An explicit count from the CPUs this process may use (affinity mask, cgroup quota): never more.
        self.threads_used = self.threads if self.threads is not None else cpu_defaults.threads
        if base == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(self.threads_used)
            ht = self.options.get("hyper_threading")
            if ht is None:  # SMT: the LATENCY hint would otherwise use one thread per physical core
                ht = self.options["hyper_threading"] = cpu_defaults.openvino_hyper_threading
            config["ENABLE_HYPER_THREADING"] = bool(ht)
        elif self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            self.compile_config = dict(config)  # what was asked of OpenVINO (it may normalize some of it)
            self.compiled = core.compile_model(model, device, config)
        except Exception as e:  # noqa: BLE001
            msg = _first_line(e)
            if base in ("CPU", "AUTO"):
                raise InvalidModelError(f"{self.model_path}: OpenVINO cannot compile it on {device}: {msg}") from None
            raise RuntimeUnavailableError(f"openvino: cannot use {device}: {msg}") from None
        self._device = self._execution_devices()
        self.actual_precision = self._read_precision()
        # AUTO forwards the hint to the device it picks but does not report it back (checked: AUTO
        # with f32 gives the same logits as CPU f32, without it they differ by 1e-2 on this CPU).
        self.precision_confirmed = self.actual_precision != "unknown"
        if base == "AUTO" and not self.precision_confirmed:
            self.actual_precision = self.precision
        if self.actual_precision != self.precision:
            raise RuntimeUnavailableError(
                f"openvino: asked for {self.precision} on {self._device} but OpenVINO runs "
                f"{self.actual_precision}; refusing to label it {self.precision}"
            )
        self._metadata = _read_metadata(model)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._requests: list = []

    @staticmethod
    def _capabilities(core, device: str) -> list[str] | None:
        try:
            return [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
        except Exception:  # noqa: BLE001 - some plugins do not report it; the read-back check still holds
            return None

    def _check_io(self, model) -> None:
        ins, outs = model.inputs, model.outputs
        if len(ins) != 1 or len(outs) != 1:
            raise InvalidModelError(
                f"{self.model_path}: expected one input and one output, got {len(ins)} and {len(outs)}"
            )
        pshape = ins[0].get_partial_shape()
        etype = ins[0].get_element_type().get_type_name()
        dims = [d.get_length() if d.is_static else None for d in pshape] if pshape.rank.is_static else []
        if hasattr(self, "_set_input_spec"):  # float32 NCHW, or uint8 NHWC with preprocessing in the graph
            self._set_input_spec(tuple(dims), {"f32": "float32", "u8": "uint8"}.get(etype, etype))
            return
        if etype != "f32" or len(dims) != 4 or None in dims[1:]:
            raise InvalidModelError(
                f"{self.model_path}: expected a float32 input (N,3,H,W), got {etype} {pshape}"
            )
        self.input_shape = (dims[0], dims[1], dims[2], dims[3])

    def _execution_devices(self) -> str:
        try:
            devs = [str(d) for d in self.compiled.get_property("EXECUTION_DEVICES")]
            return ",".join(devs) if devs else "?"
        except Exception:  # noqa: BLE001
            return "?"

    def _read_precision(self) -> str:
        try:
            t = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # noqa: BLE001 - AUTO may not forward the property
            return "unknown"
        name = t.get_type_name() if hasattr(t, "get_type_name") else str(t)
        return _FROM_OV.get(name, name)

    @property
    def device(self) -> str:
        return self._device

    def describe(self) -> str:
        note = "" if self.precision_confirmed else ", hint not read back"
        return f"{self.name} ({self.device}, {self.actual_precision}{note})"

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self.compiled.create_infer_request()
            self._local.request = req
            with self._lock:
                self._requests.append(req)
        return req

    def _run(self, x: np.ndarray) -> np.ndarray:
        req = self._request()
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _release(self) -> None:
        self.__dict__.pop("_requests", None)
        self.__dict__.pop("_local", None)
        self.__dict__.pop("compiled", None)

