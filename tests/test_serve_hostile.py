"""`edgecnn serve` under hostile or careless clients: poisoned rows, floods, bombs, stalls, disconnects, SIGTERM."""

from __future__ import annotations

import gzip
import io
import json
import re
import signal
import socket
import threading
import time
import zlib

import numpy as np
import psutil
import pytest
from edgecnn.runtimes import Classifier
from PIL import Image
from test_serve import Server, _batch_stats, _binary_request, _check_answer, _json_infer

MIB = 1 << 20


@pytest.fixture(scope="module")
def clf(trained):
    with Classifier(trained.onnx) as c:
        yield c


@pytest.fixture(scope="module")
def small(trained, tmp_path_factory):
    """max batch 4, small queue and concurrency limits, 1 s read timeout."""
    s = Server(trained.onnx, tmp_path_factory.mktemp("hostile") / "small.log", "--max-batch", "4",
               "--instances", "1", "--max-queue", "16", "--max-concurrency", "16", "--read-timeout-s", "1")
    yield s
    rc = s.stop()
    assert rc == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text()


@pytest.fixture(scope="module")
def slow(trained, tmp_path_factory):
    """A fixed-batch model run row by row (about 2 ms a row here): a big request holds the one instance."""
    s = Server(trained.onnx, tmp_path_factory.mktemp("hostile") / "slow.log", "--no-relax-batch", "--max-batch", "8",
               "--instances", "1", "--max-queue", "4096", "--max-body-mb", "32")
    yield s
    rc = s.stop()
    assert rc == 0, s.log.read_text()


def _post(server, body: bytes, headers: dict, model: str = "model"):
    return server.request("POST", f"/v2/models/{model}/infer", body, headers)


