"""What is this model file? One description, read once from the file itself: format, input, output,
precision (from the graph, never from what the metadata claims), metadata and sha256.

Torch-free and onnx-free (a protobuf wire-format walk for ONNX, ElementTree for OpenVINO IR), so the
device side (bench, Classifier, bundles) and the judge (`edgecnn.verify`) share it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from edgecnn.errors import InvalidModelError

from .onnx_guard import _fields

# onnx.proto field numbers
_M_GRAPH, _M_META = 7, 14
_G_NODE, _G_INIT, _G_INPUT, _G_OUTPUT = 1, 5, 11, 12
_N_OP, _N_ATTR = 4, 5
_A_NAME, _A_I = 1, 3
_T_DIMS, _T_DTYPE, _T_FLOAT_DATA, _T_NAME, _T_RAW = 1, 2, 4, 8, 9
_VI_NAME, _VI_TYPE = 1, 2
_TP_TENSOR = 1
_TT_ELEM, _TT_SHAPE = 1, 2
_SH_DIM = 1
_D_VALUE, _D_PARAM = 1, 2
_KV_KEY, _KV_VALUE = 1, 2

# TensorProto.DataType -> name
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 16: "bfloat16"}
_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QGemm"}
# OpenVINO IR element types
_IR_DTYPES = {"f32": "float32", "u8": "uint8", "f16": "float16", "bf16": "bfloat16", "i8": "int8"}
FORMATS = {".onnx": "onnx", ".xml": "openvino-ir"}


@dataclass(frozen=True)
class ModelArtifact:
    """A model file as it is: what runs it, what it takes and gives, what it computes in."""

    path: Path
    format: str  # "onnx" | "openvino-ir"
    sha256: str
    input_name: str
    input_dtype: str  # "float32" | "uint8" | ...
    input_shape: tuple  # as declared; None for a symbolic axis
    output_shape: tuple
    precision: str  # from the graph: "fp32" | "fp16" | "bf16" | "int8"
    precision_evidence: str  # what in the graph decided it
    metadata: dict = field(default_factory=dict)
    nonfinite: tuple = ()  # names of float initializers holding NaN or Inf

    @property
    def input_layout(self) -> str:
        """"NHWC-uint8" (preprocessing inside the graph) or "NCHW" (float32, normalized)."""
        return "NHWC-uint8" if self.input_dtype == "uint8" else "NCHW"

    @property
    def embedded_preprocessing(self) -> bool:
        return self.input_layout == "NHWC-uint8"

    @property
    def embedded_softmax(self) -> bool:
        return self.metadata.get("embedded_softmax") == "1"

    @property
    def claimed_precision(self) -> str | None:
        """What the file's metadata says about itself: information, never a reason to judge it more loosely."""
        return self.metadata.get("precision")

    @property
    def num_classes(self) -> int | None:
        w = self.output_shape[-1] if self.output_shape else None
        return w if isinstance(w, int) else None

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0] if self.input_shape else None

    def as_dict(self) -> dict:
        return {"file": self.path.name, "format": self.format, "sha256": self.sha256,
                "input": {"name": self.input_name, "dtype": self.input_dtype, "shape": list(self.input_shape),
                          "layout": self.input_layout},
                "output_shape": list(self.output_shape), "precision": self.precision,
                "precision_evidence": self.precision_evidence}


def describe(path: str | os.PathLike) -> ModelArtifact:
    """Read ``path`` once: raises InvalidModelError when it is not a readable ONNX / OpenVINO IR file."""
    path = Path(path)
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such model file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        what = " (a PyTorch checkpoint: export it first, or give it as --against)" \
            if path.suffix.lower() in (".pt", ".pth") else ""
        raise InvalidModelError(f"{path}: not an exported model (.onnx or OpenVINO .xml){what}")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: empty file")
    # A runtime load, the judge and package each describe the same file: it is read and hashed once
    # while it stays the same file (inode, size and mtime of the model and, for an IR, its .bin).
    files = (path,) if fmt == "onnx" else (path, path.with_suffix(".bin"))
    return _describe(str(path), fmt, tuple(_stamp(f) for f in files))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@lru_cache(maxsize=32)
