"""ONNX Runtime backends: ort-cpu and the shared session logic (the GPU providers are in ort_gpu.py)."""

from __future__ import annotations

import os

import numpy as np

from edgecnn.errors import InvalidModelError, MissingDependencyError, RuntimeUnavailableError

from ._deps import dist_version, has_module, ort_conflict, ort_distributions
from .base import Runtime, register
from .options import Option

SPINNING = Option("spinning", bool, None, "intra-op thread spinning (on: lower batch-1 latency; off: idle CPU); "
                  "default per CPU: on, off where a cgroup quota binds (runtimes/cpu.py)")


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
        """The session's settings; what the user did not set comes from the per-CPU-kind defaults
        (runtimes/cpu.py: each names the measurement behind it), decided here from what the machine reports.
        - graph optimization ORT_ENABLE_ALL (ORT's default, pinned): its NCHWc layout transform gives
          5,637 img/s at batch 64 against 4,804 with BASIC or EXTENDED on amd-epyc-avx512-bf16, and
          1,624-1,963 against 1,555-1,617 on amd-epyc-avx2;
        - threads: always an explicit count, one per usable CPU (affinity mask and cgroup quota). ORT's own
          default counts the host's physical cores and pins threads to them, blind to both; an explicit count
          also turns ORT's thread pinning off, so no thread leaves the allowed CPUs;
        - intra-op spinning: on, except where a cgroup quota binds (spinning burns the quota while idle).
        The biggest fp32 win is not a session option but the exact Elu/MaxPool swap at export
        (exporters/passes.py): 5,968 img/s against 3,122 for the same weights without it.
        """
        from .cpu import current_defaults

        d = current_defaults()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads_used = self.threads if self.threads is not None else d.threads
        so.intra_op_num_threads = self.threads_used
        so.inter_op_num_threads = 1  # sequential execution: the graph is a chain; no second pool
        spinning = self.options.get("spinning")
        self.spinning_used = d.spinning if spinning is None else bool(spinning)
        if "spinning" in self.options:  # what was applied (the GPU runtimes do not declare it)
            self.options["spinning"] = self.spinning_used
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning_used else "0")
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

    def _create_session(self, ort, source, so, providers):
        """InferenceSession(...); a subclass may wrap it (e.g. to capture ORT's log)."""
        return ort.InferenceSession(source, sess_options=so, providers=providers)

    def _wrong_provider(self, got: str) -> Exception:
        return RuntimeUnavailableError(f"{self.name}: asked for {self.providers[0]} but ONNX Runtime gave {got}")

    def _load(self) -> None:
        ort = _import_ort()
        # Options, provider options and the model bytes are prepared outside the try: their errors are
        # option or model errors of their own, never "ONNX Runtime cannot load it".
        so, providers, source = self.session_options(ort), self.provider_list(), self._model_source()
        try:
            self.session = self._create_session(ort, source, so, providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self._load_error(first) from None
        got = self.session.get_providers()
        if got[0] != self.providers[0]:
            raise self._wrong_provider(got[0])
        self._provider_got = got[0]
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
        return self._provider_got.replace("ExecutionProvider", "")

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as e:  # noqa: BLE001 - a graph that loads but cannot run a valid input is invalid
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(f"{self.model_path}: ONNX Runtime cannot run it: {first[:200]}") from None

    def _release(self) -> None:
        self.__dict__.pop("session", None)


@register("ort-cpu")
class OrtCpu(_OrtRuntime):
    """ONNX Runtime on the CPU execution provider."""

    providers = ("CPUExecutionProvider",)
    option_specs = (SPINNING,)


