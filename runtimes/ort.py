"""ONNX Runtime backends: ort-cpu (and the GPU providers, which refuse to fall back to the CPU)."""

from __future__ import annotations

import numpy as np

from edgecnn.errors import InvalidModelError, MissingDependencyError, RuntimeUnavailableError

from ._deps import has_module, ort_conflict
from .base import Runtime, register


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "device", "the ort-* runtimes") from None
    return ort


def _shape_of(value_info) -> tuple:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in value_info.shape)


class _OrtRuntime(Runtime):
    providers: tuple = ("CPUExecutionProvider",)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not has_module("onnxruntime"):
            return False, "onnxruntime is not installed (pip install 'edgecnn[device]')"
        conflict = ort_conflict()
        if conflict:
            return False, conflict
        try:
            ort = _import_ort()
            have = ort.get_available_providers()
        except Exception as e:  # noqa: BLE001 - available() never raises
            return False, f"onnxruntime does not import: {e}"
        missing = [p for p in cls.providers if p not in have]
        if missing:
            return False, f"{missing[0]} is not in this onnxruntime build (has {', '.join(have)})"
        return True, ""

    def session_options(self, ort):
        so = ort.SessionOptions()
        if self.threads is not None:
            so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        return so

    def provider_list(self) -> list:
        return list(self.providers)

    def _load(self) -> None:
        ort = _import_ort()
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), sess_options=self.session_options(ort),
                providers=self.provider_list(),
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(f"{self.model_path}: ONNX Runtime cannot load it: {first}") from None
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
        shape = _shape_of(inputs[0])
        if inputs[0].type != "tensor(float)" or len(shape) != 4 or None in shape[1:]:
            raise InvalidModelError(
                f"{self.model_path}: expected a float32 input (N,3,H,W), got {inputs[0].type} {list(inputs[0].shape)}"
            )
        self.input_shape = shape
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self._metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def device(self) -> str:
        return self.session.get_providers()[0].replace("ExecutionProvider", "")

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def close(self) -> None:
        self.__dict__.pop("session", None)


@register("ort-cpu")
class OrtCpu(_OrtRuntime):
    """ONNX Runtime on the CPU execution provider."""

    providers = ("CPUExecutionProvider",)