def _metric(server, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", server.get("/metrics")[1].decode(), re.M)
    return float(m.group(1)) if m else 0.0


def _blocker(server, rows: int, seed: int, box: dict) -> threading.Thread:
    """A big request on its own thread; returns once the server holds it (in flight)."""
    x = np.random.default_rng(seed).standard_normal((rows, 3, 64, 64)).astype(np.float32)
    box["x"] = x
    t = threading.Thread(target=lambda: box.update(r=_post(server, *_binary_request(x))), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while _metric(server, "edgecnn_requests_in_flight") < 1 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.01)
    return t


def test_a_poisoned_request_fails_alone_and_its_batch_mates_get_correct_logits(slow, clf):
    rng = np.random.default_rng(11)
    good = rng.standard_normal((7, 3, 64, 64)).astype(np.float32)
    want = clf.run(good)
    poison = np.full((1, 3, 64, 64), 3e38, np.float32)  # finite input, Inf inside the model
    before = _full_batches(slow)
    box: dict = {}
    blocker = _blocker(slow, 128, 12, box)  # its rows hold the one instance
    barrier = threading.Barrier(8)
    results: dict = {}

    def client(i: int) -> None:
        x = poison if i == 7 else good[i : i + 1]
        barrier.wait(10)
        results[i] = _post(slow, *_binary_request(x))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads + [blocker]:
        t.join(60)
    assert box["r"][0] == 200
    status, body, _ = results[7]
    assert status == 422 and "NaN or Inf" in json.loads(body)["error"], body
    for i in range(7):
        status, body, _ = results[i]
        assert status == 200, body
        _check_answer(body, want[i : i + 1])
    # 16 calls of 8 rows for the blocker, one more for the eight small requests together (the failed call's
    # requests are then re-run in halves until the poisoned one is alone)
    assert _full_batches(slow) - before == 17


def _full_batches(server) -> float:
    """Model calls of more than 4 rows (a server with --max-batch 8)."""
    text = server.get("/metrics")[1].decode()
    b = {le: float(v) for le, v in re.findall(r'^edgecnn_batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}
    return b["8.0"] - b["4.0"]


def test_max_batch_caps_every_model_call_and_a_bigger_request_gets_all_its_rows(small, clf):
    x = np.random.default_rng(13).standard_normal((10, 3, 64, 64)).astype(np.float32)
    status, body, _ = _post(small, _json_infer(x), {})
    assert status == 200, body
    _check_answer(body, clf.run(x))
    text = small.get("/metrics")[1].decode()
    le4 = float(re.search(r'^edgecnn_batch_size_bucket\{le="4.0"\} (\S+)$', text, re.M).group(1))
    count = float(re.search(r"^edgecnn_batch_size_count (\S+)$", text, re.M).group(1))
    assert count >= 3 and le4 == count  # no model call above 4 rows


def _rss_sampler(pid: int, stop: threading.Event, peak: list) -> threading.Thread:
    proc = psutil.Process(pid)

    def run() -> None:
        while not stop.is_set():
            try:
                peak.append(proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_an_image_bomb_request_is_refused_early_with_bounded_memory(small):
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 90)).save(buf, format="PNG", optimize=True)
    png = buf.getvalue()
    assert len(png) < 100_000  # a few dozen KB that decode to 16.7 MPixel
    blobs = [png] * 200
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [200],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    stop, peak = threading.Event(), []
    sampler = _rss_sampler(small.proc.pid, stop, peak)
    try:
        status, body, headers = _post(small, head + raw, {"Inference-Header-Content-Length": str(len(head))})
    finally:
        stop.set()
        sampler.join(5)
    assert status == 413, body
    assert "MPixel" in json.loads(body)["error"] and headers.get("connection") == "close"
    assert max(peak) < 1024 * MIB, f"server RSS peaked at {max(peak) / MIB:.0f} MiB"
    assert small.get("/v2/health/ready")[0] == 200


def test_a_flood_gets_only_200_or_503_with_retry_after_and_memory_stays_flat(small):
    import http.client

    x = np.zeros((1, 3, 64, 64), np.float32)
    body, headers = _binary_request(x)
    for _ in range(20):  # warm: allocator pools and thread stacks exist before the baseline
        assert _post(small, body, headers)[0] == 200
    rss_before = psutil.Process(small.proc.pid).memory_info().rss
    seen: dict[int, int] = {}
    bad: list = []
    lock = threading.Lock()
    deadline = time.monotonic() + 3.0

    def client() -> None:
        conn = None
        n = 0
        while time.monotonic() < deadline and n < 2000:
            n += 1
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)
                conn.request("POST", "/v2/models/model/infer", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                with lock:
                    seen[r.status] = seen.get(r.status, 0) + 1
                if r.status == 503 and not r.getheader("retry-after", "").isdigit():
                    bad.append("503 without Retry-After")
                if r.status not in (200, 503):
                    bad.append(r.status)
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)  # refused at the door (backlog, limit): retry
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not bad, bad[:5]
    assert seen.get(200, 0) > 0 and set(seen) <= {200, 503}, seen
    time.sleep(0.5)
    assert small.get("/v2/health/ready")[0] == 200
    assert _post(small, body, headers)[0] == 200
    rss_after = psutil.Process(small.proc.pid).memory_info().rss
    assert rss_after - rss_before < 50 * MIB, (rss_before / MIB, rss_after / MIB)


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Reads until the server closes the connection; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    got = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the server kept the connection open for {seconds} s (read {got[:80]!r})")


def test_idle_and_half_sent_connections_are_closed_after_the_read_timeout(small):
    silent = socket.create_connection(("127.0.0.1", small.port))
    partial_headers = socket.create_connection(("127.0.0.1", small.port))
    partial_headers.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
    partial_body = socket.create_connection(("127.0.0.1", small.port))
    partial_body.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"in")
    t0 = time.monotonic()
    try:
        assert _closed_within(silent, 6) == b""
        assert _closed_within(partial_headers, 6) == b""
        answer = _closed_within(partial_body, 6)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    finally:
        for s in (silent, partial_headers, partial_body):
            s.close()
    assert time.monotonic() - t0 < 8
    assert small.get("/v2/health/ready")[0] == 200


