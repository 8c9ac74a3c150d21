"""Refuse ONNX files whose external data escapes the model's folder, before any runtime opens them.

A minimal protobuf wire-format walk (no onnx package: the device has none) over every place a
TensorProto can live: graph initializers, sparse initializers, node attributes, subgraphs, functions.
Covers CVE-2024-27318-style ``../`` and absolute locations, symlinks and hardlinks.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from edgecnn.errors import InvalidModelError

# field numbers from onnx.proto
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_ATTR = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNC_NODE = 7
_TENSOR_EXTERNAL, _TENSOR_LOCATION = 13, 14
_MAX_DEPTH = 64


def _varint(buf, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, value or (start, end) of a length-delimited payload)."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            yield field, wt, v
        elif wt == 1:
            i += 8
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise ValueError("truncated field")
            yield field, wt, (i, i + n)
            i += n
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"bad wire type {wt}")
    if i != end:
        raise ValueError("truncated message")


def _tensor_locations(buf, span, out: list[str]) -> None:
    external = False
    locs = []
    for f, wt, v in _fields(buf, *span):
        if f == _TENSOR_LOCATION and wt == 0:
            external = v == 1
        elif f == _TENSOR_EXTERNAL and wt == 2:
            key = val = None
            for ef, ewt, ev in _fields(buf, *v):
                if ewt == 2 and ef in (1, 2):
                    text = bytes(buf[ev[0] : ev[1]]).decode("utf-8", "replace")
                    key, val = (text, val) if ef == 1 else (key, text)
            if key == "location" and val is not None:
                locs.append(val)
    if external or locs:
        out.extend(locs or ["<external data without a location>"])


def _graph(buf, span, out, depth):
    if depth > _MAX_DEPTH:
        raise ValueError("graph nesting too deep")
    for f, wt, v in _fields(buf, *span):
        if wt != 2:
            continue
        if f == _GRAPH_INIT:
            _tensor_locations(buf, v, out)
        elif f == _GRAPH_SPARSE_INIT:
            _sparse(buf, v, out)
        elif f == _GRAPH_NODE:
            _node(buf, v, out, depth)


def _sparse(buf, span, out):
    for f, wt, v in _fields(buf, *span):
        if wt == 2 and f in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor_locations(buf, v, out)


def _node(buf, span, out, depth):
    for f, wt, v in _fields(buf, *span):
        if f != _NODE_ATTR or wt != 2:
            continue
        for af, awt, av in _fields(buf, *v):
            if awt != 2:
                continue
            if af in (_ATTR_T, _ATTR_TENSORS):
                _tensor_locations(buf, av, out)
            elif af in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(buf, av, out)
            elif af in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, av, out, depth + 1)


def external_data_locations(path: str | os.PathLike) -> list[str]:
    """Every external-data ``location`` an ONNX file refers to (raises InvalidModelError if unparsable)."""
    path = Path(path)
    out: list[str] = []
    size = path.stat().st_size
    if size == 0:
        raise InvalidModelError(f"{path}: empty file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            for fld, wt, v in _fields(buf, 0, size):
                if wt != 2:
                    continue
                if fld == _MODEL_GRAPH:
                    _graph(buf, v, out, 0)
                elif fld == _MODEL_FUNCTIONS:
                    for ff, fwt, fv in _fields(buf, *v):
                        if ff == _FUNC_NODE and fwt == 2:
                            _node(buf, fv, out, 0)
        except (ValueError, IndexError):
            raise InvalidModelError(f"{path}: not a valid ONNX file (corrupt or truncated protobuf)") from None
        finally:
            buf.release()
    return out


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse external data outside the model's folder: absolute, ``..``, symlinks, hardlinks."""
    path = Path(path)
    base = path.resolve().parent
    for loc in external_data_locations(path):
        where = f"{path}: external data {loc!r}"
        if not loc or loc.startswith("<") or "\x00" in loc:
            raise InvalidModelError(f"{where} has no usable location")
        p = Path(loc)
        if p.is_absolute() or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise InvalidModelError(f"{where} is an absolute path; refused")
        if ".." in p.parts or ".." in loc.replace("\\", "/").split("/"):
            raise InvalidModelError(f"{where} leaves the model's folder; refused")
        full = base / p
        probe = base
        for part in p.parts:
            probe = probe / part
            if probe.is_symlink():
                raise InvalidModelError(f"{where} goes through a symlink; refused")
        if not full.is_file():
            raise InvalidModelError(f"{where} does not exist")
        if base not in full.resolve().parents:
            raise InvalidModelError(f"{where} resolves outside the model's folder; refused")
        if full.stat().st_nlink > 1:
            raise InvalidModelError(f"{where} is a hardlink; refused")
