"""Quantize an exported model: int8 static PTQ (ONNX Runtime QDQ or NNCF -> OpenVINO IR) and fp16, behind an accuracy gate."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecnn._io import atomic_path
from edgecnn.errors import InvalidInputError, InvalidModelError, MissingDependencyError, ParityError

PRECISIONS = ("int8", "fp16")
BACKENDS = ("ort", "openvino")
CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_SAMPLES = 256
DEFAULT_MAX_DROP = 1.0


@dataclass
class QuantizeResult:
    path: Path
    precision: str
    backend: str
    report: object  # edgecnn.quant_report.AccuracyReport
    passes: list = field(default_factory=list)  # exact graph passes applied to the fp32 input first
    notes: list = field(default_factory=list)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("onnx", "cpu", "quantization") from None
    return onnx


def default_output(model: Path, precision: str, backend: str) -> Path:
    return model.with_name(f"{model.stem}.{precision}{'.xml' if backend == 'openvino' else '.onnx'}")


def quantize(model: str | os.PathLike, out: str | os.PathLike | None = None, *, precision: str = "int8",
             backend: str = "ort", calib: str | os.PathLike = "builtin", calib_method: str | None = None,
             calib_samples: int = DEFAULT_CALIB_SAMPLES, max_drop: float = DEFAULT_MAX_DROP,
             heldout: str | os.PathLike | None = None, log=None) -> QuantizeResult:
    """Quantize ``model`` (.onnx, fp32) to ``out``; refuse (ParityError, nothing written) past ``max_drop``."""
    from edgecnn.quant_report import quant_data

    onnx = _onnx()
    model = Path(model)
    if precision not in PRECISIONS:
        raise InvalidInputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if backend not in BACKENDS:
        raise InvalidInputError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if calib_method is not None and calib_method not in CALIB_METHODS:
        raise InvalidInputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}")
    if backend == "openvino" and calib_method not in (None, "minmax"):
        raise InvalidInputError("--calib-method applies to --backend ort; NNCF picks its own range estimators")
    if max_drop < 0:
        raise InvalidInputError("--max-drop must be >= 0")
    if not model.is_file() or model.suffix.lower() != ".onnx":
        raise InvalidInputError(f"{model}: give an fp32 .onnx file exported by edgecnn")
    try:
        proto = onnx.load(str(model))
    except Exception as e:  # noqa: BLE001 - protobuf decode errors are untyped
        raise InvalidModelError(f"{model}: not a readable ONNX file: {str(e).splitlines()[0][:200]}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if len(proto.graph.input) != 1 or proto.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise InvalidInputError(f"{model}: quantize takes a model with one float32 input "
                                "(export it without --embed-preprocessing)")
    from edgecnn.runtimes.artifact import describe

    graph = describe(model)
    if graph.precision != "fp32":
        raise InvalidInputError(f"{model}: already {graph.precision} ({graph.precision_evidence}); quantize the fp32 model")
    out = Path(out) if out is not None else default_output(model, precision, backend)
    want = ".xml" if backend == "openvino" else ".onnx"
    if out.suffix.lower() != want:
        raise InvalidInputError(f"{out}: --backend {backend} writes a {want} file")
    if out.resolve() == model.resolve():
        raise InvalidInputError(f"{out}: the output would overwrite the input model")
    say = log or (lambda s: None)

    from edgecnn.progress import Stages

    from .passes import optimize

    stages = Stages(["fp32 logits", "calibrating and writing" if precision == "int8"
                     else "converting", f"{precision} logits", "accuracy report"], f"quantize {precision}", say)
    passes = [p for p in optimize(proto) if p.count]
    data = quant_data(calib, meta, calib_samples if precision == "int8" else 1, heldout=heldout)
    where = "the built-in set" if str(calib) == "builtin" else str(calib)
    method = calib_method or "minmax"
    with tempfile.TemporaryDirectory(prefix="edgecnn-quant-") as td:
        src = Path(td) / "fp32.onnx"
        onnx.save(proto, str(src))
        from edgecnn.quant_report import accuracy_report, file_size, logits

        batches = data.inputs.batches
        stages.step("fp32 logits")
        ref = logits("ort-cpu", src, batches)
        notes: list[str] = list(data.notes)
        if data.labels is None:
            notes.append("no labels given: judged by top-1 agreement with fp32 and the logit-error bounds, not by "
                         "the accuracy drop (give DIR/<class>/<image> with the model's classes for that)")
        if backend == "openvino":
            writer = _openvino_int8 if precision == "int8" else _openvino_fp16
            runtime = "openvino"
            calibration = (f"NNCF post-training quantization, {len(data.calib)} image(s)" if precision == "int8"
                           else "none (weights compressed to fp16)")
        else:
            writer = _ort_int8 if precision == "int8" else _ort_fp16
            runtime = "ort-cpu"
            calibration = (f"ONNX Runtime quantize_static, QDQ, per-channel weights, {method}, "
                           f"{len(data.calib)} image(s)" if precision == "int8" else "none (fp16 conversion)")
        calibration += f" from {where}" if precision == "int8" else ""
        if precision == "fp16":
            notes.append(f"fp16 is for GPUs/NPUs (ort-cuda, ort-trt, OpenVINO GPU); on {runtime} on a CPU it "
                         "is not faster than fp32 (the CPU computes it through fp32 or casts)")
        with _atomic_outputs(out) as tmp:
            stages.step(f"calibrating on {len(data.calib)} images and writing {out.name}" if precision == "int8"
                        else f"converting {out.name}")
            writer(src, tmp, data.calib, method, meta)
            stages.step(f"{precision} logits on {runtime}")
            q = logits(runtime, tmp, batches)
            stages.step("accuracy report")
            from edgecnn.runtimes.artifact import describe

            graph_precision = describe(tmp).precision  # the judge's row: what the graph computes in
            names = json.loads(meta["class_names"]) if "class_names" in meta else None
            rep = accuracy_report(ref, q, data, backend=backend, precision=graph_precision, runtime=runtime,
                                  size_fp32=file_size(model), size_quant=file_size(tmp), max_drop=max_drop,
                                  calibration=calibration, class_names=names)
            stages.close()
            if not rep.passed:
                err = ParityError(f"accuracy gate: {rep.reason}; {out} was not written")
                err.report = rep
                raise err
    return QuantizeResult(out, precision, backend, rep, [(p.name, p.detail) for p in passes], notes)


@contextlib.contextmanager
def _atomic_outputs(out: Path):
    """One temp path for .onnx; for IR .xml the .bin beside it is moved into place with it."""
    if out.suffix.lower() != ".xml":
        with atomic_path(out) as tmp:
            yield tmp
        return
    with atomic_path(out.with_suffix(".bin")) as tmp_bin, atomic_path(out) as tmp_xml:
        side = tmp_xml.with_suffix(".bin")  # OpenVINO writes <name>.bin beside <name>.xml
        try:
            yield tmp_xml
            os.replace(side, tmp_bin)
        finally:
            with contextlib.suppress(FileNotFoundError):
                side.unlink()


def _stamp(meta: dict[str, str], precision: str, how: str) -> dict[str, str]:
    return {**meta, "precision": precision, "quantization": how}


# ---------------------------------------------------------------------------------------------- ORT
class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over normalized float32 images."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int):
        self.x, self.name, self.batch, self.i = x, input_name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = self.x[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.name: np.ascontiguousarray(b)}

    def rewind(self):
        self.i = 0


def _ort_int8(src: Path, dst: Path, calib: np.ndarray, method: str, meta: dict[str, str]) -> None:
    onnx = _onnx()
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError:
        raise MissingDependencyError("onnxruntime", "cpu", "int8 quantization") from None

    reader_cls = type("EdgecnnCalibReader", (_Reader, CalibrationDataReader), {})
    proto = onnx.load(str(src))
    inp = proto.graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0]
    batch = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else 32
    pre = src.with_name("fp32.pre.onnx")
    with _quiet():
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        keep_float = _thin_input_convs(onnx.load(str(pre)))
        quantize_static(
            str(pre), str(dst), reader_cls(calib, inp.name, batch),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            # Logits stay float: an int8 Gemm output (256 levels over the logit range) flips near-ties.
            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False,
                           "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            nodes_to_exclude=keep_float,
        )
    kept = f"; kept fp32: {', '.join(keep_float)}" if keep_float else ""
    _finish_onnx(dst, _stamp(meta, "int8", f"onnxruntime static QDQ s8s8 per-channel {method}{kept}"))


def _thin_input_convs(model) -> list[str]:
    """Convs reading the graph input with under 8 channels: left fp32.

    MLAS's int8 conv (QLinearConv, NHWC) on 3 input channels is slower than its fp32 NCHWc conv
    (ORT profile on this AVX-512 VNNI CPU: 7.9 vs 5.8 ms per batch of 64); it is also the layer
    most sensitive to quantization.
    """
    inputs = {i.name for i in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    names = []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[0] in inputs and len(n.input) > 1 and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) == 4 and dims[1] < 8:
                names.append(n.name)
    return names


def fp16_model(model):
    """An fp32 ModelProto -> fp16 weights and compute, float32 input/output kept (ONNX Runtime's converter),
    nodes in topological order. Shared by `quantize --precision fp16` and ort-cuda's on-load fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        m16 = convert_float_to_float16(model, keep_io_types=True)
    _toposort(m16.graph)  # the converter appends its input Casts at the end
    return m16


def _ort_fp16(src: Path, dst: Path, calib, method, meta: dict[str, str]) -> None:
    onnx = _onnx()
    onnx.save(fp16_model(onnx.load(str(src))), str(dst))
    _finish_onnx(dst, _stamp(meta, "fp16", "float16 weights and compute, float32 input/output"))


def _toposort(graph) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise InvalidModelError("fp16 conversion produced a graph with a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if n not in ready]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _finish_onnx(path: Path, meta: dict[str, str]) -> None:
    onnx = _onnx()
    from .onnx import add_metadata

    m = onnx.load(str(path))
    add_metadata(m, meta)
    m.producer_name = "edgecnn"
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path))


