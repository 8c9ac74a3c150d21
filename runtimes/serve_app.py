"""The ASGI app of `edgecnn serve`: routes, limits, error table, metrics; parsing and decoding off the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson

from edgecnn.errors import InvalidInputError, MissingDependencyError

from .serve_batcher import (
    Batcher,
    BatcherDeadError,
    BatcherError,
    QueueFullError,
    RowsFailedError,
    ShuttingDownError,
)
from .serve_model import IMAGES_INPUT, MODEL_VERSION, ServedModel
from .serve_protocol import OutputTensor, ProtocolError, encode_infer_response, inflate, parse_infer_request

log = logging.getLogger("edgecnn.serve")
EXTENSIONS = ["binary_tensor_data", "classification"]
INLINE_BODY_BYTES = 64 << 10  # bodies up to this size are parsed on the loop (cheaper than a thread hop)
INLINE_ROWS = 4  # a request of at most this many rows that finds no other in progress runs on the loop
GONE_CALLBACK = "edgecnn.on_connection_lost"  # scope key: what serve.py's protocol calls when the client leaves
GONE_FLAG = "edgecnn.connection_lost"  # scope key: set by serve.py's protocol when it left with no GONE_CALLBACK set


class HTTPError(Exception):
    """An answer other than 200, with its status and extra headers (Allow, Retry-After, Connection)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class _Gone(Exception):
    """The client disconnected: nothing is sent."""


# The one table from error class to HTTP status (the most specific class wins; None: the error's own .status).
STATUS_OF: dict[type, int | None] = {
    HTTPError: None,
    ProtocolError: None,
    RowsFailedError: 422,
    QueueFullError: 503,
    ShuttingDownError: 503,
    BatcherDeadError: 503,
    BatcherError: 500,
    InvalidInputError: 400,
}


def error_answer(e: BaseException) -> tuple[int, str, dict]:
    """(status, one-line message, headers) for an error; unknown errors are a 500 naming only their type."""
    for cls in type(e).__mro__:
        if cls in STATUS_OF:
            status = STATUS_OF[cls]
            status = getattr(e, "status", 500) if status is None else status
            headers = dict(getattr(e, "headers", {}))
            if status == 503:
                headers.setdefault("retry-after", str(getattr(e, "retry_after", 1)))
            elif status == 413:
                headers["connection"] = "close"
            return status, " ".join(str(e).split()) or type(e).__name__, headers
    log.error("edgecnn serve: internal error answered 500: %s", type(e).__name__)
    return 500, f"internal error ({type(e).__name__})", {}