def test_a_body_over_the_limit_gets_413_before_it_is_sent_and_the_connection_closes(small):
    sock = socket.create_connection(("127.0.0.1", small.port))
    try:
        sock.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        answer = _closed_within(sock, 5)  # answered from the headers alone, then closed
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower(), answer[:300]
    assert b"over the limit" in answer


def test_a_client_that_leaves_while_queued_has_its_rows_dropped(slow):
    before_rows, _ = _batch_stats(slow)
    dropped = _metric(slow, "edgecnn_requests_dropped_total")
    box: dict = {}
    blocker = _blocker(slow, 640, 14, box)
    leaver = socket.create_connection(("127.0.0.1", slow.port))
    body, headers = _binary_request(np.ones((3, 3, 64, 64), np.float32))
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": len(body)}.items())
    leaver.sendall(f"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
    deadline = time.monotonic() + 10  # accepted (its body read) behind the blocker, then the client leaves:
    while _metric(slow, "edgecnn_requests_in_flight") < 2 and time.monotonic() < deadline:  # queued or still
        time.sleep(0.005)  # being parsed, its rows must never run either way
    assert blocker.is_alive()
    leaver.close()
    blocker.join(60)
    assert box["r"][0] == 200
    deadline = time.monotonic() + 5
    while _metric(slow, "edgecnn_requests_dropped_total") == dropped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(slow, "edgecnn_requests_dropped_total") == dropped + 1
    rows, _ = _batch_stats(slow)
    assert rows - before_rows == 640  # the blocker's rows only: the leaver's 3 never ran


def test_a_request_whose_client_left_while_it_was_parsed_is_never_queued(trained):
    """The protocol marks the scope when the connection is lost before the request reached the batcher
    (GONE_FLAG); the app then drops it, counted, without running its rows or answering."""
    import asyncio

    from edgecnn.runtimes.serve import ServeConfig, ServedModel
    from edgecnn.runtimes.serve_app import GONE_FLAG, App

    model = ServedModel(trained.onnx)
    ran: list[int] = []
    real_run = model.run
    model.run = lambda x: ran.append(len(x)) or real_run(x)
    app = App(model, ServeConfig(port=0))
    body, headers = _binary_request(np.ones((2, 3, 64, 64), np.float32))
    raw_headers = [(b"content-length", str(len(body)).encode())] + [
        (k.lower().encode(), str(v).encode()) for k, v in headers.items()]

    async def main() -> tuple[list, list]:
        life_in: asyncio.Queue = asyncio.Queue()
        life_out: list = []

        async def life_send(m):
            life_out.append(m)

        life = asyncio.create_task(app({"type": "lifespan"}, life_in.get, life_send))
        await life_in.put({"type": "lifespan.startup"})
        while not life_out:
            await asyncio.sleep(0.01)
        answers = []
        for gone in (True, False):
            msgs = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive(msgs=msgs):
                return msgs.pop() if msgs else await asyncio.sleep(30)

            async def send(m, gone=gone):
                answers.append((gone, m))

            scope = {"type": "http", "method": "POST", "path": "/v2/models/model/infer", "headers": raw_headers}
            if gone:
                scope[GONE_FLAG] = True
            await asyncio.wait_for(app(scope, receive, send), 20)
        await life_in.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(life, 20)
        return answers, life_out

    try:
        answers, life_out = asyncio.run(main())
    finally:
        model.close()
    assert [m["type"] for m in life_out] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not [m for gone, m in answers if gone]  # the one whose client left: no answer
    assert ran == [2]  # only the other request's 2 rows reached the model
    assert [m.get("status") for gone, m in answers if m["type"] == "http.response.start"] == [200]
    assert app.metrics.gone == 1


def test_protocol_gzip_deflate_405_allow_metadata_and_raw_string_bytes(small, clf):
    x = np.random.default_rng(15).standard_normal((2, 3, 64, 64)).astype(np.float32)
    plain = _json_infer(x)
    for enc, packed in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain))):
        status, body, _ = _post(small, packed, {"Content-Encoding": enc})
        assert status == 200, body
        _check_answer(body, clf.run(x))
    bomb = gzip.compress(b" " * (40 * MIB))  # 40 KB that inflate past the 16 MiB body limit
    status, body, _ = _post(small, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in json.loads(body)["error"]
    status, body, headers = small.request("POST", "/v2/models/model")
    assert status == 405 and headers["allow"] == "GET"
    status, body, headers = small.request("GET", "/v2/models/model/infer")
    assert status == 405 and headers["allow"] == "POST"
    meta = json.loads(small.get("/v2/models/model")[1])
    assert meta["platform"] == "onnx_onnxv1"
    params = meta["parameters"]
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values()), params
    assert json.loads(params["class_names"]) == list(clf.class_names)
    # serve on ort-cpu: a spinning twin of the session while calls come back to back, else no spinning
    assert params["runtime"].startswith("ort-cpu") and params["threads"] >= 1 and params["spinning"] == "adaptive"
    # A JSON BYTES string that is not base64 of an image is its own UTF-8 bytes (Triton's reading).
    req = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["not an image, just text"]}]}
    status, body, _ = _post(small, json.dumps(req).encode(), {})
    assert status == 400 and "image 0 is not a decodable image file" in json.loads(body)["error"]