# ---------------------------------------------------------------------------------------------- OpenVINO
def _ov():
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", "--backend openvino") from None
    return ov


def _ov_model(src: Path):
    ov = _ov()
    m = ov.Core().read_model(str(src))
    m.reshape({m.inputs[0]: ov.PartialShape([-1, *list(m.inputs[0].get_partial_shape())[1:]])})
    return m


def _ov_save(model, dst: Path, meta: dict[str, str]) -> None:
    ov = _ov()
    for k, v in meta.items():  # the openvino runtime reads rt_info['framework'] (as from ONNX metadata)
        model.set_rt_info(v, ["framework", k])
    ov.save_model(model, str(dst), compress_to_fp16=False)


def _openvino_int8(src: Path, dst: Path, calib: np.ndarray, method, meta: dict[str, str]) -> None:
    try:
        import nncf
    except ImportError:
        raise MissingDependencyError("nncf", "quantize", "--backend openvino int8") from None
    model = _ov_model(src)
    ds = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    with _quiet():
        q = nncf.quantize(model, ds, subset_size=len(calib), preset=nncf.QuantizationPreset.PERFORMANCE)
    _ov_save(q, dst, _stamp(meta, "int8", "NNCF post-training quantization (OpenVINO IR), batch axis symbolic"))


def _openvino_fp16(src: Path, dst: Path, calib, method, meta: dict[str, str]) -> None:
    ov = _ov()
    model = _ov_model(src)
    for k, v in _stamp(meta, "fp16", "fp16 weights (OpenVINO IR)").items():
        model.set_rt_info(v, ["framework", k])
    ov.save_model(model, str(dst), compress_to_fp16=True)


@contextlib.contextmanager
def _quiet():
    """Silence the quantizers' progress output and warnings (their results are reported by us)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("nncf", "root", "")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


__all__ = ["QuantizeResult", "default_output", "fp16_model", "quantize"]
