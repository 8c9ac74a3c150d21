"""The KServe v2 / Open Inference Protocol over HTTP: request parsing and response encoding. Torch-free.

JSON tensors and the binary tensor data extension (what ``tritonclient.http`` sends by default):
the body is the JSON object followed by the tensors' bytes in input order, the
``Inference-Header-Content-Length`` header gives the JSON's length, ``binary_data_size`` each
tensor's; BYTES elements are a 4-byte little-endian length followed by the bytes. Outputs are
binary when ``binary_data`` (per output) or ``binary_data_output`` (per request) asks. The
classification extension (``"classification": k`` on an output) returns BYTES
``"<value>:<index>:<label>"``, k per row, highest first. BYTES elements in JSON are strings: a string
that is valid base64 of an image file (PNG, JPEG, GIF, BMP, WEBP, TIFF magic) is that file, any other
string is its own UTF-8 bytes (Triton's reading). ``Content-Encoding: gzip`` / ``deflate`` bodies are
inflated up to the body size limit (``inflate``).

JSON bodies are read with simdjson when ``pysimdjson`` is installed (the ``serve`` extra has it): a
float input's ``data`` goes straight from the parser into a float64 buffer, with no Python object per
number, which is 2-3x cheaper than orjson plus ``np.asarray`` for a batch-1 image. Anything the
fast path does not take (a document simdjson refuses, a non-float datatype, an element that is not
a number) is read the orjson way, so its errors and values are the same either way.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import orjson

try:  # optional: the fast JSON reader for float tensors (see the module docstring)
    import simdjson as _simdjson
except ImportError:  # pragma: no cover - the serve extra installs it
    _simdjson = None

from edgecnn.errors import InvalidInputError

# v2 datatype <-> numpy; BYTES is handled apart (a list of bytes objects).
NUMPY_OF = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT8": np.int8,
            "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT16": np.uint16, "UINT32": np.uint32,
            "UINT64": np.uint64, "BOOL": np.bool_}


class ProtocolError(InvalidInputError):
    """A request the server refuses, with its HTTP status (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InputTensor:
    """One tensor of a request (and, with ``binary``, of a response: OutputTensor)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output of the model
    binary_default: bool
    parameters: dict = field(default_factory=dict)


def _shape(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def decode_bytes_tensor(raw: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """BYTES binary data: ``count`` elements, each a uint32 little-endian length then the bytes."""
    out, i, n = [], 0, len(raw)
    for _ in range(count):
        if i + 4 > n:
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + size > n:
            raise ProtocolError(f"input {name!r}: BYTES element of {size} bytes runs past the data")
        out.append(bytes(raw[i : i + size]))
        i += size
    if i != n:
        raise ProtocolError(f"input {name!r}: {n - i} bytes left after {count} BYTES elements")
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _flatten_nested(data) -> list:
    out: list = []

    def walk(x, depth):
        if depth > 32:
            raise ProtocolError("tensor data nested too deeply")
        for e in x:
            walk(e, depth + 1) if isinstance(e, list) else out.append(e)

    walk(data, 0)
    return out


def bytes_element(s: str) -> bytes:
    """A JSON BYTES element: base64 of an image file -> that file; any other string -> its UTF-8 bytes."""
    if len(s) >= 8 and len(s) % 4 == 0:
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raw = None
        if raw is not None and (raw.startswith(_IMAGE_MAGIC) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")):
            return raw
    return s.encode("utf-8", "surrogatepass")


_FLOAT_TYPES = ("FP32", "FP64", "FP16")
SIMD_MIN_BYTES = 4096  # a smaller JSON part (a binary request's header) is cheaper to read with orjson


def _plain(v, keep_array: bool = False):
    """A simdjson value -> the Python value orjson would have given (an array kept as its proxy if asked)."""
    if isinstance(v, _simdjson.Object):
        return v.as_dict()
    if isinstance(v, _simdjson.Array):
        return v if keep_array else v.as_list()
    return v


def _simd_request(view) -> dict | None:
    """The request as Python values except each input's 'data' array, left as a simdjson proxy that
    ``_json_input`` reads in one go; None where simdjson does not take the document (orjson decides)."""
    try:
        doc = _simdjson.Parser().parse(view)  # a parser per call: proxies never outlive their parser's reuse
        if not isinstance(doc, _simdjson.Object):
            return None
        keys = list(doc.keys())  # keys and [] keep proxies; items() would convert every value
        if len(set(keys)) != len(keys):
            return None  # [] finds a repeated key's first value, orjson keeps its last: orjson decides
        req = {}
        for k in keys:
            v = doc[k]
            if k == "inputs" and isinstance(v, _simdjson.Array):
                specs = []
                for spec in v:
                    if not isinstance(spec, _simdjson.Object):
                        specs.append(_plain(spec))
                        continue
                    sk = list(spec.keys())
                    if len(set(sk)) != len(sk):
                        return None
                    specs.append({kk: _plain(spec[kk], keep_array=kk == "data") for kk in sk})
                req[k] = specs
            else:
                req[k] = _plain(v)
        return req
    except (ValueError, TypeError, RuntimeError, UnicodeDecodeError, MemoryError, RecursionError):
        return None


def _json_input(spec: dict, name: str, datatype: str, shape: tuple[int, ...]):
    count = math.prod(shape)
    if "data" not in spec:
        raise ProtocolError(f"input {name!r}: no 'data' and no binary_data_size")
    data = spec["data"]
    if _simdjson is not None and isinstance(data, _simdjson.Array):
        if datatype in _FLOAT_TYPES:
            try:  # every element a number (any nesting, flattened in order, as Triton reads it)
                flat = np.frombuffer(data.as_buffer(of_type="d"), np.float64)
            except (ValueError, TypeError, RuntimeError):
                flat = None
            if flat is not None and flat.size == count:
                return flat.astype(NUMPY_OF[datatype]).reshape(shape)
        data = data.as_list()  # the checks below say what is wrong, as for an orjson read
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: 'data' must be a list")
    if datatype == "BYTES":
        flat = _flatten_nested(data)
        if len(flat) != count:
            raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} elements, 'data' has {len(flat)}")
        if not all(isinstance(e, str) for e in flat):
            raise ProtocolError(f"input {name!r}: BYTES elements in JSON must be strings (base64 for images)")
        return [bytes_element(e) for e in flat]
    # One numpy conversion of the nested list (no Python loop over the numbers), then type and range checks.
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(f"input {name!r}: 'data' is ragged or does not hold {datatype} numbers") from None
    if arr.size != count:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} elements, 'data' has {arr.size}")
    want = np.dtype(NUMPY_OF[datatype])
    kind = arr.dtype.kind
    if count and not (kind in "biu" or (kind == "f" and want.kind in "fc") or (kind == "b" and want.kind == "b")):
        raise ProtocolError(f"input {name!r}: 'data' does not hold {datatype} numbers")
    if want.kind == "b" and count and kind != "b":
        raise ProtocolError(f"input {name!r}: BOOL data must be true/false")
    if want.kind in "iu" and count:
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise ProtocolError(f"input {name!r}: a value is outside the {datatype} range")
    return arr.astype(want, copy=False).reshape(shape)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib or raw) request body -> its bytes; more than ``limit`` bytes -> 413."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "x-gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or identity)", 415)
    wbits = 32 + zlib.MAX_WBITS if enc != "deflate" or body[:1] in (b"\x78", b"\x08", b"\x18", b"\x28",
                                                                     b"\x38", b"\x48", b"\x58", b"\x68") else -15
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise ProtocolError(f"the decompressed request body is over the limit of {limit} bytes", 413)
        out += d.flush()
    except zlib.error:
        raise ProtocolError(f"the request body is not valid {enc} data") from None
    if len(out) > limit:
        raise ProtocolError(f"the decompressed request body is over the limit of {limit} bytes", 413)
    if not d.eof:
        raise ProtocolError(f"the {enc} request body is truncated")
    return out


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The body of POST .../infer (and its Inference-Header-Content-Length header) -> an InferRequest."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length is not an integer") from None
        if not 0 < json_len <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {json_len} is outside the body ({len(body)} bytes)")
    else:
        json_len = len(body)
    key = None
    if json_len < len(body) and json_len <= TEMPLATE_HEAD_BYTES:  # a JSON header and binary data
        key = bytes(memoryview(body)[:json_len])
        template = _templates.get(key)
        if template is not None and template[0] == len(body) - json_len:
            return _from_template(template, memoryview(body)[json_len:])
    head = body if json_len == len(body) else memoryview(body)[:json_len]
    req = _simd_request(head) if _simdjson is not None and json_len >= SIMD_MIN_BYTES else None
    if req is None:
        try:
            req = orjson.loads(head)
        except (orjson.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("the request is not a JSON object (binary data needs Inference-Header-Content-Length)") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    binary = memoryview(body)[json_len:]
    offset = 0
    inputs = []
    specs = []  # (name, datatype, shape, dtype, size) while every input is a numeric binary tensor
    for spec in req["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each input needs a 'name'")
        name = spec["name"]
        datatype = spec.get("datatype")
        if datatype != "BYTES" and datatype not in NUMPY_OF:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        shape = _shape(spec.get("shape"), name)
        count = math.prod(shape)
        p = spec.get("parameters") or {}
        size = p.get("binary_data_size") if isinstance(p, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the body")
            raw = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                data = decode_bytes_tensor(raw, count, name)
            else:
                itemsize = np.dtype(NUMPY_OF[datatype]).itemsize
                if size != count * itemsize:
                    raise ProtocolError(f"input {name!r}: shape {list(shape)} of {datatype} needs "
                                        f"{count * itemsize} bytes, binary_data_size is {size}")
                dtype = np.dtype(NUMPY_OF[datatype]).newbyteorder("<")
                data = np.frombuffer(raw, dtype=dtype).reshape(shape)
                if specs is not None:
                    specs.append((name, datatype, shape, dtype, size))
        else:
            data = _json_input(spec, name, datatype, shape)
        if datatype == "BYTES" or size is None:
            specs = None
        inputs.append(InputTensor(name, datatype, shape, data))
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        for o in req["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output needs a 'name'")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise ProtocolError(f"output {o['name']!r}: 'parameters' must be an object")
            k = op.get("classification", 0)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise ProtocolError(f"output {o['name']!r}: classification must be a non-negative integer")
            b = op.get("binary_data")
            outputs.append(RequestedOutput(o["name"], bool(params.get("binary_data_output", False)) if b is None
                                           else bool(b), k))
    rid = req.get("id")
    rid = str(rid) if rid is not None else None
    binary_default = bool(params.get("binary_data_output", False))
    if key is not None and specs:
        if len(_templates) >= TEMPLATES:
            _templates.clear()
        _templates[key] = (offset, tuple(specs), rid, None if outputs is None else tuple(outputs), binary_default,
                           params)
    return InferRequest(rid, inputs, outputs, binary_default, params)


# A client sends the same JSON header with every binary request (the same input, shape and outputs): the
# request it describes, checked once, is kept by the header's bytes, and a later body whose binary part has
# the size that header claims reads its tensors straight from it (a header seen once is parsed as above).
TEMPLATE_HEAD_BYTES = 2048
TEMPLATES = 64
_templates: dict[bytes, tuple] = {}


def _from_template(template: tuple, binary: memoryview) -> InferRequest:
    _, specs, rid, outputs, binary_default, params = template
    inputs, offset = [], 0
    for name, datatype, shape, dtype, size in specs:
        data = np.frombuffer(binary[offset: offset + size], dtype=dtype).reshape(shape)
        inputs.append(InputTensor(name, datatype, shape, data))
        offset += size
    return InferRequest(rid, inputs, None if outputs is None else list(outputs), binary_default, dict(params))


@dataclass
class OutputTensor(InputTensor):
    binary: bool  # sent in the binary part of the body (else as JSON data)


def encode_infer_response(model_name: str, model_version: str, rid: str | None,
                          outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """-> (body, JSON length for Inference-Header-Content-Length, or None when the body is all JSON)."""
    items, blobs = [], []
    for o in outputs:
        item: dict = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if o.binary:
            raw = (encode_bytes_tensor(o.data) if o.datatype == "BYTES"
                   else np.ascontiguousarray(o.data, dtype=np.dtype(NUMPY_OF[o.datatype]).newbyteorder("<")).tobytes())
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif o.datatype == "BYTES":
            item["data"] = [b.decode("utf-8", "replace") for b in o.data]
        else:  # orjson writes the numpy array itself (float32 in its shortest exact form)
            item["data"] = np.ascontiguousarray(o.data).ravel()
        items.append(item)
    resp: dict = {"model_name": model_name, "model_version": model_version, "outputs": items}
    if rid is not None:
        resp["id"] = rid
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def classification(values: np.ndarray, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """Triton's classification extension: per row the top k as b"<value>:<index>:<label>", highest first."""
    k = min(k, values.shape[1])
    out = []
    for row in values:
        idx = np.argsort(-row, kind="stable")[:k]
        out.extend(f"{float(row[i]):.6g}:{int(i)}:{labels[i]}".encode() for i in idx)
    return out