class Metrics:
    """Prometheus metrics in their own registry (several servers in one process do not collide)."""

    def __init__(self, max_batch: int):
        try:
            import prometheus_client as pc
        except ImportError:
            raise MissingDependencyError("prometheus-client", "serve", "`edgecnn serve`") from None
        self._pc = pc
        self.registry = r = pc.CollectorRegistry()
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
        self.dropped = pc.Counter("edgecnn_requests_dropped", "Inference requests whose client left before "
                                  "the answer (their queued rows are not run)", registry=r)
        self.shed = pc.Counter("edgecnn_requests_shed", "Requests refused with 503 because the server was busy",
                               registry=r)
        self.accepted = self.answered = self.gone = 0
        self._children: dict[tuple[str, int], list] = {}

    def client_gone(self) -> None:
        """One accepted request dropped because its client left (both the exported and the summary count)."""
        self.dropped.inc()
        self.gone += 1

    def count(self, endpoint: str, status: int) -> None:
        """One answered request (the labelled counters are looked up once per endpoint and status)."""
        key = (endpoint, status)
        counters = self._children.get(key)
        if counters is None:
            counters = [self.requests.labels(endpoint, str(status))]
            if status >= 400:
                counters.append(self.errors.labels(str(status)))
            if status == 503 and endpoint == "infer":
                counters.append(self.shed)
            self._children[key] = counters
        for c in counters:
            c.inc()

    def render(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST


_JSON = b"application/json"


class App:
    """The ASGI application. ``on_fatal`` is called once if the batcher dies (the process should exit)."""

    def __init__(self, model: ServedModel, cfg, on_fatal=None):
        self.model = model
        self.cfg = cfg
        self.metrics = Metrics(cfg.max_batch)
        self.batcher: Batcher | None = None
        self.ready = False
        self.fatal: BaseException | None = None
        self._on_fatal = on_fatal
        self._active = 0  # inference requests being read, parsed, decoded, queued or run
        self._body_bytes = 0  # bytes of request bodies held by those requests
        self._body_budget = max(4 * cfg.max_body_bytes, 64 << 20)
        self._decode_pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                               thread_name_prefix="edgecnn-decode")
        self._metadata: bytes | None = None
        self.begun = None  # serve.RequestCount when the HTTP protocol keeps it (else nothing runs inline)
        self.untasked = 0  # inference requests accepted by infer_without_task
        self.lean = 0  # of those, requests serve.py's protocol read itself (its lean path)

    # ---- ASGI entry ---------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            try:
                status, body, headers = await self._route(scope, receive)
            except _Gone:
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every error is answered through the one table
                status, msg, headers = error_answer(e)
                body = orjson.dumps({"error": msg})
            endpoint = scope.get("edgecnn.endpoint", "other")
            self.metrics.count(endpoint, status)
            ctype = headers.pop("content-type", _JSON)
            raw = [(b"content-type", ctype), (b"content-length", b"%d" % len(body))]
            if headers:
                raw += [(k.encode(), str(v).encode()) for k, v in headers.items()]
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": body})
            if scope.get("edgecnn.accepted"):
                self.metrics.answered += 1
        except asyncio.CancelledError:
            return  # the client is gone, or the shutdown's grace period ran out: nothing more to say

    async def _lifespan(self, receive, send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                m = self.metrics
                self.batcher = Batcher(self.model.run, max_batch=self.cfg.max_batch,
                                       max_delay_s=self.cfg.max_delay_ms / 1e3, instances=self.cfg.instances,
                                       max_queue_rows=self.cfg.queue_rows, on_batch=m.batch.observe,
                                       on_queue_wait=m.queue.observe, on_death=self._batcher_died,
                                       run_lone=self.model.run_lone, call_rows=self.cfg.call_rows)
                self.batcher.start()
                self.ready = True
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.ready = False
                if self.batcher is not None:
                    await self.batcher.stop(drain=True)
                self._decode_pool.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _batcher_died(self, exc: BaseException) -> None:
        self.ready = False
        self.fatal = exc
        if self._on_fatal is not None:
            self._on_fatal(exc)

    # ---- routes -------------------------------------------------------------------------------
    async def _route(self, scope, receive):
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if path.endswith("/infer"):
            parts = path.strip("/").split("/")
            if parts[:2] == ["v2", "models"] and len(parts) >= 4:
                self._model(parts[2], parts[3:-1], path)
                self._method(method, "POST")
                scope["edgecnn.endpoint"] = "infer"
                return await self._infer(scope, receive)
        parts = path.strip("/").split("/")
        if path == "/metrics":
            self._method(method, "GET")
            body, ctype = self.metrics.render()
            scope["edgecnn.endpoint"] = "metrics"
            return 200, body, {"content-type": ctype.encode()}
        if parts[:1] != ["v2"]:
            raise HTTPError(404, f"no such endpoint: {path}")
        if len(parts) == 1:
            self._method(method, "GET")
            from edgecnn import __version__

            scope["edgecnn.endpoint"] = "server"
            return 200, orjson.dumps({"name": "edgecnn", "version": __version__, "extensions": EXTENSIONS}), {}
        if parts[1] == "health" and len(parts) == 3 and parts[2] in ("live", "ready"):
            self._method(method, "GET")
            ok = parts[2] == "live" or self.ready
            scope["edgecnn.endpoint"] = "health"
            return (200 if ok else 503), b"", {}
        if parts[1] != "models" or len(parts) < 3:
            raise HTTPError(404, f"no such endpoint: {path}")
        rest = self._model(parts[2], parts[3:], path)
        if not rest:
            self._method(method, "GET")
            scope["edgecnn.endpoint"] = "metadata"
            if self._metadata is None:
                self._metadata = orjson.dumps(self.model.metadata(self.cfg))
            return 200, self._metadata, {}
        if rest == ["ready"]:
            self._method(method, "GET")
            scope["edgecnn.endpoint"] = "ready"
            return (200 if self.ready else 503), b"", {}
        raise HTTPError(404, f"no such endpoint: {path}")

    def _model(self, name: str, rest: list[str], path: str) -> list[str]:
        if len(rest) >= 2 and rest[0] == "versions":
            if rest[1] != MODEL_VERSION:
                raise HTTPError(404, f"model {name!r} has no version {rest[1]!r} (versions: {MODEL_VERSION})")
            rest = rest[2:]
        elif rest and rest[0] == "versions":
            raise HTTPError(404, f"no such endpoint: {path}")
        if name != self.model.name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {self.model.name!r}")
        return rest

    @staticmethod
    def _method(got: str, want: str) -> None:
        if got != want:
            raise HTTPError(405, f"method {got} not allowed here (use {want})", {"allow": want})

    def _busy(self, why: str, unread: int) -> HTTPError:
        """503 before the body is read: a big unread body closes the connection (else it is skipped)."""
        wait = self.batcher.retry_after_s() if self.batcher is not None else 1
        headers = {"retry-after": str(wait)}
        if unread > INLINE_BODY_BYTES:
            headers["connection"] = "close"
        return HTTPError(503, f"the server is busy ({why}): retry in {wait} s", headers)

    async def _read_body(self, scope, receive, declared: int | None) -> bytes:
        limit, timeout = self.cfg.max_body_bytes, self.cfg.read_timeout_s
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout) as deadline:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise _Gone
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise HTTPError(413, f"request body is over the limit of {limit} bytes",
                                        {"connection": "close"})
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    deadline.reschedule(loop.time() + timeout)
        except TimeoutError:
            raise HTTPError(408, f"the request body did not arrive within {timeout:g} s",
                            {"connection": "close"}) from None

    async def _infer(self, scope, receive):
        t0 = time.perf_counter()
        header_len = declared = None
        encoding = ""
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise HTTPError(400, "Content-Length is not an integer", {"connection": "close"}) from None
            elif k == b"inference-header-content-length":
                header_len = v.decode("latin-1")
            elif k == b"content-encoding":
                encoding = v.decode("latin-1")
        limit = self.cfg.max_body_bytes
        if declared is not None and declared > limit:  # refused unread: the connection is closed
            raise HTTPError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                            {"connection": "close"})
        held = declared or 0
        if self._active >= self.cfg.max_concurrency:
            raise self._busy(f"{self._active} requests in progress, at most {self.cfg.max_concurrency}", held)
        if held and self._body_bytes + held > self._body_budget:
            raise self._busy("too many request bytes in progress", held)
        self._active += 1
        self._body_bytes += held
        try:
            body = await self._read_body(scope, receive, declared)
            if declared is None:  # chunked: counted once it is here
                self._body_bytes += len(body)
                held += len(body)
            self.metrics.accepted += 1
            scope["edgecnn.accepted"] = True
            self.metrics.in_flight.inc()
            try:
                return await self._answer(scope, receive, body, header_len, encoding, t0)
            finally:
                self.metrics.in_flight.dec()
        finally:
            self._active -= 1
            self._body_bytes -= held

    def _parse(self, body: bytes, header_len, encoding: str):
        if encoding:
            body = inflate(body, encoding, self.cfg.max_body_bytes)
        return parse_infer_request(body, header_len)

    async def _answer(self, scope, receive, body: bytes, header_len, encoding: str, t0: float):
        m = self.model
        if len(body) > INLINE_BODY_BYTES or encoding:
            req = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._parse, body,
                                                                   header_len, encoding)
        else:
            req = parse_infer_request(body, header_len)
        del body
        unknown = [w.name for w in req.outputs or () if w.name not in m.outputs]
        if unknown:  # refused before the model runs for it
            raise HTTPError(400, f"unknown output {unknown[0]!r}; this model has {', '.join(m.outputs)}")
        x = await self._model_input(req)
        logits = await self._submit(x, receive, scope)
        return self._ok(req, logits, t0)

    def _ok(self, req, logits: np.ndarray, t0: float) -> tuple[int, bytes, dict]:
        m = self.model
        resp, json_len = encode_infer_response(m.name, MODEL_VERSION, req.id, self._outputs(req, logits))
        self.metrics.latency.observe(time.perf_counter() - t0)
        if json_len is None:
            return 200, resp, {}
        return 200, resp, {"content-type": b"application/octet-stream", "inference-header-content-length": json_len}

    # ---- the same work without a task -----------------------------------------------------------
    def infer_without_task(self, scope, body: bytes, header_len: str | None, reply):
        """What ``_infer`` does for the common request, called by serve.py's HTTP protocol as soon as the
        request's last byte arrives, with no task, no ASGI messages and no awaits: a valid tensor request
        (parsed on the loop) within every limit. For anything else (an error of any kind, images to decode, a
        limit reached) it returns False having changed nothing, and the caller runs the ASGI app, which
        answers it, so errors keep one path and one table. Else the request is accepted: ``reply(status, body,
        headers)`` is called once with its answer (a lone small request runs on the loop, as in ``_submit``),
        or with status None when there is nothing to send (the client left: its rows not yet run are dropped;
        or the shutdown's grace period cancelled it). Returns a future that is done when the request is over
        (the caller counts it as a running task: a graceful shutdown waits for it, and may cancel it)."""
        b = self.batcher
        held = len(body)
        if (b is None or not b.healthy or self._active >= self.cfg.max_concurrency
                or self._body_bytes + held > self._body_budget or scope.get(GONE_FLAG)):
            return False
        m = self.model
        try:
            req = parse_infer_request(body, header_len)
            if req.outputs is not None and any(w.name not in m.outputs for w in req.outputs):
                return False
            t = m.the_input(req)
            if t.name == IMAGES_INPUT:
                return False
            x = m.tensor_input(t)
        except Exception:  # noqa: BLE001 - the ASGI path answers it
            return False
        n = x.shape[0] if x.ndim else 0
        if n == 0 or (b.queued_rows and b.queued_rows + n > b.max_queue_rows):
            return False
        t0 = time.perf_counter()
        met = self.metrics
        self._active += 1
        self._body_bytes += held
        met.accepted += 1
        self.untasked += 1
        scope["edgecnn.accepted"] = True
        scope["edgecnn.endpoint"] = "infer"
        met.in_flight.inc()
        loop = asyncio.get_running_loop()
        # Done when the request is over; the protocol counts it as a running task (a graceful shutdown waits
        # for it, and cancels it when its grace period runs out: then the request is dropped, as a task's is).
        tracker = loop.create_future()
        queued = []  # the batcher's request, once enqueued

        def done(answer: tuple[int, bytes, dict] | None) -> None:
            if scope.pop(GONE_CALLBACK, None) is None:
                return  # over already
            self._active -= 1
            self._body_bytes -= held
            met.in_flight.dec()
            if queued:
                b.settle(queued[0], drop=answer is None)
            if not tracker.done():
                tracker.set_result(None)
            if answer is None:
                reply(None, b"", {})
                return
            met.count("infer", answer[0])
            reply(*answer)
            met.answered += 1

        def failed(e: BaseException) -> tuple[int, bytes, dict]:
            status, msg, headers = error_answer(e)
            return status, orjson.dumps({"error": msg}), headers

        def leave() -> None:  # serve.py's protocol: the connection was lost; rows not yet run never run
            met.client_gone()
            done(None)

        def answered(fut: asyncio.Future) -> None:
            if fut.cancelled():
                done(None)
                return
            exc = fut.exception()  # retrieved even when nobody waits any more (no "never retrieved" log)
            if GONE_CALLBACK not in scope:
                return  # over already: the client left while its rows ran
            try:
                done(failed(exc) if exc is not None else self._ok(req, fut.result(), t0))
            except Exception as e:  # noqa: BLE001 - an encoding failure is answered through the table too
                done(failed(e))

        def start() -> None:
            if GONE_CALLBACK not in scope:
                return  # the client left, or the shutdown cancelled it, before it started
            begun = self.begun
            try:
                # A lone small request runs at once, on the loop, as in _submit. This runs one loop pass after
                # its last byte arrived, so ``begun`` counts every request whose bytes came in the same pass.
                if begun is not None and begun.n <= 1 and self._active <= 1 and n <= INLINE_ROWS:
                    out = b.run_now(x)
                    if out is not None:
                        done(self._ok(req, out, t0))
                        return
                queued.append(b.enqueue(x))
            except Exception as e:  # noqa: BLE001 - answered through the one table
                done(failed(e))
                return
            queued[0].fut.add_done_callback(answered)

        scope[GONE_CALLBACK] = leave
        tracker.add_done_callback(lambda f: done(None) if f.cancelled() else None)
        if n <= INLINE_ROWS and self.begun is not None and not b.running_batches and not b.queued_rows:
            loop.call_soon(start)
        else:
            start()
        return tracker

    async def _submit(self, x: np.ndarray, receive, scope) -> np.ndarray:
        """The batcher's answer for ``x``; a client that disconnects meanwhile has its queued rows dropped."""
        if self.batcher is None:
            raise ShuttingDownError("the server is not running")
        if scope.get(GONE_FLAG):  # the client left while its body was parsed or its images decoded: never queued
            self.metrics.client_gone()
            raise _Gone
        begun = self.begun
        # A lone small request runs at once, on the loop: no other request in progress here, nor begun on
        # any connection (its bytes may have arrived while its task has not run yet).
        if begun is not None and begun.n <= 1 and self._active <= 1 and x.shape[0] <= INLINE_ROWS:
            out = self.batcher.run_now(x)
            if out is not None:
                return out
        me = asyncio.current_task()
        gone: list[bool] = []

        def leave() -> None:
            gone.append(True)
            me.cancel()

        watcher = None
        if begun is not None:  # serve.py's HTTP protocol calls this when the connection is lost: no task
            scope[GONE_CALLBACK] = leave
        else:  # another HTTP protocol: a task waits for http.disconnect
            async def watch() -> None:
                if (await receive())["type"] == "http.disconnect":
                    leave()

            watcher = asyncio.get_running_loop().create_task(watch())
        try:
            return await self.batcher.submit(x)
        except asyncio.CancelledError:
            if gone:
                self.metrics.client_gone()
                raise _Gone from None
            raise
        finally:
            scope.pop(GONE_CALLBACK, None)
            if watcher is not None:
                watcher.cancel()

    async def _model_input(self, req) -> np.ndarray:
        t = self.model.the_input(req)
        if t.name == IMAGES_INPUT:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._decode_pool, self.model.decode_images, t.data,
                                              self.cfg.max_request_pixels)
        return self.model.tensor_input(t)

    def _outputs(self, req, logits: np.ndarray) -> list[OutputTensor]:
        return self.model.output_tensors(req, logits)
