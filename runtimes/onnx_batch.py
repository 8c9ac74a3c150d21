"""Make a fixed batch axis symbolic in an ONNX file without the onnx package (for the server's batches).

The default export has a fixed ``[1,3,64,64]`` input, so ``Runtime.run`` feeds larger batches row by
row. ``relax_batch_bytes`` rewrites the first dimension of every graph input and output to the
symbolic ``batch`` (the same edit ``edgecnn.bench.relax_batch`` makes with the onnx package) by
re-encoding only the protobuf messages on that path; every other byte is copied as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edgecnn.errors import InvalidModelError

from .onnx_guard import _varint, external_data_locations

# onnx.proto field numbers: ModelProto.graph, GraphProto.input/output, ValueInfoProto.type,
# TypeProto.tensor_type, TypeProto.Tensor.shape, TensorShapeProto.dim, Dimension.dim_param
_MODEL_GRAPH, _GRAPH_INPUT, _GRAPH_OUTPUT = 7, 11, 12
_VI_TYPE, _TYPE_TENSOR, _TENSOR_SHAPE, _SHAPE_DIM = 2, 1, 2, 1
_DIM_PARAM = 2
BATCH_PARAM = "batch"


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _raw_fields(buf, start: int, end: int):
    """Yield (field, wire type, raw start, raw end, payload span for length-delimited fields or None)."""
    i = start
    while i < end:
        raw = i
        key, i = _varint(buf, i)
        field, wt = key >> 3, key & 7
        span = None
        if wt == 0:
            _, i = _varint(buf, i)
        elif wt == 1:
            i += 8
        elif wt == 2:
            n, i = _varint(buf, i)
            span = (i, i + n)
            i += n
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"bad wire type {wt}")
        if i > end:
            raise ValueError("truncated field")
        yield field, wt, raw, i, span


Edit = Callable[[memoryview, tuple[int, int], int], "bytes | None"]


def _rewrite(buf, span: tuple[int, int], edits: dict[int, Edit]) -> bytes:
    """The message buf[span] re-encoded: a length-delimited field in ``edits`` gets the payload its
    function returns (called with the payload span and the field's occurrence index); the rest is copied."""
    out = bytearray()
    seen: dict[int, int] = {}
    for field, wt, raw, end, payload in _raw_fields(buf, *span):
        if wt == 2 and field in edits:
            k = seen.get(field, 0)
            seen[field] = k + 1
            new = edits[field](buf, payload, k)
            if new is not None:
                out += _varint_bytes(field << 3 | 2) + _varint_bytes(len(new)) + new
                continue
        out += bytes(buf[raw:end])
    return bytes(out)


def _symbolic_dim(buf, span, k) -> bytes | None:
    if k != 0:
        return None  # only the first (batch) dimension
    name = BATCH_PARAM.encode()
    return _varint_bytes(_DIM_PARAM << 3 | 2) + _varint_bytes(len(name)) + name


def _shape(buf, span, k):
    return _rewrite(buf, span, {_SHAPE_DIM: _symbolic_dim})


def _tensor_type(buf, span, k):
    return _rewrite(buf, span, {_TENSOR_SHAPE: _shape})


def _type(buf, span, k):
    return _rewrite(buf, span, {_TYPE_TENSOR: _tensor_type})


def _value_info(buf, span, k):
    return _rewrite(buf, span, {_VI_TYPE: _type})


def _graph(buf, span, k):
    return _rewrite(buf, span, {_GRAPH_INPUT: _value_info, _GRAPH_OUTPUT: _value_info})


def relax_batch_bytes(data: bytes) -> bytes:
    """An ONNX ModelProto's bytes with the first axis of every graph input and output made symbolic."""
    buf = memoryview(data)
    try:
        return _rewrite(buf, (0, len(data)), {_MODEL_GRAPH: _graph})
    except (ValueError, IndexError):
        raise InvalidModelError("not a valid ONNX file (corrupt or truncated protobuf)") from None


def relax_batch_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` with a symbolic batch axis to ``dst``. Models with external data are refused
    (the copy would lose its data files)."""
    src, dst = Path(src), Path(dst)
    if external_data_locations(src):
        raise InvalidModelError(f"{src}: has external data; its batch axis cannot be relaxed in a copy")
    dst.write_bytes(relax_batch_bytes(src.read_bytes()))
    return dst
