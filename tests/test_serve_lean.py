"""The serve hot path's shortcuts against the long way: the request-header template, the lean head reading
and the aligned copy of binary input. No server, no torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgecnn.runtimes import serve as serve_mod
from edgecnn.runtimes import serve_protocol as sp
from edgecnn.runtimes.serve_model import ServedModel


def _binary(x: np.ndarray, **spec_extra) -> tuple[bytes, str]:
    raw = x.tobytes()
    spec = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "parameters": {"binary_data_size": len(raw)}}], **spec_extra}
    head = json.dumps(spec).encode()
    return head + raw, str(len(head))


def _fields(r: sp.InferRequest) -> tuple:
    return (r.id, r.outputs, r.binary_default, r.parameters,
            [(t.name, t.datatype, t.shape, t.data.dtype, t.data.tobytes()) for t in r.inputs])


@pytest.mark.parametrize("extra", [{}, {"id": "7", "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]},
                                   {"parameters": {"binary_data_output": True}}])
def test_a_known_header_reads_the_same_request_as_a_first_reading(monkeypatch, extra):
    monkeypatch.setattr(sp, "_templates", {})
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(2))
    body_a, hl = _binary(a, **extra)
    body_b, _ = _binary(b, **extra)
    first = sp.parse_infer_request(body_a, hl)  # parsed, and its header kept
    assert len(sp._templates) == 1
    again = sp.parse_infer_request(body_b, hl)  # read from the template: b's own data
    monkeypatch.setattr(sp, "TEMPLATE_HEAD_BYTES", 0)
    long_way = sp.parse_infer_request(body_b, hl)
    assert _fields(again) == _fields(long_way) and _fields(first) != _fields(again)
    again.parameters["x"] = 1  # a caller changing its request does not change the template
    again.outputs and again.outputs.append(None)
    monkeypatch.setattr(sp, "TEMPLATE_HEAD_BYTES", 2048)
    assert _fields(sp.parse_infer_request(body_b, hl)) == _fields(long_way)


def test_a_known_header_with_a_body_of_another_size_gets_the_long_ways_error(monkeypatch):
    monkeypatch.setattr(sp, "_templates", {})
    x = np.zeros((1, 3, 64, 64), np.float32)
    body, hl = _binary(x)
    sp.parse_infer_request(body, hl)
    for bad in (body[:-4], body + b"\0\0\0\0"):
        with pytest.raises(sp.ProtocolError) as e:
            sp.parse_infer_request(bad, hl)
        monkeypatch.setattr(sp, "TEMPLATE_HEAD_BYTES", 0)
        with pytest.raises(sp.ProtocolError) as e2:
            sp.parse_infer_request(bad, hl)
        monkeypatch.setattr(sp, "TEMPLATE_HEAD_BYTES", 2048)
        assert str(e.value) == str(e2.value)


def test_json_and_bytes_inputs_are_never_kept_as_templates(monkeypatch):
    monkeypatch.setattr(sp, "_templates", {})
    sp.parse_infer_request(json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2],
                                                   "data": [1, 2]}]}).encode(), None)
    raw = (3).to_bytes(4, "little") + b"abc"
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    sp.parse_infer_request(head + raw, str(len(head)))
    assert sp._templates == {}


def test_the_lean_head_reading_takes_only_plain_infer_posts():
    t = {b"/v2/models/m/infer"}
    ok = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nInference-Header-Content-Length: 4\r\n\r\n"
    assert serve_mod._lean_head(ok, t) == (10, "4")
    assert serve_mod._lean_head(ok.replace(b"\r\n\r\n", b"\r\nConnection: Keep-Alive\r\n\r\n"), t) == (10, "4")
    refused = [ok.replace(b"POST", b"GET"), ok.replace(b"HTTP/1.1", b"HTTP/1.0"), ok.replace(b"/infer", b"/infer?x=1"),
               ok.replace(b"m/infer", b"n/infer"), ok.replace(b"Content-Length: 10", b"Content-Length: +10"),
               ok.replace(b"Content-Length: 10", b"Content-Length: 0"),
               ok.replace(b"Content-Length: 10", b"Content-Length: %d" % (sp_limit() + 1)),
               ok.replace(b"\r\n\r\n", b"\r\nContent-Length: 10\r\n\r\n"),
               ok.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"),
               ok.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n"),
               ok.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
               ok.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
               ok.replace(b"\r\n\r\n", b"\r\nUpgrade: h2c\r\n\r\n"),
               ok.replace(b"Host: x", b"Host : x"), ok.replace(b"Host: x", b"Host: x\x01"),
               ok.replace(b"Host: x\r\n", b"Host: x\r\n folded\r\n"), ok.replace(b"Content-Length: 10\r\n", b"")]
    for head in refused:
        assert serve_mod._lean_head(head, t) is None, head


def sp_limit() -> int:
    from edgecnn.runtimes.serve_app import INLINE_BODY_BYTES

    return INLINE_BODY_BYTES


def test_binary_input_at_an_odd_offset_is_copied_aligned_with_the_same_values():
    x = np.random.default_rng(5).standard_normal((1, 3, 64, 64)).astype(np.float32)
    raw = b"\0" + x.tobytes()
    odd = np.frombuffer(memoryview(raw)[1:], "<f4").reshape(x.shape)
    assert not odd.flags.aligned
    got = ServedModel.tensor_input(sp.InputTensor("input", "FP32", x.shape, odd))
    assert got.flags.aligned and got.flags.c_contiguous and got.dtype == np.float32 and np.array_equal(got, x)
    bad = x.copy()
    bad[0, 1, 2, 3] = np.nan
    raw = b"\0" + bad.tobytes()
    with pytest.raises(sp.ProtocolError, match="NaN or Inf"):
        ServedModel.tensor_input(sp.InputTensor("input", "FP32", x.shape,
                                                np.frombuffer(memoryview(raw)[1:], "<f4").reshape(x.shape)))
