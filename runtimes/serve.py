"""`edgecnn serve`: a model behind the KServe v2 / Open Inference Protocol, with dynamic batching. Torch-free.

An ASGI app run by uvicorn (httptools parser, uvloop when installed): one event loop parses requests,
a batcher collects concurrent requests into one batch (up to ``max_batch`` rows, or until the oldest
has waited ``max_delay_ms``) and runs it on one worker thread (the runtime releases the GIL, so the
loop keeps reading requests meanwhile); each caller gets its own rows back. Protocol details live in
``serve_protocol``; /metrics uses prometheus-client.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edgecnn.errors import InvalidInputError, MissingDependencyError

from .preprocess import softmax
from .serve_model import IMAGES_INPUT, MODEL_VERSION, ServedModel, resolve_model  # noqa: F401 - re-exported
from .serve_protocol import (
    OutputTensor,
    ProtocolError,
    RequestedOutput,
    classification,
    encode_infer_response,
    parse_infer_request,
)

EXTENSIONS = ["binary_tensor_data", "classification"]


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_delay_ms: float = 2.0
    instances: int = 1
    max_body_bytes: int = 16 << 20
    graceful_timeout_s: float = 30.0

    def check(self) -> None:
        if self.max_batch < 1:
            raise InvalidInputError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 1 <= self.instances <= 64:
            raise InvalidInputError(f"--instances must be 1-64, got {self.instances}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise InvalidInputError(f"--max-delay-ms must be between 0 and 10000, got {self.max_delay_ms}")
        if self.max_body_bytes < 1024:
            raise InvalidInputError("the body size limit must be at least 1 KiB")
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"--port must be 0-65535, got {self.port}")


class Metrics:
    """Prometheus metrics in their own registry (several servers in one process do not collide)."""

    def __init__(self, max_batch: int):
        try:
            import prometheus_client as pc
        except ImportError:
            raise MissingDependencyError("prometheus-client", "serve", "`edgecnn serve`") from None
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("edgecnn_requests", "HTTP requests by endpoint and status code",
                                   ["endpoint", "code"], registry=r)
        self.errors = pc.Counter("edgecnn_request_errors", "Requests answered with an error, by status code",
                                 ["code"], registry=r)
        self.latency = pc.Histogram("edgecnn_request_duration_seconds", "Inference request latency (server side)",
                                    registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.queue = pc.Histogram("edgecnn_queue_seconds", "Time a request waited for its batch to start",
                                  registry=r, buckets=(.0001, .0005, .001, .002, .005, .01, .02, .05, .1, .5, 1))
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch = pc.Histogram("edgecnn_batch_size", "Rows per model call", registry=r,
                                  buckets=tuple(s for s in sizes if s <= max(max_batch, 1)))
        self.in_flight = pc.Gauge("edgecnn_requests_in_flight", "Inference requests accepted and not answered",
                                  registry=r)
        self.accepted = 0
        self.answered = 0

    def render(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST


class Batcher:
    """Collects submitted row blocks into batches; runs up to ``instances`` batches at once, each on its
    own worker thread (Triton's instance count), and hands each caller its own rows."""

    def __init__(self, run, max_batch: int, max_delay_s: float, metrics: Metrics, instances: int = 1):
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self._queue: collections.deque = collections.deque()
        self._rows = 0
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(instances, thread_name_prefix="edgecnn-batch")
        self._slots = asyncio.Semaphore(instances)
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        was_empty = not self._queue
        self._queue.append((x, fut, time.perf_counter()))
        self._rows += x.shape[0]
        if was_empty or self._rows >= self.max_batch:
            self._wake.set()
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._slots.acquire()  # a free instance: while none is, the queue keeps filling
            remaining = self._queue[0][2] + self.max_delay_s - time.perf_counter()
            if self._rows < self.max_batch and remaining > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            items, rows = [], 0
            while self._queue and (not items or rows + self._queue[0][0].shape[0] <= self.max_batch):
                x, fut, t0 = self._queue.popleft()
                self._rows -= x.shape[0]
                if fut.cancelled():
                    continue
                items.append((x, fut, t0))
                rows += x.shape[0]
            if not items:
                self._slots.release()
                continue
            now = time.perf_counter()
            for _, _, t0 in items:
                self.metrics.queue.observe(now - t0)
            self.metrics.batch.observe(rows)
            batch = items[0][0] if len(items) == 1 else np.concatenate([x for x, _, _ in items])
            task = loop.create_task(self._execute(items, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, items: list, batch: np.ndarray) -> None:
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, self._run, batch)
        except Exception as e:  # noqa: BLE001 - handed to every caller of this batch
            for _, fut, _ in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        finally:
            self._slots.release()
        i = 0
        for x, fut, _ in items:
            n = x.shape[0]
            if not fut.done():
                fut.set_result(out[i : i + n])
            i += n


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json_body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class App:
    """The ASGI application: routes, validation, batching, metrics."""

    def __init__(self, model: ServedModel, cfg: ServeConfig):
        self.model = model
        self.cfg = cfg
        self.metrics = Metrics(cfg.max_batch)
        self.batcher: Batcher | None = None
        self.ready = False
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="edgecnn-decode")

    # ---- ASGI entry ---------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, body, headers = await self._route(scope, receive)
        except HTTPError as e:
            status, body, headers = e.status, _json_body({"error": str(e)}), {}
        except Exception as e:  # noqa: BLE001 - a bug answers 500, the server keeps serving
            status, body, headers = 500, _json_body({"error": f"internal error: {type(e).__name__}: {e}"}), {}
        self.metrics.requests.labels(scope.get("edgecnn.endpoint", "other"), str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(str(status)).inc()
        ctype = headers.pop("content-type", "application/json")
        raw_headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.encode(), str(v).encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})
        if scope.get("edgecnn.accepted"):
            self.metrics.answered += 1

    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.batcher = Batcher(self.model.clf.run, self.cfg.max_batch, self.cfg.max_delay_ms / 1e3,
                                       self.metrics, self.cfg.instances)
                self.batcher.start()
                self.ready = True
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.ready = False
                if self.batcher is not None:
                    await self.batcher.stop()
                self._decode_pool.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- routes -------------------------------------------------------------------------------
    async def _route(self, scope, receive):
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        parts = path.strip("/").split("/")
        if path == "/metrics":
            self._method(method, "GET")
            body, ctype = self.metrics.render()
            scope["edgecnn.endpoint"] = "metrics"
            return 200, body, {"content-type": ctype}
        if parts[:1] != ["v2"]:
            raise HTTPError(404, f"no such endpoint: {path}")
        if len(parts) == 1:
            self._method(method, "GET")
            from edgecnn import __version__

            scope["edgecnn.endpoint"] = "server"
            return 200, _json_body({"name": "edgecnn", "version": __version__,
                                              "extensions": EXTENSIONS}), {}
        if parts[1] == "health" and len(parts) == 3 and parts[2] in ("live", "ready"):
            self._method(method, "GET")
            ok = parts[2] == "live" or self.ready
            scope["edgecnn.endpoint"] = "health"
            return (200 if ok else 503), b"", {}
        if parts[1] != "models" or len(parts) < 3:
            raise HTTPError(404, f"no such endpoint: {path}")
        name, rest = parts[2], parts[3:]
        if len(rest) >= 2 and rest[0] == "versions":
            if rest[1] != MODEL_VERSION:
                raise HTTPError(404, f"model {name!r} has no version {rest[1]!r} (versions: {MODEL_VERSION})")
            rest = rest[2:]
        if name != self.model.name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {self.model.name!r}")
        if not rest:
            self._method(method, "GET")
            scope["edgecnn.endpoint"] = "metadata"
            return 200, _json_body(self.model.metadata(self.cfg)), {}
        if rest == ["ready"]:
            self._method(method, "GET")
            scope["edgecnn.endpoint"] = "ready"
            return (200 if self.ready else 503), b"", {}
        if rest == ["infer"]:
            self._method(method, "POST")
            scope["edgecnn.endpoint"] = "infer"
            return await self._infer(scope, receive)
        raise HTTPError(404, f"no such endpoint: {path}")

    @staticmethod
    def _method(got: str, want: str) -> None:
        if got != want:
            raise HTTPError(405, f"method {got} not allowed here (use {want})")

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.cfg.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise HTTPError(400, "Content-Length is not an integer") from None
                if declared > limit:
                    raise HTTPError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HTTPError(400, "client disconnected")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(self, scope, receive):
        t0 = time.perf_counter()
        body = await self._read_body(scope, receive)
        header_len = None
        for k, v in scope["headers"]:
            if k == b"inference-header-content-length":
                header_len = v.decode("latin-1")
        self.metrics.accepted += 1
        scope["edgecnn.accepted"] = True
        self.metrics.in_flight.inc()
        try:
            try:
                req = parse_infer_request(body, header_len)
                x = await self._model_input(req)
            except ProtocolError as e:
                raise HTTPError(e.status, str(e)) from None
            if not self.ready:
                raise HTTPError(503, "the server is shutting down")
            unknown = [w.name for w in req.outputs or () if w.name not in self.model.outputs]
            if unknown:  # refused before the model runs for it
                raise HTTPError(400, f"unknown output {unknown[0]!r}; this model has {', '.join(self.model.outputs)}")
            logits = await self.batcher.submit(x)
            outputs = self._outputs(req, logits)
            resp, json_len = encode_infer_response(self.model.name, MODEL_VERSION, req.id, outputs)
        finally:
            self.metrics.in_flight.dec()
        self.metrics.latency.observe(time.perf_counter() - t0)
        headers = {}
        if json_len is not None:
            headers = {"content-type": "application/octet-stream", "inference-header-content-length": json_len}
        return 200, resp, headers

    async def _model_input(self, req) -> np.ndarray:
        if len(req.inputs) != 1:
            raise ProtocolError(f"give exactly one input ({self.model.input_name!r} or {IMAGES_INPUT!r}), "
                                f"got {len(req.inputs)}")
        t = req.inputs[0]
        m = self.model
        if t.name == IMAGES_INPUT:
            if t.datatype != "BYTES":
                raise ProtocolError(f"input {IMAGES_INPUT!r} must be BYTES (encoded image files), got {t.datatype}")
            if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)) or t.shape[0] < 1:
                raise ProtocolError(f"input {IMAGES_INPUT!r} must have shape [N] or [N,1] with N >= 1, "
                                    f"got {list(t.shape)}")
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._decode_pool, m.decode_images, t.data)
            except InvalidInputError as e:
                raise ProtocolError(str(e)) from None
        if t.name != m.input_name:
            raise ProtocolError(f"unknown input {t.name!r}; this model takes {m.input_name!r} "
                                f"({m.input_datatype} {[-1, *m.input_dims]}) or {IMAGES_INPUT!r} (BYTES)")
        if t.datatype != m.input_datatype:
            raise ProtocolError(f"input {t.name!r} must be {m.input_datatype}, got {t.datatype}")
        if len(t.shape) != 4 or tuple(t.shape[1:]) != m.input_dims or t.shape[0] < 1:
            raise ProtocolError(f"input {t.name!r} must have shape [N, {', '.join(map(str, m.input_dims))}] "
                                f"with N >= 1, got {list(t.shape)}")
        x = t.data
        if x.dtype == np.float32 and not np.isfinite(x).all():
            raise ProtocolError(f"input {t.name!r} contains NaN or Inf")
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))

    def _outputs(self, req, logits: np.ndarray) -> list[OutputTensor]:
        m = self.model
        wanted = req.outputs
        if wanted is None:
            wanted = [RequestedOutput(o, req.binary_default) for o in m.outputs]
        out = []
        probs = None
        for w in wanted:  # names were checked before the model ran
            if w.name == "probabilities" and not m.clf.embedded_softmax:
                if probs is None:
                    probs = softmax(logits.astype(np.float32))
                values = probs
            else:
                values = logits
            if w.classification:
                labels = classification(values, w.classification, m.clf.class_names)
                k = len(labels) // values.shape[0]
                out.append(OutputTensor(w.name, "BYTES", (values.shape[0], k), labels, w.binary))
            else:
                out.append(OutputTensor(w.name, "FP32", tuple(values.shape), values, w.binary))
        return out


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(model: ServedModel, cfg: ServeConfig, log=None) -> dict:
    """Run the server until SIGTERM/SIGINT; in-flight requests are finished first. Returns the counts
    of inference requests accepted and answered."""
    cfg.check()
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "serve", "`edgecnn serve`") from None
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    app = App(model, cfg)
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    config = uvicorn.Config(app, loop=loop, http=http, lifespan="on", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=cfg.graceful_timeout_s, backlog=1024,
                            h11_max_incomplete_event_size=64 * 1024)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler makes that
    # a clean return (exit 0) instead of death by SIGTERM.
    stopped_by: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped_by.append(sig))
    shown = f"[{host}]" if ":" in host else host
    for note in model.override_notes + ([model.clf.assumption_note] if getattr(model.clf, "assumption_note", None) else []):
        log(f"edgecnn serve: note: {note}")
    log(f"edgecnn serve: listening on http://{shown}:{port} model {model.name!r} on {model.clf.runtime.describe()}; "
        f"max batch {cfg.max_batch}, max delay {cfg.max_delay_ms:g} ms, {cfg.instances} instance(s), "
        f"batching {model.batching}")
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    counts = {"accepted": app.metrics.accepted, "answered": app.metrics.answered}
    log(f"edgecnn serve: stopped; {counts['accepted']} inference requests accepted, {counts['answered']} answered")
    return counts
