"""`edgecnn serve`: a model behind the KServe v2 / Open Inference Protocol, with dynamic batching. Torch-free.

This module starts the process: the settings (ServeConfig), the listening socket, uvicorn (httptools
parser, uvloop when installed) with per-connection read timeouts, signals and the drain on SIGTERM.
The parts: ``serve_app`` (the ASGI app, routes, limits, error table, metrics), ``serve_model`` (the
served model), ``serve_batcher`` (the dynamic batcher), ``serve_protocol`` (v2 request/response bytes).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

from edgecnn.errors import InvalidInputError, MissingDependencyError

from .serve_app import GONE_CALLBACK, GONE_FLAG, INLINE_BODY_BYTES, App, HTTPError, Metrics  # noqa: F401 - re-exported
from .serve_model import (  # noqa: F401 - re-exported
    IMAGES_INPUT,
    MAX_REQUEST_PIXELS,
    MODEL_VERSION,
    ServedModel,
    resolve_model,
)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_delay_ms: float = 0.0
    instances: int = 1
    call_rows: int | None = None  # most queued rows one call takes (None: max_batch)
    max_body_bytes: int = 16 << 20
    max_queue: int | None = None  # rows waiting for the model; None: 8 x max_batch
    max_concurrency: int = 256  # inference requests being read, parsed, decoded, queued or run at once
    read_timeout_s: float = 10.0  # a request's headers, or the gap between body chunks
    graceful_timeout_s: float = 10.0  # on SIGTERM, how long requests already received may take
    max_request_pixels: int = MAX_REQUEST_PIXELS  # decoded image pixels per request

    @property
    def rows_per_call(self) -> int:
        """The most rows one model call takes: ``call_rows``, at most ``max_batch``."""
        return min(self.call_rows or self.max_batch, self.max_batch)

    @property
    def queue_rows(self) -> int:
        return max(self.max_batch, 8 * self.max_batch if self.max_queue is None else self.max_queue)

    def check(self) -> None:
        if self.max_batch < 1:
            raise InvalidInputError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 1 <= self.instances <= 64:
            raise InvalidInputError(f"--instances must be 1-64, got {self.instances}")
        if self.call_rows is not None and self.call_rows < 1:
            raise InvalidInputError(f"--call-rows must be >= 1, got {self.call_rows}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise InvalidInputError(f"--max-delay-ms must be between 0 and 10000, got {self.max_delay_ms}")
        if self.max_body_bytes < 1024:
            raise InvalidInputError("the body size limit must be at least 1 KiB")
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"--port must be 0-65535, got {self.port}")
        if self.max_queue is not None and self.max_queue < 1:
            raise InvalidInputError(f"--max-queue must be >= 1 (rows), got {self.max_queue}")
        if not 1 <= self.max_concurrency <= 100_000:
            raise InvalidInputError(f"--max-concurrency must be 1-100000, got {self.max_concurrency}")
        if not 0.1 <= self.read_timeout_s <= 3600:
            raise InvalidInputError(f"--read-timeout-s must be between 0.1 and 3600, got {self.read_timeout_s}")
        if not 0 <= self.graceful_timeout_s <= 3600:
            raise InvalidInputError(f"the graceful shutdown timeout must be 0-3600 s, got {self.graceful_timeout_s}")


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


class _OneWrite:
    """The transport a request's cycle writes to: uvicorn writes a response's status line and headers, then
    its body, as two sends; this holds the first and sends both in one (one syscall, and one wake-up of the
    client instead of two). At 1 binary client, 4 alternated pairs of 3 s: p50 0.75-1.11 ms against
    0.97-1.23 ms with two writes, better in every pair (AVX2 EPYC, 2 cores). Anything
    else (100 Continue, a later chunk) passes through; the first body write or ``close`` flushes it. Not used
    for HEAD, where uvicorn writes no body."""

    __slots__ = ("_t", "_cycle", "_held", "_stage")

    def __init__(self, transport, cycle) -> None:
        self._t = transport
        self._cycle = cycle
        self._held = None
        self._stage = 0  # 0: no response yet, 1: headers held, 2: passed through from now on

    def write(self, data) -> None:
        if self._stage == 1:
            self._stage = 2
            held, self._held = self._held, None
            if len(data) <= 1 << 16:
                self._t.write(held + data)
            else:
                self._t.write(held)
                self._t.write(data)
        elif self._stage == 0 and self._cycle.response_started:
            self._stage = 1
            self._held = bytes(data)
        else:
            self._t.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._stage = 2
            self._t.write(held)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def __getattr__(self, name):
        return getattr(self._t, name)


class RequestCount:
    """Requests whose first bytes have arrived and whose answer is not sent yet, counted by the HTTP
    protocol as bytes arrive (before the app's task for them runs): ``n``, at most one per connection."""

    n = 0


# The lean path's request head: "POST <target> HTTP/1.1", then header lines of a token name, a colon and a
# value of visible characters, spaces and tabs, then the blank line. Anything else goes to httptools.
_LEAN_HEAD = re.compile(rb"POST ([!-~]+) HTTP/1\.1\r\n((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n")
_LEAN_FIELD = re.compile(rb"([^:\r\n]+):[\t ]*([^\r\n]*?)[\t ]*\r\n")
_LEAN_HEAD_MAX = 8192
_LEAN_REFUSED = frozenset((b"transfer-encoding", b"content-encoding", b"expect", b"upgrade", b"connection"))


class _NoEvent:
    __slots__ = ()

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class _LeanCycle:
    """What uvicorn's protocol and _reply read of a request on the lean path (in place of its cycle)."""

    __slots__ = ("scope", "response_complete", "response_started", "keep_alive", "disconnected", "on_response")
    message_event = _NO_EVENT

    def __init__(self, on_response) -> None:
        self.scope = {"type": "http", "method": "POST"}
        self.response_complete = self.response_started = self.disconnected = False
        self.keep_alive = True
        self.on_response = on_response


def _lean_head(head: bytes, targets: set[bytes]) -> tuple[int, str | None] | None:
    """A request head (through its blank line) -> (Content-Length, Inference-Header-Content-Length) when the
    request, to one of ``targets``, may take the lean path, else None."""
    m = _LEAN_HEAD.fullmatch(head)
    if m is None or m.group(1) not in targets:
        return None
    size = header_len = None
    for name, value in _LEAN_FIELD.findall(m.group(2)):
        name = name.lower()
        if name == b"content-length":
            if size is not None or not value.isdigit():
                return None
            size = int(value)
        elif name == b"inference-header-content-length":
            if header_len is not None:
                return None
            header_len = value.decode("latin-1")
        elif name in _LEAN_REFUSED and (name != b"connection" or value.lower() != b"keep-alive"):
            return None
    if size is None or not 0 < size <= INLINE_BODY_BYTES:
        return None
    return size, header_len


def _guarded_protocol(read_timeout_s: float, begun: RequestCount, app: App | None = None):
    """uvicorn's httptools protocol, plus a header timer: a connection that sends nothing, or only part of
    a request's headers, within ``read_timeout_s`` is closed (uvicorn only times out idle keep-alives).
    It also keeps ``begun`` (the app runs a lone request inline only when no other one has begun).

    With ``app``: a POST to the model's infer path whose whole body (at most the app's inline size, not
    compressed) arrives with its headers goes to ``app.infer_without_task`` from the parser's callback, and
    its answer is written in one send: no task, no ASGI messages (in-process, with an instant model: ~120 us
    of loop CPU per binary request, against ~165-240 us through uvicorn's task and ASGI cycle). What that
    declines, and every other request, runs the ASGI app as before."""
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    fast_paths = set() if app is None else {f"/v2/models/{app.model.name}/infer",
                                            f"/v2/models/{app.model.name}/versions/{MODEL_VERSION}/infer"}
    lean_targets = {p.encode() for p in fast_paths}
    _defaults: list = [None, b""]  # uvicorn's default headers, and their bytes
    heads: dict[bytes, tuple[int, str | None] | None] = {}  # a request head -> its lean reading (_lean_one)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer = None
        _counted = False
        _waiting = None  # the cycle whose body is still arriving, for the task-free path
        _receiving = False  # inside data_received
        _header_len = None
        # The lean path (with ``app``): see _lean_one. A connection is "slow" while httptools parses it.
        _lean_ok = bool(lean_targets)
        _slow = not _lean_ok
        _open = 0  # slow: messages httptools began and did not complete
        _buf = b""  # lean: bytes received and not handled yet (a request's answer goes before the next)
        _lean_busy = False  # lean: a request is in flight
        _feeding = False  # inside _lean_feed

        def _uncount(self) -> None:
            if self._counted:
                self._counted = False
                begun.n -= 1

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(read_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._uncount()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                leave = cycle.scope.get(GONE_CALLBACK)  # a request waiting for the model: its rows are dropped
                if leave is not None:
                    leave()
                else:  # still being read, parsed or decoded: the app drops it before it is queued
                    cycle.scope[GONE_FLAG] = True
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()
            self._open += 1
            if not self._counted:
                self._counted = True
                begun.n += 1

        def on_response_complete(self) -> None:
            self._uncount()
            super().on_response_complete()
            if not self._receiving:
                self._back_to_lean()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            cycle = self.cycle
            # not for HEAD: uvicorn sends no body write there, so nothing would flush the held headers
            if cycle is not None and cycle.transport is self.transport and cycle.scope["method"] != "HEAD":
                cycle.transport = _OneWrite(self.transport, cycle)

        # ---- the task-free path --------------------------------------------------------------
        def _takes(self, cycle) -> bool:
            """A POST to the infer path with a small declared body, not compressed, chunked or 100-continue."""
            scope = cycle.scope
            if scope["method"] != "POST" or scope["path"] not in fast_paths:
                return False
            size = None
            self._header_len = None
            for k, v in scope["headers"]:
                if k == b"content-length":
                    try:
                        size = int(v)
                    except ValueError:
                        return False
                elif k == b"inference-header-content-length":
                    self._header_len = v.decode("latin-1")
                elif k in (b"content-encoding", b"transfer-encoding", b"expect"):
                    return False
            return size is not None and 0 < size <= INLINE_BODY_BYTES

        def _start_asgi_task(self, cycle, asgi) -> None:
            if asgi is self.app and fast_paths and self._takes(cycle):
                if not cycle.more_body:  # a pipelined request whose body is here already
                    self._without_task(cycle)
                    return
                if self._receiving:  # on_message_complete takes it if the body ends within this data_received
                    self._waiting = cycle
                    return
            super()._start_asgi_task(cycle, asgi)

        def data_received(self, data: bytes) -> None:
            if not self._slow:
                self._lean_received(data)
                return
            self._receiving = True
            try:
                super().data_received(data)
            finally:
                self._receiving = False
            cycle = self._waiting
            if cycle is not None:  # the body did not all arrive: the ASGI app reads it, with its timeout
                self._waiting = None
                super()._start_asgi_task(cycle, self.app)
            self._back_to_lean()

        # ---- the lean path -------------------------------------------------------------------
        # A connection starts lean: a request that arrives whole (headers and body in what was received),
        # at a request boundary, and is what _takes would pass (a POST to the infer path, a small
        # Content-Length body, HTTP/1.1, none of Transfer-Encoding, Content-Encoding, Expect, Upgrade or a
        # Connection header other than keep-alive, only well-formed header lines) is parsed here with one
        # regex and goes straight to ``app.infer_without_task``: no httptools callbacks, no ASGI scope,
        # cycle, Event or header timer. Anything else (a partial request, any other request, one the app
        # declines) is handed, with every byte buffered after it, to httptools and uvicorn as before, and
        # the connection stays with them until they have answered everything they began (_back_to_lean),
        # so every limit, timeout and error answer keeps its one path. Requests that arrive while one is
        # in flight wait in ``_buf`` (answers go out in order); past HIGH_WATER_LIMIT reading pauses.
        def _lean_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            self._unset_keepalive_if_required()
            self._buf = self._buf + data if self._buf else data
            if not self._lean_busy and not self._feeding:
                self._lean_feed()
            elif len(self._buf) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()

        def _lean_feed(self) -> None:
            self._feeding = True
            try:
                while self._buf and not self._lean_busy and not self._slow:
                    if not self._lean_one():
                        buf, self._buf = self._buf, b""
                        self._slow = True
                        self._open = 0
                        self.data_received(buf)  # httptools parses it from a request boundary
                        return
            finally:
                self._feeding = False
            if self._lean_busy and len(self._buf) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()

        def _lean_one(self) -> bool:
            """Starts the request at the head of ``_buf`` if it takes the lean path, else returns False
            having changed nothing."""
            buf = self._buf
            start = buf.find(b"\r\n\r\n", 0, _LEAN_HEAD_MAX) + 4
            if start < 4:
                return False
            head = buf[:start]
            try:
                reading = heads[head]  # a client sends the same head with every request
            except KeyError:
                reading = _lean_head(head, lean_targets)
                if len(heads) >= 256:
                    heads.clear()
                heads[head] = reading
            if reading is None:
                return False
            size, header_len = reading
            if len(buf) < start + size:
                return False
            lc = self.limit_concurrency
            if lc is not None and (len(self.connections) >= lc or len(self.tasks) >= lc):
                return False  # uvicorn answers 503 past its limit
            cycle = _LeanCycle(self._lean_done)
            previous = self.cycle
            self.cycle = cycle  # what uvicorn's shutdown and connection_lost read
            self._lean_busy = True
            self._disarm()
            self._counted = True
            begun.n += 1
            end = start + size
            body = memoryview(buf)[start:end] if header_len is not None else buf[start:end]
            self._buf = buf[end:]  # consumed before the answer, which may come at once (a failure)
            got = app.infer_without_task(cycle.scope, body, header_len,
                                         lambda status, out, headers: self._reply(cycle, status, out, headers))
            if got is False:  # declined (nothing answered): uvicorn and the ASGI app answer it
                self._buf = buf
                self.cycle = previous
                self._lean_busy = False
                self._uncount()
                return False
            app.lean += 1
            if not got.done():  # a graceful shutdown waits for it like a task
                self.tasks.add(got)
                got.add_done_callback(self.tasks.discard)
            return True

        def _lean_done(self) -> None:
            """uvicorn's on_response_complete, for a lean request."""
            self.server_state.total_requests += 1
            self._uncount()
            self._lean_busy = False
            if self.transport.is_closing():
                return
            self.flow.resume_reading()
            if self._buf:
                if not self._feeding:
                    self._lean_feed()
            else:
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

        def _back_to_lean(self) -> None:
            """A slow connection goes lean again once httptools holds no part of a request (every message it
            began is complete) and every answer is sent: its parser is at a request boundary."""
            if (self._slow and self._lean_ok and self._open == 0 and not self.pipeline and self.cycle is not None
                    and self.cycle.response_complete and self.cycle.keep_alive and self._waiting is None
                    and not self.transport.is_closing()):
                self._slow = False

        def on_message_complete(self) -> None:
            self._open -= 1
            super().on_message_complete()
            cycle = self._waiting
            if cycle is not None and cycle is self.cycle and not cycle.more_body:
                self._waiting = None
                self._without_task(cycle)

        def _without_task(self, cycle) -> None:
            body = bytes(cycle.body)
            got = app.infer_without_task(cycle.scope, body, self._header_len,
                                         lambda status, out, headers: self._reply(cycle, status, out, headers))
            if got is False:  # declined: the ASGI app answers it (the body is still in the cycle)
                super()._start_asgi_task(cycle, self.app)
                return
            cycle.body = bytearray()
            if not got.done():  # a graceful shutdown waits for it like a task
                self.tasks.add(got)
                got.add_done_callback(self.tasks.discard)

        def _reply(self, cycle, status, body: bytes, headers: dict) -> None:
            """One answer, as uvicorn's send would write it (its default headers first), in one write."""
            if cycle.response_complete:
                return
            if status is None or cycle.disconnected:  # nothing to send: the client is gone, or was cancelled
                if not self.transport.is_closing():
                    self.transport.close()
                return
            ctype = headers.pop("content-type", b"application/json")
            defaults = self.server_state.default_headers  # a new list when its date changes (once a second)
            if defaults is not _defaults[0]:
                _defaults[:] = [defaults, b"".join(b"%s: %s\r\n" % (name.lower(), value) for name, value in defaults)]
            content = [STATUS_LINE[status], _defaults[1], b"content-type: ", ctype,
                       b"\r\ncontent-length: %d\r\n" % len(body)]
            for k, v in headers.items():
                content += [k.encode(), b": ", str(v).encode(), b"\r\n"]
            if headers.get("connection") == "close":
                cycle.keep_alive = False
            elif not cycle.keep_alive:
                content.append(b"connection: close\r\n")
            content += [b"\r\n", body]
            cycle.response_started = True
            self.transport.write(b"".join(content))
            cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:
                self.transport.close()
            cycle.on_response()

    return GuardedHttpToolsProtocol


def _unavailable_with_retry_after() -> None:
    """uvicorn's own 503 (past its ``limit_concurrency``) carries ``Retry-After`` too."""
    from uvicorn.protocols.http import httptools_impl

    async def service_unavailable(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b'{"error":"the server is busy: too many connections"}'})

    httptools_impl.service_unavailable = service_unavailable


class _QuietCancel(logging.Filter):
    """Log records on one line: no traceback (the exception's type name instead; EDGECNN_DEBUG=1 keeps the
    batcher's), and none for tasks uvicorn cancelled itself after the graceful shutdown timeout."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], BaseException):
            import asyncio

            if issubclass(record.exc_info[0], asyncio.CancelledError):
                return False
            record.msg = f"{record.getMessage()} ({record.exc_info[0].__name__})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def serve(model: ServedModel, cfg: ServeConfig, log=None) -> dict:
    """Run the server until SIGTERM/SIGINT: readiness turns 503 at once, new connections are refused,
    requests already received are answered (up to ``graceful_timeout_s``). Returns the counts of inference
    requests accepted, answered and dropped (client gone), and ``died``: True when the batcher died."""
    cfg.check()
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "serve", "`edgecnn serve`") from None
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    holder: dict = {}

    def on_fatal(exc: BaseException) -> None:
        log(f"edgecnn serve: fatal: the inference batcher died ({type(exc).__name__}); exiting")
        if "server" in holder:
            holder["server"].should_exit = True

    app = App(model, cfg, on_fatal=on_fatal)
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        app.begun = RequestCount()
        http = _guarded_protocol(cfg.read_timeout_s, app.begun, app)
        _unavailable_with_retry_after()
    except ImportError:
        http = "h11"
    # proxy_headers off: X-Forwarded-* would only set the client address, which nothing reads, and the
    # middleware costs every request a hop and a trusted-host check (py-spy: ~15% of the loop's busy time).
    config = uvicorn.Config(app, loop=loop, http=http, lifespan="on", access_log=False, log_level="warning",
                            proxy_headers=False,
                            timeout_graceful_shutdown=cfg.graceful_timeout_s, backlog=1024,
                            timeout_keep_alive=max(1, round(cfg.read_timeout_s)),
                            limit_concurrency=cfg.max_concurrency + max(32, cfg.max_concurrency // 4),
                            h11_max_incomplete_event_size=64 * 1024)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.ready = False  # readiness answers 503 from now on; requests received are still answered
            super().handle_exit(sig, frame)

    server = Server(config)
    holder["server"] = server
    quiet = _QuietCancel()
    loggers = ("uvicorn.error", "uvicorn") + (() if os.environ.get("EDGECNN_DEBUG") else ("edgecnn.serve",))
    for name in loggers:
        logging.getLogger(name).addFilter(quiet)
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler makes that
    # a clean return (exit 0) instead of death by SIGTERM.
    stopped_by: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped_by.append(sig))
    shown = f"[{host}]" if ":" in host else host
    for note in model.override_notes + ([model.clf.assumption_note] if getattr(model.clf, "assumption_note", None) else []):
        log(f"edgecnn serve: note: {note}")
    log(f"edgecnn serve: listening on http://{shown}:{port} model {model.name!r} on {model.clf.runtime.describe()}; "
        f"max batch {cfg.max_batch}, max delay {cfg.max_delay_ms:g} ms, {cfg.instances} instance(s)"
        + (f" of {model.threads} thread(s)" if model.threads else "")
        + (f" taking at most {cfg.rows_per_call} rows a call" if cfg.rows_per_call < cfg.max_batch else "")
        + (f", a lone request on {model.lone_threads} threads" if model.lone_threads != model.threads else "")
        + ", "
        f"queue {cfg.queue_rows} rows, {cfg.max_concurrency} requests at once, batching {model.batching}"
        + ("" if model.spinning is None else f", spinning {model.spinning_text}"))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        for name in loggers:
            logging.getLogger(name).removeFilter(quiet)
    m = app.metrics
    counts = {"accepted": m.accepted, "answered": m.answered, "dropped": m.gone, "died": app.fatal is not None}
    log(f"edgecnn serve: stopped; {m.accepted} inference requests accepted ({app.untasked} without a task, "
        f"{app.lean} of them read by the lean parser), "
        f"{m.answered} answered, {m.gone} dropped (client gone)"
        + ("; the batcher died" if app.fatal is not None else "")
        + ("; model calls: {} spinning, {} not".format(*model.call_counts()) if model.spinning == "adaptive" else ""))
    return counts