def test_sigterm_answers_the_request_in_flight_and_exits_0_despite_stalled_connections(trained, clf, tmp_path):
    s = Server(trained.onnx, tmp_path / "server.log", "--no-relax-batch", "--instances", "1", "--max-body-mb", "32")
    idle = socket.create_connection(("127.0.0.1", s.port))
    half = socket.create_connection(("127.0.0.1", s.port))
    half.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHo")
    box: dict = {}
    try:
        blocker = _blocker(s, 400, 16, box)  # about 0.4 s or more of model time, row by row
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        ready = []
        while s.proc.poll() is None and time.monotonic() - t0 < 25:
            try:
                ready.append(s.get("/v2/health/ready")[0])
            except OSError:
                pass  # the listener is closed: new connections are refused
            time.sleep(0.05)
        rc = s.stop(25)
        elapsed = time.monotonic() - t0
        blocker.join(30)
    finally:
        idle.close()
        half.close()
    log = s.log.read_text()
    assert rc == 0 and elapsed < 20, (rc, elapsed, log)
    assert 200 not in ready, ready  # never ready again once the signal landed
    status, body, _ = box["r"]
    assert status == 200, body
    _check_answer(body, clf.run(box["x"]))
    assert "Traceback" not in log, log
    assert re.search(r"stopped; 1 inference requests accepted \(\d+ without a task, \d+ of them read by the lean "
                     r"parser\), 1 answered", log), log


_DIE = """
import sys
sys.modules["torch"] = None
from edgecnn.runtimes.serve import ServeConfig, ServedModel, serve

def boom(x):
    raise SystemExit("simulated failure inside the batcher")

m = ServedModel(sys.argv[1])
m.clf.run = boom  # a non-Exception from the model call kills the batcher (a bug, not a bad request)
sys.exit(1 if serve(m, ServeConfig(port=0))["died"] else 0)
"""


