"""Load test of `edgecnn serve` against MLServer and the offline ONNX Runtime ceiling, one run, loopback only.

    python benchmarks/serve_load.py [--rounds 3] [--seconds 3] [--clients 1,8,32] [--mlserver-python PATH]
                                    [--threads N] [--out benchmarks/results] [--quick] [--fail-on-targets]

One model file (the default Net exported to ONNX, fixed batch 1, as users export it) measured three ways
in interleaved rounds, so the other work on a shared machine weighs on every phase alike:

- offline: ONNX Runtime CPU in this process, batch-64 img/s and batch-1 p50 ms (the ceiling), with the
  runtime's default session options and the servers' thread count;
- `edgecnn serve MODEL` with its defaults as they are when run (the log line it prints is recorded), at
  each client count, JSON tensors and binary tensors (Inference-Header-Content-Length), and JPEG BYTES
  at the largest client count;
- MLServer 1.7.1 (its own venv: its dependencies conflict with edgecnn's), a custom runtime
  (benchmarks/mlserver_peer/runtime.py) running the same relaxed ONNX file `edgecnn serve` runs, with
  the same session options, adaptive batching on, inference in-process; the same JSON request bytes.

Every client sends batch-1 requests back to back on one keep-alive connection, each client its own
distinct inputs, and checks every answer against the offline logits of its own input (rtol 1e-3,
atol 1e-5). Errors (transport failures, non-200 answers, timeouts) and wrong answers are counted
apart. Each phase is bounded in time and requests. Medians over the rounds go to serve.md; every
round's figures to serve.json (the same also to serve-<cpu kind>.md/.json: the latest run per kind).
Exit status: 1 if any answer was wrong or any phase had errors, 3 with --fail-on-targets when a
target is missed, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PEER_RUNTIME = Path(__file__).resolve().parent / "mlserver_peer" / "runtime.py"
OFFLINE_BATCH = 64
INPUTS_PER_CLIENT = 4
MAX_REQUESTS_PER_PHASE = 200_000
PHASE_GRACE_S = 15.0  # a client still waiting this long after its phase ended is cancelled (counted as an error)
RTOL, ATOL = 1e-3, 1e-5
# `edgecnn serve` on ort-cpu runs a spinning twin of its session while calls come back to back (adaptive
# spinning, runtimes/serve_model.py): under load it runs spinning sessions, and so does the MLServer peer.
SERVE_SPINNING = True
MLSERVER_INSTALL = ("python3 -m venv .venv-mlserver && .venv-mlserver/bin/pip install mlserver==1.7.1 "
                    "onnxruntime numpy httptools")


# ------------------------------------------------------------------------------------------ the model and inputs
def make_model(folder: Path) -> Path:
    """The default Net (random weights; speed does not depend on them), exported as users do: fixed batch 1."""
    import torch
    from edgecnn.exporters.onnx import export

    from edgecnn.checkpoint import Checkpoint, save_checkpoint
    from edgecnn.model import Net

    torch.manual_seed(0)
    names = ["circle", "square", "triangle", "cross", "stripes", "checker"]
    save_checkpoint(Checkpoint(Net(6).state_dict(), 6, names), folder / "model.pt")
    return export(folder / "model.pt", folder / "model.onnx", check=False).path


def jpeg_bytes(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------ v2 requests, answers
def http_post(model: str, body: bytes, extra_headers: str = "", content_type: str = "application/json") -> bytes:
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"{extra_headers}Content-Length: {len(body)}\r\n\r\n").encode() + body


def json_body(input_name: str, x: np.ndarray) -> bytes:
    """A batch-1 v2 JSON request; orjson writes each float32 in its shortest exact form (both servers read
    it back to the same float32), ``data`` flat as most clients send it."""
    import orjson

    return orjson.dumps({"inputs": [{"name": input_name, "datatype": "FP32", "shape": list(x.shape),
                                     "data": np.ascontiguousarray(x, np.float32).ravel()}],
                         "outputs": [{"name": "logits"}]}, option=orjson.OPT_SERIALIZE_NUMPY)


def binary_request(model: str, input_name: str, kind: str, payload) -> bytes:
    """A batch-1 request with the binary tensor extension: a float32 tensor, or one JPEG as BYTES."""
    if kind == "binary":
        raw = np.ascontiguousarray(payload, dtype="<f4").tobytes()
        inp = {"name": input_name, "datatype": "FP32", "shape": list(payload.shape),
               "parameters": {"binary_data_size": len(raw)}}
    else:
        raw = len(payload).to_bytes(4, "little") + payload
        inp = {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [inp], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return http_post(model, head + raw, f"Inference-Header-Content-Length: {len(head)}\r\n",
                     "application/octet-stream")


def answer_logits(headers: dict, body: bytes) -> np.ndarray | None:
    """The ``logits`` output of a v2 answer, binary (Inference-Header-Content-Length) or JSON."""
    hl = headers.get(b"inference-header-content-length")
    if hl is not None:
        return np.frombuffer(body[int(hl):], "<f4")
    import orjson

    try:
        out = next(o for o in orjson.loads(body)["outputs"] if o.get("name") == "logits")
        return np.asarray(out["data"], np.float32).ravel()
    except (ValueError, KeyError, TypeError, StopIteration):
        return None


_HEADS: dict[bytes, tuple[int, dict]] = {}  # a response head seen before (a server sends the same head for a second)


def _head(raw: bytes) -> tuple[int, dict]:
    """(status, headers with lower-case names) of one response head, from a table when seen before."""
    got = _HEADS.get(raw)
    if got is None:
        lines = raw.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        got = (int(lines[0].split(b" ", 2)[1]), headers)
        if len(_HEADS) >= 256:
            _HEADS.clear()
        _HEADS[raw] = got
    return got


class _Run:
    """One client's inputs, their offline logits, and the answers already checked: an answer whose bytes
    equal an answer already found close to its input's logits is that same answer, so it is not parsed and
    compared again (at most 16 kept per input; any other answer is checked in full)."""

    def __init__(self, requests: list[bytes], expected: list[np.ndarray], st: PhaseStats) -> None:
        self.requests, self.st = requests, st
        self.wants = [e.ravel() for e in expected]
        self.checked: list[set[bytes]] = [set() for _ in requests]
        self.i = self.k = 0

    def record(self, t0: float, t1: float, status: int, headers: dict, body: bytes) -> None:
        st, k = self.st, self.k
        if status != 200:
            st.errors += 1
            st.statuses[str(status)] = st.statuses.get(str(status), 0) + 1
        elif body not in self.checked[k]:
            if close_enough(answer_logits(headers, body), self.wants[k]):
                if len(self.checked[k]) < 16:
                    self.checked[k].add(body)
            else:
                st.wrong += 1
        if t0 >= st.t_measure:
            st.lat.append(t1 - t0)
        if st.t_measure <= t1 <= st.t_end:
            st.completed_in_window += 1


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection sending its client's requests back to back, one in flight.
    Each response is parsed from the connection's own buffer, checked and recorded, and the next request
    written, in the callback its last bytes arrive in: no task or future per request (the client shares the
    machine's cores with the server it measures). ``ended`` is set when the connection is over: the phase
    ended, the server asked to close, or a transport failure (counted)."""

    def __init__(self, run: _Run, ended: asyncio.Future) -> None:
        self.run, self.ended = run, ended
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting = False
        self.t0 = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        run = self.run
        st = run.st
        if time.perf_counter() >= st.t_end or st.sent >= MAX_REQUESTS_PER_PHASE:
            self._end()
            return
        run.k = run.i % len(run.requests)
        run.i += 1
        st.sent += 1
        self.waiting = True
        self.t0 = time.perf_counter()
        self.transport.write(run.requests[run.k])
        if self.buf:  # bytes that came before this request was sent: a server bug, checked as its answer
            self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.waiting:
            return
        try:
            r = self._response()
        except ValueError:
            self._failed()
            return
        if r is None:
            return
        t1 = time.perf_counter()
        self.waiting = False
        status, headers, body = r
        self.run.record(self.t0, t1, status, headers, body)
        if headers.get(b"connection", b"").lower() == b"close":
            self._end()
        else:
            self._send()

    def connection_lost(self, exc) -> None:
        if self.waiting:
            self.waiting = False
            self._failed()
        else:
            self._end()

    def _failed(self) -> None:
        st = self.run.st
        st.errors += 1
        st.statuses["transport"] = st.statuses.get("transport", 0) + 1
        self._end()

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def _response(self) -> tuple[int, dict, bytes] | None:
        """The buffered response once it is whole (Content-Length-framed or chunked), else None."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        status, headers = _head(bytes(buf[:end]))
        start = end + 4
        if b"content-length" in headers:
            stop = start + int(headers[b"content-length"])
            if len(buf) < stop:
                return None
            body = bytes(buf[start:stop])
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts, pos = [], start
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    stop = buf.find(b"\r\n\r\n", eol)  # the trailers end with a blank line
                    if stop < 0:
                        return None
                    stop += 4
                    break
                if len(buf) < eol + 2 + size + 2:
                    return None
                parts.append(bytes(buf[eol + 2: eol + 2 + size]))
                pos = eol + 2 + size + 2
            body = b"".join(parts)
        else:
            raise ValueError("response with neither Content-Length nor chunked encoding")
        del buf[:stop]
        return status, headers, body


def close_enough(got: np.ndarray | None, want: np.ndarray) -> bool:
    """np.allclose(got, want, RTOL, ATOL) (NaN is never close), at a fraction of its cost per answer."""
    if got is None or got.size != want.size:
        return False
    return bool(np.all(np.abs(got - want) <= ATOL + RTOL * np.abs(want)))


# ------------------------------------------------------------------------------------------ the load generator
@dataclass
class PhaseStats:
    t_measure: float
    t_end: float
    lat: list = field(default_factory=list)
    completed_in_window: int = 0
    sent: int = 0
    errors: int = 0
    wrong: int = 0
    statuses: dict = field(default_factory=dict)


async def _client(port: int, requests: list[bytes], expected: list[np.ndarray], st: PhaseStats) -> None:
    """One client: a connection at a time (a new one after the server closed one or a transport failure)."""
    loop = asyncio.get_running_loop()
    run = _Run(requests, expected, st)
    while time.perf_counter() < st.t_end and st.sent < MAX_REQUESTS_PER_PHASE:
        ended = loop.create_future()
        try:
            transport, _ = await loop.create_connection(lambda ended=ended: _Connection(run, ended), "127.0.0.1",
                                                        port)
        except OSError:
            st.errors += 1
            st.statuses["connect"] = st.statuses.get("connect", 0) + 1
            await asyncio.sleep(0.05)
            continue
        try:
            await ended
        finally:
            transport.close()


async def _load(port: int, per_client: list[tuple[list[bytes], list[np.ndarray]]], warmup: float,
                seconds: float) -> PhaseStats:
    now = time.perf_counter()
    st = PhaseStats(t_measure=now + warmup, t_end=now + warmup + seconds)
    tasks = [asyncio.ensure_future(_client(port, reqs, exp, st)) for reqs, exp in per_client]
    _, pending = await asyncio.wait(tasks, timeout=warmup + seconds + PHASE_GRACE_S)
    for t in pending:  # a client stuck on an answer that never came
        t.cancel()
        st.errors += 1
        st.statuses["timeout"] = st.statuses.get("timeout", 0) + 1
    await asyncio.gather(*tasks, return_exceptions=True)
    return st


def load_phase(port: int, per_client, warmup: float, seconds: float) -> dict:
    try:
        import uvloop

        st = uvloop.run(_load(port, per_client, warmup, seconds))
    except ImportError:
        st = asyncio.run(_load(port, per_client, warmup, seconds))
    lat = np.asarray(st.lat) if st.lat else np.asarray([np.nan])
    return {"throughput": st.completed_in_window / seconds, "requests_measured": len(st.lat),
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "sent": st.sent, "errors": st.errors, "wrong_answers": st.wrong, "error_kinds": st.statuses}


# ------------------------------------------------------------------------------------------ server launchers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children, all threads."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Server:
    """A server subprocess on 127.0.0.1 with its log file; ``stop`` sends SIGTERM, then kills after a bound."""

    label = "server"
    proc: subprocess.Popen | None = None
    port = 0

    def __init__(self, folder: Path):
        self.log = folder / f"{self.label}.log"
        self.exit_code: int | None = None

    def _spawn(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def _wait(self, ready, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.label} not ready in {timeout:g} s: {self.log.read_text()[-3000:]}")

    def stop(self, bound: float = 30) -> int | None:
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(bound)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def cpu(self) -> float:
        return process_cpu(self.proc.pid)


class EdgecnnServer(Server):
    label = "edgecnn"

    def __init__(self, folder: Path, model: Path, options: dict, extra: list[str] | None = None,
                 label: str = "edgecnn"):
        self.label = label
        super().__init__(folder)
        opts = [a for k, v in options.items() for a in ("-O", f"{k}={v}")]
        self.cmd = [sys.executable, "-m", "edgecnn", "serve", str(model), "--host", "127.0.0.1", "--port", "0", *opts,
                    *(extra or [])]
        self.listening = ""

    def start(self) -> EdgecnnServer:
        self._spawn(self.cmd)

        def ready():
            m = re.search(r"^.*listening on http://127\.0\.0\.1:(\d+).*$", self.log.read_text(), re.M)
            if m:
                self.port, self.listening = int(m.group(1)), m.group(0).strip()
                return _get(self.port, "/v2/health/ready")[0] == 200
            return False

        self._wait(ready)
        return self

    def metrics(self) -> dict:
        """Sums and counts of the server's histograms (all label sets added up); {} without /metrics."""
        code, text = _get(self.port, "/metrics", timeout=10)
        if code != 200:
            return {}
        out: dict = {}
        for name in ("edgecnn_queue_seconds_sum", "edgecnn_queue_seconds_count",
                     "edgecnn_request_duration_seconds_sum", "edgecnn_request_duration_seconds_count",
                     "edgecnn_batch_size_sum", "edgecnn_batch_size_count", "edgecnn_request_errors_total",
                     "edgecnn_requests_shed_total"):
            vals = re.findall(rf"^{name}(?:{{[^}}]*}})? ([-+\d.eE]+|NaN)$", text.decode(), re.M)
            if vals:
                out[name] = sum(float(v) for v in vals)
        return out