def _describe(path: str, fmt: str, stamps: tuple) -> ModelArtifact:
    return _onnx(Path(path)) if fmt == "onnx" else _ir(Path(path))


# ---------------------------------------------------------------------------------------------- ONNX
def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _value_info(buf, span) -> tuple[str, str, tuple]:
    name, dtype, shape = "", "?", ()
    for f, wt, v in _fields(buf, *span):
        if f == _VI_NAME and wt == 2:
            name = _text(buf, v)
        elif f == _VI_TYPE and wt == 2:
            for tf, twt, tv in _fields(buf, *v):
                if tf != _TP_TENSOR or twt != 2:
                    continue
                dims = []
                for ef, ewt, ev in _fields(buf, *tv):
                    if ef == _TT_ELEM and ewt == 0:
                        dtype = _DTYPES.get(ev, f"type{ev}")
                    elif ef == _TT_SHAPE and ewt == 2:
                        for sf, swt, sv in _fields(buf, *ev):
                            if sf != _SH_DIM or swt != 2:
                                continue
                            d = None
                            for df, dwt, dv in _fields(buf, *sv):
                                if df == _D_VALUE and dwt == 0:
                                    d = dv if dv > 0 else None
                            dims.append(d)
                shape = tuple(dims)
    return name, dtype, shape