def test_a_dead_batcher_answers_503_and_the_process_exits_1(trained, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "die.py"
    script.write_text(_DIE)
    log = tmp_path / "die.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(script), str(trained.onnx)], stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            port = None
            while port is None and time.monotonic() < deadline and proc.poll() is None:
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
                port = int(m.group(1)) if m else None
                time.sleep(0.1)
            assert port, log.read_text()
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            body, headers = _binary_request(np.zeros((1, 3, 64, 64), np.float32))
            conn.request("POST", "/v2/models/model/infer", body=body, headers=headers)
            r = conn.getresponse()
            assert r.status == 503 and "restarted" in json.loads(r.read())["error"]
            conn.close()
            rc = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log.read_text()
    assert rc == 1, text
    assert "batcher died" in text and "Traceback" not in text, text


class _Recorder:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


class _Cycle:
    response_started = False


def test_one_write_sends_headers_and_body_together_and_passes_everything_else_through():
    from edgecnn.runtimes.serve import _OneWrite

    t, c = _Recorder(), _Cycle()
    w = _OneWrite(t, c)
    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts: at once
    assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    c.response_started = True
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert len(t.writes) == 1  # the headers are held ...
    w.write(b"body")
    assert t.writes[1] == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"  # ... and go out with the body
    w.write(b"more")  # a later chunk: at once
    assert t.writes[2] == b"more" and not w.is_closing()
    big = b"x" * (1 << 17)
    t2, c2 = _Recorder(), _Cycle()
    w2 = _OneWrite(t2, c2)
    c2.response_started = True
    w2.write(b"HEAD")
    w2.write(big)  # a big body is not copied: two writes, in order
    assert t2.writes == [b"HEAD", big]
    t3, c3 = _Recorder(), _Cycle()
    w3 = _OneWrite(t3, c3)
    c3.response_started = True
    w3.write(b"HTTP/1.1 500\r\n\r\n")
    w3.close()  # an app that fails after the headers: they are flushed before the close
    assert t3.writes == [b"HTTP/1.1 500\r\n\r\n"] and t3.closed


def _read_response(sock: socket.socket, deadline: float, pending: bytearray | None = None) -> tuple[bytes, bytes]:
    """One response off ``sock``: (head, body). ``pending``: bytes already read past the previous response
    (one recv may hold several pipelined answers); what this one reads past its own body is left there."""
    buf = bytes(pending or b"")
    while b"\r\n\r\n" not in buf or len(buf) < buf.index(b"\r\n\r\n") + 4 + int(
            re.search(rb"content-length: (\d+)", buf.split(b"\r\n\r\n")[0], re.I).group(1)):
        assert time.monotonic() < deadline, buf
        chunk = sock.recv(1 << 16)
        assert chunk, buf
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    size = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    if pending is not None:
        pending[:] = rest[size:]
    return head, rest[:size]


def test_responses_keep_their_headers_with_head_100_continue_and_keep_alive(small, clf):
    x = np.random.default_rng(16).standard_normal((1, 3, 64, 64)).astype(np.float32)
    body, headers = _binary_request(x)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    infer = (f"POST /v2/models/model/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
             ).encode() + body
    deadline = time.monotonic() + 30
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        for _ in range(3):  # keep-alive: three answers on one connection, each complete
            s.sendall(infer)
            head, got = _read_response(s, deadline)
            assert head.startswith(b"HTTP/1.1 200"), head
            _check_answer(got, clf.run(x))
        s.sendall(b"HEAD /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n")  # HEAD: headers only, no body write
        buf = b""
        while b"\r\n\r\n" not in buf:
            assert time.monotonic() < deadline, buf
            buf += s.recv(1 << 16)
        assert buf.startswith(b"HTTP/1.1 405") and b"\r\nallow: GET\r\n" in buf and buf.endswith(b"\r\n\r\n")
        s.sendall(infer.replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n", 1).split(b"\r\n\r\n")[0]
                  + b"\r\n\r\n")
        buf = b""
        while b"100 Continue" not in buf:
            assert time.monotonic() < deadline, buf
            buf += s.recv(1 << 16)
        s.sendall(body)
        head, got = _read_response(s, deadline)
        assert head.startswith(b"HTTP/1.1 200"), head
        _check_answer(got, clf.run(x))


def _raw(x: np.ndarray | None, *, chunked: bool = False, extra: str = "", json_body: bytes | None = None,
         binary_out: bool = False, outputs: list | None = None) -> bytes:
    """An infer request's bytes: a binary tensor (or ``json_body``), sent whole or chunked."""
    if json_body is not None:
        body, headers = json_body, {"Content-Type": "application/json"}
    else:
        raw = x.tobytes()
        spec = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                            "parameters": {"binary_data_size": len(raw)}}]}
        if binary_out:
            spec["parameters"] = {"binary_data_output": True}
        if outputs is not None:
            spec["outputs"] = outputs
        head = json.dumps(spec).encode()
        body, headers = head + raw, {"Inference-Header-Content-Length": str(len(head)),
                                     "Content-Type": "application/octet-stream"}
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + extra
    if chunked:
        return (f"POST /v2/models/model/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n{lines}\r\n"
                ).encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    return f"POST /v2/models/model/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{lines}\r\n".encode() + body


