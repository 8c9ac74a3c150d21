"""`edgecnn serve`: the real server in a subprocess on a free loopback port, called with tritonclient and plain HTTP."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from edgecnn.runtimes import Classifier
from edgecnn.runtimes.cpu import current_defaults, usable_cpus
from PIL import Image

from edgecnn.data import synthetic_dataset

RTOL, ATOL = 1e-3, 1e-5  # fp32 tolerance (ARCHITECTURE.md)
START_TIMEOUT = 90  # seconds: the server loads the model, then must answer /v2/health/ready

# Runs the CLI with torch and onnx blocked: the server is part of the torch-free device package.
_LAUNCH = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
           "from edgecnn.cli import main; sys.argv = ['edgecnn'] + sys.argv[1:]; main()")


class Server:
    def __init__(self, model: Path, log: Path, *args: str):
        self.log = log
        self._f = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, "serve", str(model), "--host", "127.0.0.1",
                                      "--port", "0", *args], stdout=self._f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        self.port = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            if m:
                self.port = int(m.group(1))
                try:
                    if self.get("/v2/health/ready")[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server did not become ready: {log.read_text()}")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes, dict]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._f.close()
        return rc


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    s = Server(trained.onnx, tmp_path_factory.mktemp("serve") / "server.log", "--max-batch", "16",
               "--max-delay-ms", "5", "--max-body-mb", "1", "--instances", "2")
    yield s
    rc = s.stop()
    assert rc == 0, s.log.read_text()


@pytest.fixture(scope="module")
def clf(trained):
    with Classifier(trained.onnx) as c:
        yield c


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _json_infer(x: np.ndarray, name: str = "input") -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def test_tritonclient_binary_and_json_tensors_match_classifier(server, clf):
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    want = clf.run(x)
    client = triton.InferenceServerClient(server.url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("model")
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = triton.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                res = client.infer("model", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary_out)])
                got = res.as_numpy("logits")
                assert got.shape == (3, 6) and got.dtype == np.float32
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        # No outputs named: tritonclient asks for every output in binary (binary_data_output).
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("model", [inp], request_id="req-7")
        assert res.get_response()["id"] == "req-7"
        np.testing.assert_allclose(res.as_numpy("logits"), want, rtol=RTOL, atol=ATOL)
        probs = res.as_numpy("probabilities")
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        assert (probs.argmax(1) == want.argmax(1)).all()
    finally:
        client.close()


def test_tritonclient_image_bytes_and_top_k_labels(server, clf):
    ds = synthetic_dataset(1, seed=3)
    blobs = [_png(im) for im in ds.images[:4]]
    want = clf.run(clf.preprocess([Image.open(io.BytesIO(b)) for b in blobs]))
    top = clf.classify([Image.open(io.BytesIO(b)) for b in blobs], top_k=2)
    client = triton.InferenceServerClient(server.url)
    try:
        inp = triton.InferInput("images", [len(blobs)], "BYTES")
        inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        res = client.infer("model", [inp], outputs=[triton.InferRequestedOutput("logits"),
                                                   triton.InferRequestedOutput("probabilities", class_count=2)])
        np.testing.assert_allclose(res.as_numpy("logits"), want, rtol=RTOL, atol=ATOL)
        labels = res.as_numpy("probabilities")  # classification extension: b"<prob>:<index>:<label>"
        assert labels.shape == (4, 2)
        for row, expect in zip(labels, top, strict=True):
            parsed = [s.decode().split(":") for s in row]
            assert [p[2] for p in parsed] == [label for label, _ in expect]
            np.testing.assert_allclose([float(p[0]) for p in parsed], [p for _, p in expect], rtol=1e-4)
            assert [clf.class_names[int(p[1])] for p in parsed] == [p[2] for p in parsed]
    finally:
        client.close()


def test_plain_http_health_metadata_and_json_infer(server, clf):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/model/ready", "/v2/models/model/versions/1/ready"):
        assert server.get(path)[0] == 200, path
    status, body, _ = server.get("/v2")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "edgecnn" and "binary_tensor_data" in meta["extensions"]
    status, body, _ = server.get("/v2/models/model")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "model" and meta["versions"] == ["1"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]} in meta["inputs"]
    assert {"name": "images", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 6]} in meta["outputs"]
    assert meta["platform"] == "onnx_onnxv1"
    assert json.loads(meta["parameters"]["class_names"]) == list(clf.class_names)  # parameters: scalars only
    # --instances 2 without -O threads: the usable CPUs are split between the two instances
    assert meta["parameters"]["instances"] == 2 and meta["parameters"]["threads"] == max(1, usable_cpus() // 2)
    # ...a request that runs alone still gets every usable CPU; a call takes the CPU kind's rows (or max batch)
    assert meta["parameters"]["lone_threads"] == usable_cpus()
    assert meta["parameters"]["call_rows"] == min(16, current_defaults().serve_call_rows or 16)
    # The default export has a fixed batch of 1: served through a copy with a symbolic batch axis.
    assert meta["parameters"]["batching"].startswith("dynamic")
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    status, body, headers = server.request("POST", "/v2/models/model/infer", _json_infer(x),
                                           {"Content-Type": "application/json"})
    assert status == 200, body
    assert "inference-header-content-length" not in headers
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert out["logits"]["shape"] == [2, 6] and out["logits"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.asarray(out["logits"]["data"], np.float32).reshape(2, 6), clf.run(x),
                               rtol=RTOL, atol=ATOL)
    # JSON BYTES: base64 strings (raw image bytes are not valid JSON strings).
    png = _png(synthetic_dataset(1, seed=4).images[0])
    req = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}],
           "outputs": [{"name": "logits"}]}
    status, body, _ = server.request("POST", "/v2/models/model/infer", json.dumps(req).encode())
    assert status == 200, body
    got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32).reshape(1, 6)
    np.testing.assert_allclose(got, clf.run(clf.preprocess([Image.open(io.BytesIO(png))])), rtol=RTOL, atol=ATOL)
    with urllib.request.urlopen(f"http://{server.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for name in ("edgecnn_requests_total", "edgecnn_request_duration_seconds_bucket", "edgecnn_batch_size_bucket",
                 "edgecnn_queue_seconds_bucket", "edgecnn_request_errors_total"):
        assert name in text, name


def _binary_request(x: np.ndarray, name: str = "input", datatype: str = "FP32", size: int | None = None):
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape),
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _bad_requests() -> dict[str, tuple[str, bytes, dict, int]]:
    good = np.zeros((1, 3, 64, 64), np.float32)
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    img = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 12}}]}).encode()
    cases = {
        "wrong shape": ("model", *_binary_request(np.zeros((1, 3, 32, 32), np.float32)), 400),
        "wrong datatype": ("model", *_binary_request(np.zeros((1, 3, 64, 64), np.float64), datatype="FP64"), 400),
        "NaN input": ("model", *_binary_request(nan), 400),
        "unknown input": ("model", *_binary_request(good, name="pixels"), 400),
        "size mismatch": ("model", *_binary_request(good, size=100), 400),
        "not JSON": ("model", b"{not json", {}, 400),
        "undecodable image": ("model", img + (8).to_bytes(4, "little") + b"notajpeg",
                              {"Inference-Header-Content-Length": str(len(img))}, 400),
        "unknown model": ("nosuchmodel", *_binary_request(good), 404),
    }
    return cases


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_requests_get_4xx_with_a_json_error_and_the_server_keeps_serving(server, clf, case):
    model, body, headers, want = _bad_requests()[case]
    status, resp, _ = server.request("POST", f"/v2/models/{model}/infer", body, headers)
    assert status == want, resp
    assert json.loads(resp)["error"]
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    status, resp, _ = server.request("POST", "/v2/models/model/infer", _json_infer(x))
    assert status == 200
    np.testing.assert_allclose(np.asarray(json.loads(resp)["outputs"][0]["data"], np.float32).reshape(1, 6),
                               clf.run(x), rtol=RTOL, atol=ATOL)


def _load(port: int, n_clients: int, per_client: int, inputs: np.ndarray, deadline: float, bad_every: int = 0,
          stop_on_error: bool = False, done: list | None = None) -> list[list[tuple[int, int, bytes | None]]]:
    """n_clients threads, each on its own keep-alive connection, sending per_client batch-1 requests
    (client c, request i -> inputs[(c * per_client + i) % len(inputs)]); every bad_every-th request is
    malformed. Returns per client [(input index or -1 for malformed, status or -1 for a connection error,
    body)]; ``done`` gets one item per answer as they come."""
    results: list[list] = [[] for _ in range(n_clients)]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for i in range(per_client):
                if time.monotonic() > deadline:
                    return
                k = (c * per_client + i) % len(inputs)
                if bad_every and i % bad_every == bad_every - 1:
                    body, headers = _binary_request(np.zeros((1, 3, 63, 64), np.float32))
                    k = -1
                else:
                    body, headers = _binary_request(inputs[k : k + 1])
                try:
                    conn.request("POST", "/v2/models/model/infer", body=body, headers=headers)
                    r = conn.getresponse()
                    results[c].append((k, r.status, r.read()))
                    if done is not None:
                        done.append(1)
                except (OSError, http.client.HTTPException):
                    results[c].append((k, -1, None))
                    if stop_on_error:
                        return
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 30))
    assert not any(t.is_alive() for t in threads), "load test clients did not finish in time"
    return results


def _check_answer(body: bytes, want: np.ndarray) -> None:
    resp = json.loads(body)
    logits = next(o for o in resp["outputs"] if o["name"] == "logits")
    np.testing.assert_allclose(np.asarray(logits["data"], np.float32).reshape(want.shape), want, rtol=RTOL, atol=ATOL)


def test_concurrent_load_every_caller_gets_its_own_rows_and_bad_requests_do_not_disturb(server, clf):
    n_clients, per_client = 16, 12
    inputs = np.random.default_rng(5).standard_normal((n_clients * per_client, 3, 64, 64)).astype(np.float32)
    want = clf.run(inputs)
    assert len({tuple(np.round(r, 4)) for r in want}) == len(want)  # distinct answers: a mix-up would show
    before = _batch_stats(server)
    results = _load(server.port, n_clients, per_client, inputs, time.monotonic() + 120, bad_every=4)
    good = bad = 0
    for per in results:
        assert len(per) == per_client  # none lost
        for k, status, body in per:
            if k == -1:
                assert status == 400 and json.loads(body)["error"]
                bad += 1
            else:
                assert status == 200, body
                _check_answer(body, want[k : k + 1])
                good += 1
    assert good == n_clients * 9 and bad == n_clients * 3
    total, count = (a - b for a, b in zip(_batch_stats(server), before, strict=True))
    assert count >= 1 and total == good  # every good row went through the model exactly once
    assert total / count > 1.0, "no two requests were ever batched together"


def _batch_stats(server) -> tuple[float, float]:
    text = server.get("/metrics")[1].decode()
    s = float(re.search(r"^edgecnn_batch_size_sum (\S+)$", text, re.M).group(1))
    c = float(re.search(r"^edgecnn_batch_size_count (\S+)$", text, re.M).group(1))
    return s, c


def test_sigterm_during_load_finishes_every_accepted_request_and_exits_0(trained, clf, tmp_path):
    s = Server(trained.onnx, tmp_path / "server.log", "--max-batch", "8", "--max-delay-ms", "20")
    n_clients, per_client = 8, 100_000  # bounded by the signal, the deadline, and this count
    inputs = np.random.default_rng(6).standard_normal((256, 3, 64, 64)).astype(np.float32)
    want = clf.run(inputs)
    box: dict = {}
    done: list = []
    t = threading.Thread(target=lambda: box.update(r=_load(s.port, n_clients, per_client, inputs,
                                                           time.monotonic() + 60, stop_on_error=True, done=done)))
    t.start()
    wait_until = time.monotonic() + 60
    while len(done) < 50 and time.monotonic() < wait_until:  # load is flowing
        time.sleep(0.02)
    rc = s.stop()
    t.join(120)
    assert not t.is_alive()
    assert rc == 0, s.log.read_text()
    answered = 0
    for per in box["r"]:
        for k, status, body in per:
            if status == -1:
                continue  # refused or closed before the server read it: never accepted
            assert status == 200, body
            _check_answer(body, want[k : k + 1])
            answered += 1
    m = re.search(r"stopped; (\d+) inference requests accepted \((\d+) without a task, (\d+) of them read by the "
                  r"lean parser\), (\d+) answered",
                  s.log.read_text())
    assert m, s.log.read_text()
    accepted, untasked, lean, served = (int(g) for g in m.groups())
    assert accepted == served == answered > 0
    assert untasked >= lean > 0  # small binary bodies take the lean, task-free path, and it drains on SIGTERM too
    # The signal landed mid-load: every client was still sending when the server went away.
    assert all(per and per[-1][1] == -1 for per in box["r"])


def test_bad_model_busy_port_and_missing_server_package_fail_cleanly(trained, tmp_path, run_cli, monkeypatch):
    (tmp_path / "x.onnx").write_bytes(b"garbage")
    r = run_cli("serve", tmp_path / "x.onnx", "--port", "0")
    assert r.exit_code == 2 and "edgecnn: error:" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", trained.onnx, "--max-batch", "0")
    assert r.exit_code == 2 and "--max-batch" in r.stderr
    r = run_cli("serve", trained.onnx, "--call-rows", "0")
    assert r.exit_code == 2 and "--call-rows must be >= 1" in r.stderr and "Traceback" not in r.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli("serve", trained.onnx, "--port", str(busy.getsockname()[1]))
    assert r.exit_code == 2 and "cannot listen" in r.stderr
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails
    r = run_cli("serve", trained.onnx, "--port", "0")
    assert r.exit_code == 3 and "pip install 'edgecnn[serve]'" in r.stderr


def test_relaxed_batch_copy_is_the_onnx_package_edit_byte_for_byte(trained, tmp_path):
    import onnx
    from edgecnn.runtimes.onnx_batch import relax_batch_file

    relax_batch_file(trained.onnx, tmp_path / "r.onnx")
    m = onnx.load(str(trained.onnx))
    for vi in list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.ClearField("dim_value")
        d.dim_param = "batch"
    assert (tmp_path / "r.onnx").read_bytes() == m.SerializeToString()
    onnx.checker.check_model(onnx.load(str(tmp_path / "r.onnx")), full_check=True)


def test_served_model_from_a_bundle_a_deploy_config_and_without_relaxing(trained, tmp_path):
    from edgecnn.runtimes.serve import ServeConfig, ServedModel

    from edgecnn.errors import InvalidInputError
    from edgecnn.package import build_bundle

    bundle = tmp_path / "bundle"
    build_bundle([trained.onnx], bundle)
    (tmp_path / "deploy.json").write_text(json.dumps({"format": "edgecnn-deploy/1", "model": "bundle/model.onnx",
                                                      "runtime": "ort-cpu", "threads": 1}))
    x = np.random.default_rng(8).standard_normal((5, 3, 64, 64)).astype(np.float32)
    with Classifier(trained.onnx) as ref:
        want = ref.run(x)
    for source, relax, batching in ((bundle, True, "dynamic"), (tmp_path / "deploy.json", True, "dynamic"),
                                    (trained.onnx, False, "fixed batch 1: batches run row by row"),
                                    (trained.onnx_dynamic, True, "dynamic")):
        m = ServedModel(source, relax=relax)
        try:
            assert m.batching.startswith(batching) and m.name in ("model", "model_dynamic")
            assert m.metadata(ServeConfig())["parameters"]["batching"] == m.batching
            np.testing.assert_allclose(m.clf.run(x), want, rtol=RTOL, atol=ATOL)
            if source == tmp_path / "deploy.json":
                assert m.clf.runtime.threads == 1  # the config's settings apply
        finally:
            m.close()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["default_model"] = "../../etc/passwd"
    manifest["models"].append({"file": "../../etc/passwd"})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="leaves the folder"):
        ServedModel(bundle)


def test_adaptive_spinning_runs_back_to_back_calls_on_the_spinning_twin_with_the_same_logits(trained):
    from edgecnn.runtimes.serve import ServeConfig, ServedModel
    from edgecnn.runtimes.serve_model import HOT_GAP_S

    x = np.random.default_rng(9).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with Classifier(trained.onnx) as ref:
        want = ref.run(x)
    m = ServedModel(trained.onnx, spinning=False, adaptive_spinning=True)
    try:
        assert m.spinning == "adaptive" and m.metadata(ServeConfig())["parameters"]["spinning"] == "adaptive"
        assert m.clf.runtime.spinning_used is False and m._hot.runtime.spinning_used is True
        got = [m.run(x[:1])]  # the first call follows no other: without spinning
        assert (m.cold_calls, m.hot_calls) == (1, 0)
        got.append(m.run(x[1:2]))  # straight after the previous one: the spinning twin
        assert m.hot_calls == 1
        time.sleep(10 * HOT_GAP_S)
        got.append(m.run(x[2:3]))  # after a pause: without spinning again
        assert (m.cold_calls, m.hot_calls) == (2, 1)
        time.sleep(10 * HOT_GAP_S)
        batch = m.run(x)  # a batch formed (requests queued behind a call): the twin, even after a pause
        assert m.hot_calls == 2
        np.testing.assert_allclose(np.concatenate(got), want, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(batch, want, rtol=RTOL, atol=ATOL)
    finally:
        m.close()
    for options in ({"spinning": True}, {}):  # spinning chosen (or left to the runtime): one session, no twin
        m = ServedModel(trained.onnx, adaptive_spinning=True, **options)
        try:
            assert m._hot is None and m.spinning == m.clf.runtime.spinning_used
        finally:
            m.close()


def test_an_unknown_output_is_refused_before_the_model_runs(server):
    x = np.zeros((2, 3, 64, 64), np.float32)
    body = json.loads(_json_infer(x))
    body["outputs"] = [{"name": "nosuch"}]
    before = _batch_stats(server)
    status, resp, _ = server.request("POST", "/v2/models/model/infer", json.dumps(body).encode())
    assert status == 400 and "unknown output 'nosuch'" in json.loads(resp)["error"]
    assert _batch_stats(server) == before  # no batch ran for it
