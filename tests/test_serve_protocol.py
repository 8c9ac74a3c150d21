"""runtimes/serve_protocol: the simdjson reading of JSON requests against the orjson one. No server, no torch."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from edgecnn.runtimes import serve_protocol as sp

simdjson = pytest.importorskip("simdjson")


def _both(body: bytes, monkeypatch) -> tuple:
    """(result or error text) of parse_infer_request with simdjson, then with orjson only."""
    monkeypatch.setattr(sp, "SIMD_MIN_BYTES", 0)  # small documents too take the simdjson reading here
    out = []
    for reader in (simdjson, None):
        monkeypatch.setattr(sp, "_simdjson", reader)
        try:
            r = sp.parse_infer_request(body, None)
            out.append(("ok", r))
        except sp.ProtocolError as e:
            out.append(("error", (str(e), e.status)))
    monkeypatch.setattr(sp, "_simdjson", simdjson)
    return tuple(out)


def _request(data, datatype="FP32", shape=(1, 3, 64, 64), **extra) -> bytes:
    return orjson.dumps({"id": "r-1", "parameters": {"binary_data_output": True},
                         "inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}],
                         "outputs": [{"name": "logits", "parameters": {"classification": 2}}], **extra},
                        option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64"])
@pytest.mark.parametrize("layout", ["flat", "nested", "ints mixed in"])
def test_simdjson_reads_float_tensors_bit_for_bit_as_orjson_does(datatype, layout, monkeypatch):
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32) * 1e3
    x[0, 0, 0, :4] = [3e38, -0.0, 1e-45, 65504.0]
    data = {"flat": x.ravel(), "nested": x.tolist(), "ints mixed in": x.ravel()[:4].tolist()
            + [int(v) for v in x.ravel()[4:104]] + x.ravel()[104:].tolist()}[layout]
    body = _request(data, datatype)
    assert isinstance(sp._simd_request(body)["inputs"][0]["data"], simdjson.Array)  # the fast path is taken
    (k1, fast), (k2, slow) = _both(body, monkeypatch)
    assert k1 == k2 == "ok"
    a, b = fast.inputs[0].data, slow.inputs[0].data
    assert a.dtype == b.dtype == np.dtype(sp.NUMPY_OF[datatype]) and a.shape == b.shape == (1, 3, 64, 64)
    assert a.tobytes() == b.tobytes()
    assert (fast.id, fast.outputs, fast.binary_default, fast.parameters) == \
           (slow.id, slow.outputs, slow.binary_default, slow.parameters)


@pytest.mark.parametrize("data,datatype,shape", [
    ([1.0, "a"], "FP32", [2]),            # a string among the numbers
    ([1.0, None], "FP32", [2]),           # null
    ([1.0, 2.0, 3.0], "FP32", [2]),       # count does not match the shape
    ([[1.0, 2.0], [3.0]], "FP32", [2, 2]),  # too few once flattened
    ([1, 300], "UINT8", [2]),             # integer types keep their range check
    ([True, 2], "BOOL", [2]),
    ([1.5, 2], "INT32", [2]),
    ({"a": 1}, "FP32", [1]),              # data is not a list
])
def test_what_simdjson_does_not_take_fails_with_the_orjson_message(data, datatype, shape, monkeypatch):
    (k1, fast), (k2, slow) = _both(_request(data, datatype, shape), monkeypatch)
    assert k1 == k2 == "error" and fast == slow and fast[1] == 400


@pytest.mark.parametrize("body", [b"{not json", b"[1,2]", b'{"inputs": []}', b'{"inputs": [{"datatype": "FP32"}]}',
                                  b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e400]}]}',
                                  b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
                                  '{"inputs": [{"name": "\udcff"}]}'.encode("utf-8", "surrogatepass")])
def test_documents_simdjson_refuses_get_the_same_answer_as_before(body, monkeypatch):
    (k1, fast), (k2, slow) = _both(body, monkeypatch)
    assert (k1, fast) == (k2, slow) and k1 == "error"


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], '
    b'"inputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [2, 3]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "data": [7]}]}',
])
def test_repeated_keys_keep_the_last_value_as_orjson_does(body, monkeypatch):
    (k1, fast), (k2, slow) = _both(body, monkeypatch)
    assert k1 == k2 == "ok"
    assert [(t.name, t.data.tolist()) for t in fast.inputs] == [(t.name, t.data.tolist()) for t in slow.inputs]
    assert fast.inputs[0].data.tolist() in ([2.0, 3.0], [7.0])


def test_a_json_header_before_binary_data_is_read_by_either_reader(monkeypatch):
    x = np.arange(12, dtype=np.float32).reshape(1, 12)
    monkeypatch.setattr(sp, "SIMD_MIN_BYTES", 0)
    head = json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 12],
                                   "parameters": {"binary_data_size": 48}},
                                  {"name": "b", "datatype": "FP32", "shape": [2], "data": [0.5, 1.5]}]}).encode()
    for reader in (simdjson, None):
        monkeypatch.setattr(sp, "_simdjson", reader)
        r = sp.parse_infer_request(head + x.tobytes(), str(len(head)))
        assert r.inputs[0].data.tobytes() == x.tobytes() and r.inputs[1].data.tolist() == [0.5, 1.5]