def _answers(port: int, data: bytes, count: int) -> list[tuple[bytes, bytes]]:
    """Sends ``data`` on a new connection and reads ``count`` responses: [(head without the date, body)]."""
    out = []
    deadline = time.monotonic() + 30
    pending = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        for _ in range(count):
            head, body = _read_response(s, deadline, pending)
            out.append((re.sub(rb"\r\ndate: [^\r]*", b"", head), body))
    return out


def test_the_task_free_path_answers_byte_for_byte_as_the_asgi_path(trained, clf, tmp_path):
    """Small complete bodies are answered from the HTTP parser's callback; chunked ones go through the ASGI
    app. The same requests both ways: the same status, headers and body, errors included."""
    s = Server(trained.onnx, tmp_path / "fast.log", "--max-batch", "8")
    try:
        rng = np.random.default_rng(17)
        one, three = (rng.standard_normal((n, 3, 64, 64)).astype(np.float32) for n in (1, 3))
        zeros = np.zeros((1, 3, 64, 64), np.float32)
        json_zeros = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 64, 64],
                                             "data": [0] * (3 * 64 * 64)}]}).encode()
        poison = np.full((1, 3, 64, 64), 3e38, np.float32)
        top2 = [{"name": "probabilities", "parameters": {"classification": 2}}, {"name": "logits"}]
        # one image of binary FP32 is 49 KB: under the 64 KiB the task-free path takes
        cases = {"batch 1": dict(x=one), "binary output": dict(x=one, binary_out=True),
                 "top-2 and logits": dict(x=one, outputs=top2), "small JSON body": dict(x=None, json_body=json_zeros),
                 "non-finite output": dict(x=poison), "unknown output": dict(x=one, outputs=[{"name": "nope"}])}
        fast = 0
        for name, kw in cases.items():
            [(h1, b1)] = _answers(s.port, _raw(**kw), 1)
            [(h2, b2)] = _answers(s.port, _raw(**kw, chunked=True), 1)
            assert h1 == h2 and b1 == b2, (name, h1, h2, b1[:300], b2[:300])
            if name == "non-finite output":
                assert h1.startswith(b"HTTP/1.1 422") and b"NaN or Inf" in b1
            elif name == "unknown output":  # declined: the ASGI path answers both
                assert h1.startswith(b"HTTP/1.1 400") and b"unknown output" in b1
                continue
            elif name == "small JSON body":
                _check_answer(b1, clf.run(zeros))
            elif name == "batch 1":
                _check_answer(b1, clf.run(one))
            else:
                assert h1.startswith(b"HTTP/1.1 200")
            fast += 1
        # declined (a wrong shape): the ASGI path answers it, the same 400 either way
        bad = np.zeros((1, 3, 63, 64), np.float32)
        [(h1, b1)] = _answers(s.port, _raw(bad), 1)
        [(h2, b2)] = _answers(s.port, _raw(bad, chunked=True), 1)
        assert h1 == h2 and h1.startswith(b"HTTP/1.1 400") and b1 == b2
        # pipelined: three requests in one send, answered in order (the middle one, 147 KB, by the ASGI path)
        got = _answers(s.port, _raw(one) + _raw(three) + _raw(one), 3)
        fast += 2
        for (h, b), x in zip(got, (one, three, one), strict=True):
            assert h.startswith(b"HTTP/1.1 200")
            _check_answer(b, clf.run(x))
        # Connection: close is honoured: the answer says so and the server closes the connection
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(_raw(one, extra="connection: close\r\n"))
            head, body = _read_response(c, time.monotonic() + 30)
            fast += 1
            assert b"\r\nconnection: close" in head.lower()
            _check_answer(body, clf.run(one))
            assert _closed_within(c, 5) == b""
    finally:
        rc = s.stop()
    log = s.log.read_text()
    assert rc == 0 and "Traceback" not in log, log
    m = re.search(r"stopped; (\d+) inference requests accepted \((\d+) without a task,", log)
    # accepted: each case twice (the ASGI path accepts a body before parsing it), the bad shape twice, 3 + 1
    assert m and int(m.group(2)) == fast and int(m.group(1)) == 2 * len(cases) + 6, log