class MLServerPeer(Server):
    label = "mlserver"

    def __init__(self, folder: Path, python: Path, model: Path, threads: int, batch_size: int, batch_time: float):
        super().__init__(folder)
        self.python, self.root = python, folder / "mlserver-repo"
        self.model, self.threads, self.batch_size, self.batch_time = model, threads, batch_size, batch_time

    def start(self) -> MLServerPeer:
        mdir = self.root / "model"
        mdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(PEER_RUNTIME, mdir / "runtime.py")
        self.port = free_port()
        self.settings = {"debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": self.port,
                         "grpc_port": free_port(), "metrics_port": free_port(), "load_models_at_startup": True}
        self.model_settings = {"name": "model", "implementation": "runtime.OnnxPeer",
                               "max_batch_size": self.batch_size, "max_batch_time": self.batch_time,
                               "parameters": {"uri": str(self.model),
                                              "extra": {"threads": self.threads, "spinning": SERVE_SPINNING}}}
        (self.root / "settings.json").write_text(json.dumps(self.settings, indent=2))
        (mdir / "model-settings.json").write_text(json.dumps(self.model_settings, indent=2))
        env = {**os.environ, "MLSERVER_PARALLEL_WORKERS": "0"}
        env.pop("PYTHONPATH", None)
        launcher = "import sys; from mlserver.cli import main; sys.argv[0] = 'mlserver'; sys.exit(main())"
        self._spawn([str(self.python), "-c", launcher, "start", str(self.root)], env=env, cwd=self.root)
        self._wait(lambda: _get(self.port, "/v2/health/ready")[0] == 200
                   and _get(self.port, "/v2/models/model/ready")[0] == 200)
        return self

    def metrics(self) -> dict:
        """The peer runtime's own counters (GET /peer-stats): predict calls, rows, seconds in session.run and
        in predict (decode + run + encode of each merged batch); {} if the handler does not answer."""
        code, text = _get(self.port, "/peer-stats", timeout=10)
        try:
            return {f"peer_{k}": float(v) for k, v in json.loads(text).items()} if code == 200 else {}
        except (ValueError, AttributeError):
            return {}

    def versions(self) -> str:
        code = ("import importlib.metadata as m\nfor d in ('mlserver','onnxruntime','numpy','uvicorn','httptools',"
                "'uvloop'):\n  try: print(d, m.version(d))\n  except Exception: print(d, 'absent')")
        r = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, timeout=60)
        return ", ".join(line for line in r.stdout.splitlines() if line)