def _onnx(path: Path) -> ModelArtifact:
    h = hashlib.sha256()
    meta: dict[str, str] = {}
    ops: set[str] = set()
    casts: set[int] = set()
    init_types: set[int] = set()
    init_names: set[str] = set()
    inputs: list[tuple] = []
    outputs: list[tuple] = []
    bad: list[str] = []
    size = path.stat().st_size
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            h.update(buf)
            has_graph = False
            for f, wt, v in _fields(buf, 0, size):
                if f == _M_META and wt == 2:
                    key = val = ""
                    for kf, kwt, kv in _fields(buf, *v):
                        if kwt == 2 and kf == _KV_KEY:
                            key = _text(buf, kv)
                        elif kwt == 2 and kf == _KV_VALUE:
                            val = _text(buf, kv)
                    meta[key] = val
                elif f == _M_GRAPH and wt == 2:
                    has_graph = True
                    for gf, gwt, gv in _fields(buf, *v):
                        if gwt != 2:
                            continue
                        if gf == _G_NODE:
                            op, to = "", None
                            for nf, nwt, nv in _fields(buf, *gv):
                                if nf == _N_OP and nwt == 2:
                                    op = _text(buf, nv)
                                elif nf == _N_ATTR and nwt == 2:
                                    aname, ai = "", None
                                    for af, awt, av in _fields(buf, *nv):
                                        if af == _A_NAME and awt == 2:
                                            aname = _text(buf, av)
                                        elif af == _A_I and awt == 0:
                                            ai = av
                                    if aname == "to":
                                        to = ai
                            ops.add(op)
                            if op == "Cast" and to is not None:
                                casts.add(to)
                        elif gf == _G_INIT:
                            tname, ttype, payload = "", None, []
                            for tf, twt, tv in _fields(buf, *gv):
                                if tf == _T_DTYPE and twt == 0:
                                    ttype = tv
                                    init_types.add(tv)
                                elif tf == _T_NAME and twt == 2:
                                    tname = _text(buf, tv)
                                    init_names.add(tname)
                                elif tf in (_T_RAW, _T_FLOAT_DATA) and twt == 2:
                                    payload.append((tf, tv))
                            if ttype in _FLOAT_NP and not _finite(buf, ttype, payload):
                                bad.append(tname)
                        elif gf == _G_INPUT:
                            inputs.append(_value_info(buf, gv))
                        elif gf == _G_OUTPUT:
                            outputs.append(_value_info(buf, gv))
        except (ValueError, IndexError):
            raise InvalidModelError(f"{path}: not a valid ONNX file (corrupt or truncated protobuf)") from None
        finally:
            buf.release()
    if not has_graph:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph)")
    inputs = [i for i in inputs if i[0] not in init_names]  # IR < 4 lists initializers as inputs too
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidModelError(f"{path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    if ops & _INT8_OPS:
        precision, why = "int8", "quantization ops (" + ", ".join(sorted(ops & _INT8_OPS)) + ")"
    elif 10 in init_types or 10 in casts:
        precision, why = "fp16", "float16 " + ("initializers" if 10 in init_types else "casts")
    elif 16 in init_types or 16 in casts:
        precision, why = "bf16", "bfloat16 " + ("initializers" if 16 in init_types else "casts")
    else:
        precision, why = "fp32", "float32 weights, no quantization ops"
    (iname, idtype, ishape), (_, _, oshape) = inputs[0], outputs[0]
    return ModelArtifact(path, "onnx", h.hexdigest(), iname, idtype, ishape, oshape, precision, why, meta,
                         tuple(bad))


_FLOAT_NP = {1: "<f4", 10: "<f2", 11: "<f8"}


def _finite(buf, dtype: int, payload: list) -> bool:
    """Whether a float initializer's values (raw_data, or packed float_data for float32) are all finite."""
    import numpy as np

    for tf, (a, b) in payload:
        if tf == _T_RAW:
            item = np.dtype(_FLOAT_NP[dtype]).itemsize
            vals = np.frombuffer(bytes(buf[a:b - (b - a) % item]), _FLOAT_NP[dtype])
        elif dtype == 1:
            vals = np.frombuffer(bytes(buf[a:b - (b - a) % 4]), "<f4")
        else:
            continue
        if not np.isfinite(vals).all():
            return False
    return True


# ---------------------------------------------------------------------------------------------- OpenVINO IR
def _ir(path: Path) -> ModelArtifact:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError) as e:
        raise InvalidModelError(f"{path}: not a readable OpenVINO IR file ({type(e).__name__})") from None
    if root.tag != "net":
        raise InvalidModelError(f"{path}: not an OpenVINO IR file (root <{root.tag}>)")
    h = hashlib.sha256(path.read_bytes())
    bin_path = path.with_suffix(".bin")
    if bin_path.is_file():
        h.update(bin_path.read_bytes())
    layers = root.findall("layers/layer")
    params = [ly for ly in layers if ly.get("type") == "Parameter"]
    results = [ly for ly in layers if ly.get("type") == "Result"]
    if len(params) != 1 or len(results) != 1:
        raise InvalidModelError(f"{path}: expected one input and one output, got {len(params)} and {len(results)}")

    def shape_of(port) -> tuple:
        out = []
        for d in port.findall("dim") if port is not None else []:
            try:
                out.append(int(d.text) if int(d.text) > 0 else None)
            except (TypeError, ValueError):
                out.append(None)
        return tuple(out)

    p = params[0]
    data = p.find("data")
    idtype = _IR_DTYPES.get(data.get("element_type", "") if data is not None else "", "?")
    ishape = shape_of(p.find("output/port"))
    oshape = shape_of(results[0].find("input/port"))
    types = {ly.get("type") for ly in layers}
    const_types = {(ly.find("data").get("element_type") if ly.find("data") is not None else None)
                   for ly in layers if ly.get("type") == "Const"}
    if "FakeQuantize" in types or const_types & {"i8", "u8"}:
        precision, why = "int8", "FakeQuantize / int8 weights"
    elif "f16" in const_types:
        precision, why = "fp16", "float16 weights"
    elif "bf16" in const_types:
        precision, why = "bf16", "bfloat16 weights"
    else:
        precision, why = "fp32", "float32 weights, no FakeQuantize"
    meta: dict[str, str] = {}
    for section in ("framework", "edgecnn"):
        for node in root.findall(f"rt_info/{section}/*"):
            if node.get("value") is not None:
                meta.setdefault(node.tag, node.get("value"))
    return ModelArtifact(path, "openvino-ir", h.hexdigest(), p.get("name", ""), idtype, ishape, oshape,
                         precision, why, meta)