def test_the_lean_parser_takes_whole_requests_and_leaves_the_rest_to_httptools_then_takes_over_again(
        trained, clf, tmp_path):
    """serve.py reads a whole, plain binary infer request itself (no httptools callbacks, no ASGI cycle);
    a split request, any other request, or one pipelined behind those goes to httptools and uvicorn, and the
    connection comes back to the lean parser once they have answered all they began. Every answer in order
    and correct; the stop line counts exactly the requests the lean parser read."""
    s = Server(trained.onnx, tmp_path / "lean.log", "--max-batch", "8")
    lean = 0
    try:
        rng = np.random.default_rng(23)
        xs = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(4)]
        ready = b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n"
        deadline = time.monotonic() + 60
        pending = bytearray()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:

            def infer(x, data=None, count=True):
                nonlocal lean
                c.sendall(data or _raw(x))
                head, body = _read_response(c, deadline, pending)
                assert head.startswith(b"HTTP/1.1 200"), head
                _check_answer(body, clf.run(x))
                lean += count

            infer(xs[0])  # whole: lean
            split = _raw(xs[1])
            c.sendall(split[:3000])  # headers and part of the body, then the rest: httptools reads it
            time.sleep(0.3)
            infer(xs[1], split[3000:], count=False)
            infer(xs[2])  # lean again: httptools finished what it began
            infer(xs[3], _raw(xs[3], extra="connection: keep-alive\r\n"))  # keep-alive said aloud: still lean
            c.sendall(ready)  # not an infer request: httptools
            head, _ = _read_response(c, deadline, pending)
            assert head.startswith(b"HTTP/1.1 200"), head
            infer(xs[0])  # lean again
            # pipelined in one send: the first is lean; the GET behind it goes to httptools with the third
            c.sendall(_raw(xs[1]) + ready + _raw(xs[2]))
            for i, x in enumerate((xs[1], None, xs[2])):
                head, body = _read_response(c, deadline, pending)
                assert head.startswith(b"HTTP/1.1 200"), (i, head)
                if x is not None:
                    _check_answer(body, clf.run(x))
            lean += 1
            for _ in range(3):  # and back to lean (three, so that a connection that stayed with httptools shows)
                infer(xs[3])
            assert not pending
    finally:
        rc = s.stop()
    log = s.log.read_text()
    assert rc == 0 and "Traceback" not in log, log
    m = re.search(r"stopped; (\d+) inference requests accepted \((\d+) without a task, (\d+) of them read by the lean "
                  r"parser\), (\d+) answered", log)
    assert m, log
    accepted, untasked, got_lean, answered = (int(g) for g in m.groups())
    # 10 infer requests: 8 whole ones the lean parser should read, the split one (an ASGI task) and the
    # pipelined third (httptools, without a task). A whole request may still reach the server in two reads
    # on a loaded machine (seen once in a CI run beside other work): httptools then reads it, correctly, so
    # one such miss is allowed. A connection that never came back after a hand-over would lose 3 or more.
    assert accepted == answered == 10 and lean == 8 and lean - 1 <= got_lean <= lean, log
    assert got_lean <= untasked <= got_lean + 1, log  # + the pipelined third, unless its bytes came late too