def default_mlserver_python() -> Path | None:
    p = REPO / ".venv-mlserver" / "bin" / "python"
    return p if p.exists() else None


def quiet(servers: list[Server], below: float = 0.05, window: float = 0.25, bound: float = 10.0) -> float:
    """Waits until ``servers`` together use under ``below`` cores over ``window`` s (at most ``bound`` s):
    a server that is still answering the last phase's requests, or whose model threads still spin, would
    otherwise tax the next phase's server on the shared cores. Returns the seconds waited."""
    t0 = time.perf_counter()
    while servers and time.perf_counter() - t0 < bound:
        c0 = sum(s.cpu() for s in servers)
        time.sleep(window)
        if (sum(s.cpu() for s in servers) - c0) / window < below:
            break
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ offline ceiling
def _timed_calls(fn, seconds: float, max_calls: int = 100_000) -> np.ndarray:
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end and len(times) < max_calls:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.asarray(times)


def parallel_b64(singles: list, batch: np.ndarray, seconds: float) -> float:
    """img/s of ``len(singles)`` single-thread sessions each running batch 64 back to back on its own thread,
    all at once (ORT releases the GIL): the offline figure of what N single-thread instances can do."""
    import threading

    counts = [0] * len(singles)
    start = threading.Barrier(len(singles) + 1)

    def work(i: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            singles[i].clf.run(batch)
            counts[i] += len(batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(singles))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def offline(ceiling, served, x: np.ndarray, jpegs: list[bytes], seconds: float, image: bool,
            singles: list | None = None) -> dict:
    """In this process: ``ceiling`` is the runtime with its default session options (the servers' thread
    count), ``served`` the session options `edgecnn serve` uses under load (its spinning twin); both on the
    relaxed model. ``singles``: one single-thread session per usable CPU (``parallel_b64``)."""
    from PIL import Image

    batch = np.ascontiguousarray(np.concatenate([x] * (OFFLINE_BATCH // len(x) + 1))[:OFFLINE_BATCH])
    res: dict = {}
    for m in (ceiling, served):
        for _ in range(5):
            m.clf.run(batch)
    t = _timed_calls(lambda: ceiling.clf.run(batch), seconds)
    res["b64_img_s"] = OFFLINE_BATCH * len(t) / t.sum()
    one = np.ascontiguousarray(batch[:1])
    res["b1_p50_ms"] = float(np.median(_timed_calls(lambda: ceiling.clf.run(one), seconds / 2)) * 1e3)
    c0, t0, n = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 3:
        ceiling.clf.run(batch)
        n += OFFLINE_BATCH
    res["b64_cpu_us_per_image"] = (time.process_time() - c0) / n * 1e6
    # The session as the servers run it: batch-b call times, to set a phase's mean batch against.
    res["served_batch_ms"] = {}
    for b in (1, 8, 32, OFFLINE_BATCH):
        xb = np.ascontiguousarray(batch[:b])
        res["served_batch_ms"][b] = float(np.median(_timed_calls(lambda xb=xb: served.clf.run(xb), seconds / 4)) * 1e3)
    res["parallel_b64_img_s"] = float("nan")
    if singles:
        for m in singles:
            m.clf.run(batch)
        res["parallel_b64_img_s"] = parallel_b64(singles, batch, seconds / 2)
    if image:
        blobs = (jpegs * (OFFLINE_BATCH // len(jpegs) + 1))[:OFFLINE_BATCH]
        t = _timed_calls(lambda: ceiling.clf.run(ceiling.clf.preprocess([Image.open(io.BytesIO(b)) for b in blobs])),
                         seconds / 2)
        res["image_b64_img_s"] = OFFLINE_BATCH * len(t) / t.sum()
    return res


def served_model_ms(off: dict, batch: float) -> float:
    """Model time of one call at a (mean) batch size, interpolated between the measured batch sizes."""
    sizes = sorted(off["served_batch_ms"])
    return float(np.interp(batch, sizes, [off["served_batch_ms"][s] for s in sizes]))


# ------------------------------------------------------------------------------------------ the run
def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None and not np.isnan(r[key])]
    return float(np.median(vals)) if vals else float("nan")


def run(a) -> dict:
    from edgecnn.runtimes import Classifier
    from edgecnn.runtimes.cpu import current_defaults, describe_cpu
    from edgecnn.runtimes.onnx_batch import relax_batch_file
    from edgecnn.runtimes.serve import ServedModel
    from PIL import Image

    from edgecnn.data import synthetic_dataset

    cpu = describe_cpu()
    defaults = current_defaults()
    threads = a.threads or defaults.threads  # what `edgecnn serve` runs without -O threads (instances 1)
    server_options = {"threads": a.threads} if a.threads else {}
    clients = a.clients
    most = max(clients)
    with tempfile.TemporaryDirectory(prefix="edgecnn-serve-bench-") as td:
        folder = Path(td)
        model = make_model(folder)
        relaxed = relax_batch_file(model, folder / "model.relaxed.onnx")  # the copy `edgecnn serve` makes
        n_inputs = most * INPUTS_PER_CLIENT
        images = synthetic_dataset(n_inputs // 6 + 1, seed=5).images[:n_inputs]
        jpegs = jpeg_bytes(images)
        with Classifier(model, threads=threads) as clf:
            x = clf.preprocess(list(images))
            ref_tensor = [clf.run(x[i: i + 1]) for i in range(len(x))]
            ref_image = [clf.run(clf.preprocess([Image.open(io.BytesIO(b))])) for b in jpegs] if a.image else []
        ceiling = ServedModel(model, relax=True, threads=threads)
        served = ServedModel(model, relax=True, threads=threads, spinning=SERVE_SPINNING)
        singles = [ServedModel(model, relax=True, threads=1) for _ in range(threads)] if threads > 1 else []
        input_name = served.input_name
        jbodies = [json_body(input_name, x[i: i + 1]) for i in range(len(x))]
        reqs = {("edgecnn", "json"): [http_post("model", b) for b in jbodies],
                ("edgecnn", "binary"): [binary_request("model", input_name, "binary", x[i: i + 1]) for i in range(len(x))],
                ("edgecnn", "image"): [binary_request("model", input_name, "image", b) for b in jpegs],
                ("mlserver", "json"): [http_post("model", b) for b in jbodies]}  # the same bytes
        reqs[("edgecnn-also", "binary")] = reqs[("edgecnn", "binary")]
        reqs[("edgecnn-also", "image")] = reqs[("edgecnn", "image")]
        refs = {"json": ref_tensor, "binary": ref_tensor, "image": ref_image}

        servers: dict[str, Server] = {}
        notes, failures = [], []
        try:
            servers["edgecnn"] = EdgecnnServer(folder, model, server_options).start()
            if a.also:  # the same binary and JPEG phases against another configuration, in the same rounds
                servers["edgecnn-also"] = EdgecnnServer(folder, model, server_options, shlex.split(a.also),
                                                        label="edgecnn-also").start()
            if a.no_mlserver:
                notes.append("MLServer rows skipped (--no-mlserver).")
            elif a.mlserver_python is None:
                notes.append(f"MLServer not installed: create it with `{MLSERVER_INSTALL}` (in the repository "
                             "root) or pass --mlserver-python; its rows were skipped.")
            else:
                peer = MLServerPeer(folder, a.mlserver_python, relaxed, threads, a.mlserver_batch_size,
                                    a.mlserver_batch_time)
                try:
                    servers["mlserver"] = peer.start()
                except RuntimeError as e:  # the edgecnn rows are still measured; the run fails at the end
                    peer.stop()
                    notes.append(f"MLServer FAILED to start, its rows are missing: {str(e)[-1500:]}")
                    failures.append("MLServer did not start")
            plan = []  # per round: the phases in this order (edgecnn JSON beside MLServer JSON at each count)
            for c in clients:
                plan += [("edgecnn", "json", c)] + ([("mlserver", "json", c)] if "mlserver" in servers else [])
                plan.append(("edgecnn", "binary", c))
                if "edgecnn-also" in servers:
                    plan.append(("edgecnn-also", "binary", c))
            if a.image:
                plan.append(("edgecnn", "image", most))
                if "edgecnn-also" in servers:
                    plan.append(("edgecnn-also", "image", most))
            offs, samples = [], {}
            for rnd in range(a.rounds):
                quiet(list(servers.values()))
                offs.append(offline(ceiling, served, x, jpegs, max(1.0, a.seconds / 2), a.image, singles))
                print(f"round {rnd} offline: b64 {offs[-1]['b64_img_s']:,.0f} img/s, b1 p50 "
                      f"{offs[-1]['b1_p50_ms']:.3f} ms, {len(singles)} single-thread sessions at b64 "
                      f"{offs[-1]['parallel_b64_img_s']:,.0f} img/s", file=sys.stderr)
                order = plan if rnd % 2 == 0 else plan[::-1]  # alternate the order: no phase always goes first
                for name, enc, c in order:
                    srv = servers[name]
                    per_client = [(reqs[(name, enc)][i * INPUTS_PER_CLIENT:(i + 1) * INPUTS_PER_CLIENT],
                                   refs[enc][i * INPUTS_PER_CLIENT:(i + 1) * INPUTS_PER_CLIENT]) for i in range(c)]
                    others = [s for s in servers.values() if s is not srv]
                    settled = quiet(others)  # the last phase's server has finished its leftover work
                    m0 = srv.metrics()
                    cpu0, mine0, wall0 = srv.cpu(), time.process_time(), time.perf_counter()
                    other0 = sum(s.cpu() for s in others)
                    res = load_phase(srv.port, per_client, a.warmup, a.seconds)
                    cpu1, mine1, wall1 = srv.cpu(), time.process_time(), time.perf_counter()
                    other1 = sum(s.cpu() for s in others)
                    m1 = srv.metrics()
                    n = max(res["sent"], 1)
                    res.update(server=name, encoding=enc, clients=c, round=rnd,
                               server_cpu_us_per_request=(cpu1 - cpu0) / n * 1e6,
                               client_cpu_us_per_request=(mine1 - mine0) / n * 1e6,
                               server_cores_busy=(cpu1 - cpu0) / (wall1 - wall0),
                               other_servers_cores_busy=(other1 - other0) / (wall1 - wall0),
                               settle_s=settled)
                    res.update(_metric_deltas(m0, m1))
                    samples.setdefault((name, enc, c), []).append(res)
                    print(f"round {rnd} {name:8s} {enc:6s} c{c:<3d}: {res['throughput']:8.0f} req/s  p50 "
                          f"{res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  errors {res['errors']}  wrong "
                          f"{res['wrong_answers']}  (other server {res['other_servers_cores_busy']:.2f} cores; "
                          f"settled in {settled:.1f} s)", file=sys.stderr)
        finally:
            exits = {name: s.stop() for name, s in servers.items()}
            logs = {name: s.log.read_text()[-2000:] for name, s in servers.items()}
            ceiling.close()
            served.close()
            for m in singles:
                m.close()
        failures += [f"{n} exited with {c}" for n, c in exits.items() if c not in (0, None)]
        peer = servers.get("mlserver")
        mlserver_info = None if peer is None else {
            "versions": peer.versions(), "settings.json": peer.settings, "model-settings.json": peer.model_settings}
    rows = []
    for (name, enc, c), rs in samples.items():
        row = {k: _median(rs, k) for k in ("throughput", "p50_ms", "p99_ms", "server_cpu_us_per_request",
                                           "client_cpu_us_per_request", "server_cores_busy", "other_servers_cores_busy", "server_mean_ms",
                                           "queue_mean_ms", "mean_batch", "peer_model_ms", "peer_predict_ms")}
        row.update(server=name, encoding=enc, clients=c, errors=sum(r["errors"] for r in rs),
                   wrong_answers=sum(r["wrong_answers"] for r in rs), requests=sum(r["sent"] for r in rs),
                   per_round=rs)
        rows.append(row)
    off = {k: _median(offs, k) for k in ("b64_img_s", "b1_p50_ms", "b64_cpu_us_per_image", "image_b64_img_s",
                                         "parallel_b64_img_s")}
    off["single_sessions"] = len(singles)
    off["served_batch_ms"] = {b: float(np.median([o["served_batch_ms"][b] for o in offs]))
                              for b in offs[0]["served_batch_ms"]}
    off["per_round"] = offs
    return {"machine": f"{cpu.text()}; Python {sys.version.split()[0]}", "cpu_kind": cpu.kind,
            "commit": git_commit(), "load_average_at_start": a.load_at_start, "load_average_at_end": os.getloadavg(),
            "clients": clients, "seconds": a.seconds, "warmup": a.warmup, "rounds": a.rounds, "threads": threads,
            "runtime_default_spinning": defaults.spinning, "served_spinning": SERVE_SPINNING,
            "edgecnn_command": " ".join(servers["edgecnn"].cmd[1:]) if "edgecnn" in servers else "",
            "edgecnn_listening": servers["edgecnn"].listening if "edgecnn" in servers else "",
            "also": a.also, "also_command": " ".join(servers["edgecnn-also"].cmd[1:]) if "edgecnn-also" in servers else "",
            "also_listening": servers["edgecnn-also"].listening if "edgecnn-also" in servers else "",
            "mlserver": mlserver_info, "server_exit": exits, "server_log_tail": logs, "notes": notes,
            "failures": failures,
            "offline": off, "rows": rows,
            "client": "one asyncio process (uvloop when installed; an asyncio Protocol per connection parsing "
                      "each response from its own buffer, checking and recording it and writing the next request "
                      "in the same callback, no task or future per request), pre-encoded HTTP/1.1 requests, one "
                      "keep-alive connection per client, batch-1 requests back to back"}


def _metric_deltas(m0: dict, m1: dict) -> dict:
    def d(key):
        return m1[key] - m0[key] if key in m0 and key in m1 else None

    out = {}
    for label, base, scale in (("server_mean_ms", "edgecnn_request_duration_seconds", 1e3),
                               ("queue_mean_ms", "edgecnn_queue_seconds", 1e3), ("mean_batch", "edgecnn_batch_size", 1)):
        s, c = d(base + "_sum"), d(base + "_count")
        out[label] = s / c * scale if s is not None and c else None
    out["server_counted_errors"] = d("edgecnn_request_errors_total")
    calls = d("peer_calls")
    if calls:  # the MLServer peer: what its batcher handed to predict()
        out["mean_batch"] = d("peer_rows") / calls
        out["peer_model_ms"] = d("peer_run_s") / calls * 1e3
        out["peer_predict_ms"] = d("peer_predict_s") / calls * 1e3
    return out


# ------------------------------------------------------------------------------------------ the report
def targets(res: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met: True/False, None = not measured in this run)."""
    by = {(r["server"], r["encoding"], r["clients"]): r for r in res["rows"]}
    off = res["offline"]
    out = []
    for c in (8, 32):
        e, m = by.get(("edgecnn", "json", c)), by.get(("mlserver", "json", c))
        name = f"JSON, {c} clients: edgecnn >= 1.5x MLServer req/s, p99 no worse"
        if e is None or m is None:
            out.append((name, "not measured" + ("" if m or e is None else " (no MLServer rows)"), None))
        else:
            ratio = e["throughput"] / m["throughput"] if m["throughput"] else float("inf")
            out.append((name, f"{ratio:.2f}x; p99 {e['p99_ms']:.2f} vs {m['p99_ms']:.2f} ms",
                        ratio >= 1.5 and e["p99_ms"] <= m["p99_ms"]))
    b = by.get(("edgecnn", "binary", 32))
    name = "binary, 32 clients: edgecnn >= 75% of offline batch-64 img/s"
    out.append((name, f"{b['throughput']:,.0f} / {off['b64_img_s']:,.0f} = {b['throughput'] / off['b64_img_s']:.0%}",
                b["throughput"] >= 0.75 * off["b64_img_s"]) if b else (name, "not measured", None))
    b = by.get(("edgecnn", "binary", 1))
    name = "binary, 1 client: p50 <= offline batch-1 p50 + 0.5 ms"
    out.append((name, f"{b['p50_ms']:.3f} vs {off['b1_p50_ms']:.3f} + 0.5 ms", b["p50_ms"] <= off["b1_p50_ms"] + 0.5)
               if b else (name, "not measured", None))
    errors = sum(r["errors"] for r in res["rows"])
    wrong = sum(r["wrong_answers"] for r in res["rows"])
    total = sum(r["requests"] for r in res["rows"])
    out.append(("every answer correct, zero errors (all servers, all phases)",
                f"{wrong} wrong, {errors} errors in {total:,} requests", wrong == 0 and errors == 0))
    return out


def _f(v, fmt):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


BODY_LABEL = {"json": "JSON", "binary": "binary", "image": "JPEG BYTES (binary)"}  # an encoding, as the tables name it


def write(res: dict, out: Path, command: str) -> None:
    off = res["offline"]
    cs = res["clients"]
    by = {(r["server"], r["encoding"], r["clients"]): r for r in res["rows"]}
    ml = res["mlserver"]
    lines = [
        "# `edgecnn serve` under load against MLServer and the offline ceiling (one run, one machine, loopback)", "",
        f"- Machine: {res['machine']} (CPU kind `{res['cpu_kind']}`).",
        f"- Command: `{command}`; code measured: commit `{res['commit']}`.",
        f"- Load average (other work on the machine) at start {', '.join(f'{v:.2f}' for v in res['load_average_at_start'])}"
        f", at end {', '.join(f'{v:.2f}' for v in res['load_average_at_end'])}.",
        f"- {res['rounds']} interleaved rounds (offline, then every server phase; the phase order alternates), "
        f"{res['seconds']:g} s per phase after {res['warmup']:g} s warm-up; medians shown, every round in serve.json.",
        f"- Model: the default Net exported to ONNX (fixed batch 1), served through its batch-relaxed copy; "
        f"onnxruntime CPU, {res['threads']} intra-op threads everywhere. Client: {res['client']}; each client "
        f"its own {INPUTS_PER_CLIENT} inputs, every answer checked against that input's offline logits "
        f"(rtol {RTOL:g}, atol {ATOL:g}; an answer byte for byte equal to one already found close is that same "
        f"answer and is not compared again).",
        f"- edgecnn serve, default settings: `{res['edgecnn_command']}`; it said: `{res['edgecnn_listening']}`.",
    ]
    if res.get("also"):
        lines.append(f"- edgecnn serve `{res['also']}` (the binary and JPEG rows \"edgecnn serve {res['also']}\", "
                     "same rounds): "
                     f"`{res['also_command']}`; it said: `{res['also_listening']}`.")
    if ml:
        ms = ml["model-settings.json"]
        lines.append(f"- MLServer peer ({ml['versions']}): custom runtime benchmarks/mlserver_peer/runtime.py on the "
                     f"same relaxed ONNX file, same session options (threads {res['threads']}, spinning "
                     f"{'on' if res['served_spinning'] else 'off'}), adaptive batching max_batch_size "
                     f"{ms['max_batch_size']}, max_batch_time {ms['max_batch_time']:g} s, parallel_workers 0 "
                     "(inference in the server process), debug off; the same JSON request bytes as edgecnn's JSON rows.")
    lines += [f"- Note: {n}" for n in res["notes"]] + [f"- **FAILURE: {f}**" for f in res["failures"]]
    head = "| server | encoding | " + " | ".join(f"c{c} req/s | c{c} p50 ms | c{c} p99 ms" for c in cs) + \
           " | errors | wrong answers |"
    lines += ["", "## Throughput and latency", "", head, "|---|---|" + "---|---|---|" * len(cs) + "---|---|"]
    row_kinds = [("edgecnn", "json"), ("edgecnn", "binary"), ("edgecnn-also", "binary"), ("edgecnn", "image"),
                 ("edgecnn-also", "image"), ("mlserver", "json"), ("mlserver", "binary")]
    shown = {"edgecnn": "edgecnn serve", "mlserver": "MLServer", "edgecnn-also": f"edgecnn serve {res.get('also')}"}
    for name, enc in row_kinds:
        rs = [by.get((name, enc, c)) for c in cs]
        if name == "mlserver" and enc == "binary":
            lines.append("| MLServer | binary | " + " | ".join("n/a | n/a | n/a" for _ in cs) +
                         " | n/a | n/a |  (MLServer has no binary tensor extension)")
            continue
        if not any(rs):
            continue
        cells = " | ".join(f"{r['throughput']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f}" if r else "- | - | -"
                           for r in rs)
        lines.append(f"| {shown[name]} | {BODY_LABEL[enc]} | {cells} | "
                     f"{sum(r['errors'] for r in rs if r)} | {sum(r['wrong_answers'] for r in rs if r)} of "
                     f"{sum(r['requests'] for r in rs if r):,} |")
    spin = "on" if res["runtime_default_spinning"] else "off"
    lines += ["", f"Offline ceiling, same model and runtime, in this process (runtime default session options: "
              f"{res['threads']} threads, spinning {spin}): batch 64 **{off['b64_img_s']:,.0f} img/s**, batch 1 "
              f"p50 **{off['b1_p50_ms']:.3f} ms**; the model alone costs {off['b64_cpu_us_per_image']:.0f} CPU µs per "
              f"image at batch 64." + (f" JPEG decode + preprocessing + model at batch 64: "
                                       f"{off['image_b64_img_s']:,.0f} img/s." if not np.isnan(off["image_b64_img_s"]) else ""),
              f"With the servers' session options (spinning {'on' if res['served_spinning'] else 'off'}), one call "
              "takes " + ", ".join(f"{v:.3f} ms at batch {b}" for b, v in off["served_batch_ms"].items()) + "."
              + (f" {off['single_sessions']} single-thread sessions, each on its own thread running batch 64 at the "
                 f"same time (what {off['single_sessions']} single-thread instances could do at best): "
                 f"{off['parallel_b64_img_s']:,.0f} img/s." if off.get("single_sessions") else ""),
              "", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(res):
        lines.append(f"| {name} | {measured} | {'not measured' if met is None else 'yes' if met else 'NO'} |")
    b = by.get(("edgecnn", "binary", 32))
    if b and off.get("single_sessions") and not np.isnan(off["parallel_b64_img_s"]):
        lines += ["", f"Against the offline figure of {off['single_sessions']} single-thread sessions at batch 64 in "
                  f"parallel (not the target's ceiling; shown so that no configuration is hidden): binary at 32 "
                  f"clients {b['throughput']:,.0f} / {off['parallel_b64_img_s']:,.0f} = "
                  f"{b['throughput'] / off['parallel_b64_img_s']:.0%}."]
    if res.get("also"):
        lines += ["", f"## Default against `{res['also']}`, round by round (req/s; 1 client: p50 ms)", "",
                  "| body | clients | " + " | ".join(f"round {i}" for i in range(res["rounds"])) + " |",
                  "|---|---|" + "---|" * res["rounds"]]
        for enc in ("binary", "image"):
            for c in cs:
                d, o = by.get(("edgecnn", enc, c)), by.get(("edgecnn-also", enc, c))
                if d and o:
                    key, fmt = ("p50_ms", ".3f") if c == 1 else ("throughput", ",.0f")
                    cells = [f"{format(x[key], fmt)} vs {format(y[key], fmt)}"
                             for x, y in zip(d["per_round"], o["per_round"], strict=False)]
                    lines.append(f"| {BODY_LABEL[enc]} | {c} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the server's own cost per request goes", "",
              "Server-side means per request from edgecnn's /metrics (edgecnn_request_duration_seconds: from the "
              "request's headers to its encoded answer; edgecnn_queue_seconds: waiting for its batch to start; "
              "edgecnn_batch_size), read before and after each phase (warm-up included). \"model\" is the offline "
              "time of one call at the phase's mean batch (interpolated between the batch sizes measured above) on the "
              f"{res['threads']}-thread session, also where the server runs single-thread instances (their calls "
              "take longer, so there \"rest\" overstates the server's own share); "
              "\"rest\" = server − queue − model: protocol parsing, decoding, hand-offs, encoding. CPU µs per request "
              "from psutil on the server process (all threads, children included) and on this client process, "
              "before and after each phase.", "",
              "| server | encoding | clients | mean batch | server ms | queue ms | model ms | rest ms | "
              "predict() ms/batch | server CPU µs/req | client CPU µs/req | server cores busy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, enc in row_kinds:
        for c in cs:
            r = by.get((name, enc, c))
            if not r:
                continue
            if name == "mlserver":  # measured inside its runtime: session.run per merged batch
                model, rest = _f(r["peer_model_ms"], ".3f") + " (in its runtime)", "n/a"
                runtime_ms = _f(r["peer_predict_ms"], ".3f")
            else:
                model_ms = served_model_ms(off, r["mean_batch"]) if not np.isnan(r["mean_batch"]) else None
                rest = (r["server_mean_ms"] - r["queue_mean_ms"] - model_ms) if model_ms is not None else None
                model, rest, runtime_ms = _f(model_ms, ".3f"), _f(rest, ".3f"), "n/a"
            lines.append(f"| {name} | {enc} | {c} | {_f(r['mean_batch'], '.1f')} | {_f(r['server_mean_ms'], '.3f')} | "
                         f"{_f(r['queue_mean_ms'], '.3f')} | {model} | {rest} | {runtime_ms} | "
                         f"{r['server_cpu_us_per_request']:,.0f} | {r['client_cpu_us_per_request']:,.0f} | "
                         f"{r['server_cores_busy']:.2f} |")
    lines += ["", f"The model alone: {off['b64_cpu_us_per_image']:.0f} CPU µs per image at batch 64 (all its threads); "
              f"batch 1 one call at a time {off['served_batch_ms'][1] * 1e3:.0f} µs wall (servers' options). MLServer "
              "has no queue/duration histograms of this kind; its rows show what its runtime saw (GET /peer-stats of "
              "benchmarks/mlserver_peer/runtime.py): the mean batch its adaptive batcher formed, session.run time "
              "per batch, and predict() (NumpyCodec decode + run + encode) per batch. The client "
              "shares the machine's cores with the servers: its CPU per request is part of every figure above."]
    out.mkdir(parents=True, exist_ok=True)
    for stem in ("serve", f"serve-{res['cpu_kind']}"):  # the latest run, and the latest on this CPU kind
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase (not measured)")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for all (passes -O threads=N to edgecnn serve) [default: the server's own]")
    ap.add_argument("--mlserver-python", type=Path, default=None,
                    help="python of MLServer's venv [default: .venv-mlserver/bin/python beside the repo, if any]")
    ap.add_argument("--no-mlserver", action="store_true", help="skip the MLServer rows")
    ap.add_argument("--mlserver-batch-size", type=int, default=64)
    ap.add_argument("--mlserver-batch-time", type=float, default=0.002, help="MLServer max_batch_time, seconds")
    ap.add_argument("--no-image", dest="image", action="store_false", help="skip the JPEG BYTES row")
    ap.add_argument("--also", default=None, metavar="ARGS",
                    help="a second `edgecnn serve` with these extra arguments (e.g. \"--instances 1\"): its binary "
                         "and JPEG phases run in the same rounds, beside the default's")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round of 1 s phases, 0.5 s warm-up")
    ap.add_argument("--fail-on-targets", action="store_true", help="exit 3 when a target is missed")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds, a.warmup = 1, 1.0, 0.5
    try:
        a.clients = sorted({int(c) for c in a.clients.split(",") if c.strip()})
    except ValueError:
        ap.error("--clients takes comma-separated integers")
    if not a.clients or not all(1 <= c <= 256 for c in a.clients):
        ap.error("--clients must be 1-256")
    if not 0 < a.seconds <= 60 or not 0 <= a.warmup <= 30 or not 1 <= a.rounds <= 10:
        ap.error("--seconds must be in (0, 60], --warmup in [0, 30], --rounds 1-10")
    if a.no_mlserver:
        a.mlserver_python = None
    elif a.mlserver_python is None:
        a.mlserver_python = default_mlserver_python()
    elif not a.mlserver_python.exists():
        ap.error(f"--mlserver-python {a.mlserver_python}: no such file")
    a.load_at_start = os.getloadavg()
    res = run(a)
    write(res, a.out, "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:]))
    bad = sum(r["wrong_answers"] + r["errors"] for r in res["rows"])
    if bad or res["failures"]:
        print(f"FAILED: {sum(r['wrong_answers'] for r in res['rows'])} wrong answers, "
              f"{sum(r['errors'] for r in res['rows'])} errors" + "".join(f"; {f}" for f in res["failures"]),
              file=sys.stderr)
        return 1
    if a.fail_on_targets and any(met is not True for _, _, met in targets(res)):
        print("FAILED: a target was missed or not measured (--fail-on-targets)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
