"""Dynamic batcher for `edgecnn serve`: concurrent requests share model calls of at most ``max_batch`` rows."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["Batcher", "BatcherDeadError", "BatcherError", "QueueFullError", "RowsFailedError",
           "ShuttingDownError", "NOT_FINITE"]

log = logging.getLogger("edgecnn.serve")

NOT_FINITE = "the model's output for this request is not finite (NaN or Inf): check the input's scale"
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"`,;:()\[\]{}<>]+){2,}[\\/]?")
_MAX_MESSAGE = 300


class BatcherError(Exception):
    """What ``Batcher.submit`` raises: ``status`` is the HTTP status code, ``str(e)`` a one-line message."""

    status = 500


class RowsFailedError(BatcherError):
    """This request's rows failed (the model raised on them, or their output is not finite); batch-mates did not."""

    status = 422


class QueueFullError(BatcherError):
    """Too many rows are queued: answer 503 with ``Retry-After: retry_after`` (whole seconds, at least 1)."""

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(BatcherError):
    """The batcher takes no new requests (``close_to_new``/``stop``), or ``stop(drain=False)`` dropped this one."""

    status = 503


class BatcherDeadError(BatcherError):
    """The batcher failed internally and answers nothing more: the process should exit and be restarted."""

    status = 503


def one_line(e: BaseException) -> str:
    """``str(e)`` on one line, file paths replaced by ``<path>``, at most 300 characters."""
    text = _PATH.sub("<path>", " ".join(str(e).split())) or type(e).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


class _Req:
    """One submitted request: rows ``[0, taken)`` have been handed to model calls, ``done_rows`` answered."""

    __slots__ = ("x", "n", "fut", "t0", "taken", "done_rows", "buf")

    def __init__(self, x: np.ndarray, fut: asyncio.Future, t0: float) -> None:
        self.x = x
        self.n: int = x.shape[0]
        self.fut = fut
        self.t0 = t0
        self.taken = 0
        self.done_rows = 0
        self.buf: np.ndarray | None = None  # the reassembled answer of a request split over several calls


_Piece = tuple[_Req, int, int]  # a request and the row range [start, stop) of it that one model call runs


class Batcher:
    """Collects submitted row blocks into model calls, runs up to ``instances`` calls at once (each on its own
    worker thread, Triton's instance count) and hands each caller its own rows, in order.

    Dispatch rule: whenever an instance is free and rows are queued, the next call takes the queued rows,
    oldest first, up to ``max_batch`` (the head request may be split: a request larger than ``max_batch``
    runs as several calls, possibly shared with other requests, and is reassembled before it is answered).
    A request that finds a free instance runs at once; while every instance is busy the queue fills, so
    batches form by themselves under load. ``max_delay_s > 0`` only matters when another call is already
    running (so never with ``instances=1``) and fewer than ``max_batch`` rows are queued: the free instance
    then waits until ``max_batch`` rows are queued or the oldest queued request has waited ``max_delay_s``,
    whichever comes first (and never once ``close_to_new`` was called).

    Failures stay with their request: a request whose output rows are not finite gets ``RowsFailedError``;
    when a call raises (an ``Exception``, MemoryError included) its requests are re-run in halves until the
    failing ones are alone, and only those get ``RowsFailedError``. The queue holds at most
    ``max_queue_rows`` rows not yet handed to a call (default ``8 * max_batch``, never below ``max_batch``);
    a submit past that raises ``QueueFullError``, except that an empty queue always takes one request.
    A cancelled submit (client gone) drops its rows not yet run.

    Supervision: an error inside the batcher itself (its dispatch or delivery code, the ``on_batch`` /
    ``on_queue_wait`` hooks) or a ``BaseException`` that is not an ``Exception`` (SystemExit,
    KeyboardInterrupt) raised by ``run`` kills it: every pending submit gets ``BatcherDeadError``, ``healthy``
    turns False, ``on_death(exc)`` is called once, and later submits raise ``BatcherDeadError`` at once.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_delay_s: float = 0.0,
                 instances: int = 1, max_queue_rows: int | None = None,
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_wait: Callable[[float], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        if max_batch < 1 or instances < 1 or not max_delay_s >= 0:
            raise ValueError(f"need max_batch >= 1, instances >= 1, max_delay_s >= 0 "
                             f"(got {max_batch}, {instances}, {max_delay_s})")
        self._run = run
        self.max_batch = int(max_batch)
        self.max_delay_s = float(max_delay_s)
        self.instances = int(instances)
        self.max_queue_rows = max(self.max_batch, 8 * self.max_batch if max_queue_rows is None else max_queue_rows)
        self._on_batch = on_batch
        self._on_queue_wait = on_queue_wait
        self._on_death = on_death
        self._pool = ThreadPoolExecutor(self.instances, thread_name_prefix="edgecnn-batch")
        self._queue: deque[_Req] = deque()
        self._live: set[_Req] = set()  # submitted and not answered yet
        self._tasks: set[asyncio.Task] = set()
        self._rows = 0  # rows queued and not yet handed to a call
        self._free = self.instances
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._healthy = True
        self._death = ""
        self._call_s = 0.05  # moving average of one model call's seconds, for retry_after_s

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_rows(self) -> int:
        return self._rows

    @property
    def running_batches(self) -> int:
        return self.instances - self._free

    def start(self) -> None:
        """Bind to the running event loop (``submit`` does this itself if it was not called)."""
        self._loop = asyncio.get_running_loop()

    def retry_after_s(self) -> int:
        """Whole seconds the queue now needs to drain (at least 1, at most 60): the Retry-After to send."""
        calls = math.ceil(self._rows / self.max_batch) + self.running_batches
        return max(1, min(60, math.ceil(calls * self._call_s / self.instances)))

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Runs ``x`` (rows on the first axis) through the model; returns its output rows in the same order."""
        if not self._healthy:
            raise self._dead_error()
        if self._closed:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        if self._loop is None:
            self.start()
        x = np.ascontiguousarray(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError("submit needs an array with at least one row on its first axis")
        n = x.shape[0]
        if self._rows and self._rows + n > self.max_queue_rows:
            wait = self.retry_after_s()
            raise QueueFullError(f"the server is busy ({self._rows} rows queued, at most {self.max_queue_rows}):"
                                 f" retry in {wait} s", wait)
        loop = self._loop
        assert loop is not None
        req = _Req(x, loop.create_future(), loop.time())
        self._queue.append(req)
        self._rows += n
        self._live.add(req)
        self._pump()
        try:
            return await req.fut
        except asyncio.CancelledError:
            self._retire(req)  # the client is gone: its rows not yet run never run
            raise
        finally:
            self._live.discard(req)

    def close_to_new(self) -> None:
        """From now on ``submit`` raises ``ShuttingDownError``; what is queued still runs (without delay)."""
        if not self._closed:
            self._closed = True
            if self._loop is not None:
                self._pump()

    async def stop(self, drain: bool = True) -> None:
        """Closes to new requests; with ``drain`` answers everything queued and running, else fails what is
        queued with ``ShuttingDownError`` (calls already running still finish); then shuts the threads down."""
        self.close_to_new()
        if not drain:
            for r in list(self._queue):
                if r.taken < r.n:
                    self._fail(r, ShuttingDownError("the server shut down before this request ran"))
        pending = [r.fut for r in self._live if not r.fut.done()]
        if pending and self._healthy:
            await asyncio.wait(pending)
        if self._tasks and self._healthy:
            await asyncio.wait(set(self._tasks))
        self._cancel_timer()
        if self._healthy:
            await asyncio.to_thread(self._pool.shutdown, True)
        else:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- dispatch (runs on the event loop, never blocks) --

    def _pump(self) -> None:
        try:
            self._dispatch()
        except BaseException as e:  # noqa: BLE001 - a failure here must not leave callers waiting forever
            self._die(e)
            if not isinstance(e, Exception):
                raise

    def _dispatch(self) -> None:
        loop = self._loop
        assert loop is not None
        q = self._queue
        while self._free and self._rows and self._healthy:
            while q[0].taken == q[0].n:  # cancelled or failed requests left at the head
                q.popleft()
            if (self.max_delay_s > 0 and self._free < self.instances and self._rows < self.max_batch
                    and not self._closed):
                wait = q[0].t0 + self.max_delay_s - loop.time()
                if wait > 5e-4:
                    if self._timer is None:
                        self._timer = loop.call_later(wait, self._on_timer)
                    return
            pieces, rows = self._take()
            self._free -= 1
            task = loop.create_task(self._execute(pieces, rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self) -> tuple[list[_Piece], int]:
        """Up to ``max_batch`` queued rows, oldest first, as pieces of requests."""
        q, cap = self._queue, self.max_batch
        pieces: list[_Piece] = []
        rows = 0
        now = self._loop.time() if self._on_queue_wait is not None and self._loop is not None else 0.0
        while q and rows < cap:
            r = q[0]
            start = r.taken
            k = min(r.n - start, cap - rows)
            if k <= 0:
                q.popleft()
                continue
            if start == 0 and self._on_queue_wait is not None:
                self._on_queue_wait(now - r.t0)
            r.taken = start + k
            pieces.append((r, start, start + k))
            rows += k
            if r.taken == r.n:
                q.popleft()
        self._rows -= rows
        return pieces, rows

    async def _execute(self, pieces: list[_Piece], rows: int) -> None:
        try:
            await self._run_pieces(pieces, rows)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - anything else escaping a call is the batcher's death
            self._die(e)
        finally:
            self._free += 1
            if self._rows and self._healthy:
                self._pump()

    async def _run_pieces(self, pieces: list[_Piece], rows: int) -> None:
        """One model call for ``pieces``; if it raises, the pieces are re-run in halves to isolate the culprit."""
        if not self._healthy:
            return
        if self._on_batch is not None:
            self._on_batch(rows)  # outside the try below: a failing hook is the batcher's failure
        loop = self._loop
        assert loop is not None
        err: Exception | None = None
        try:
            if len(pieces) == 1:
                r, a, b = pieces[0]
                batch = r.x if b - a == r.n else r.x[a:b]
            else:
                batch = np.concatenate([r.x[a:b] for r, a, b in pieces])
            t = time.perf_counter()
            out = np.asarray(await loop.run_in_executor(self._pool, self._run, batch))
            self._call_s += 0.2 * (time.perf_counter() - t - self._call_s)
            if out.ndim == 0 or out.shape[0] != rows:
                raise ValueError(f"the model returned {out.shape[0] if out.ndim else 0} rows for {rows}")
        except Exception as e:  # noqa: BLE001 - the model failed on some of these rows
            err = e
        if err is None:
            self._deliver(pieces, out)
            return
        if len(pieces) == 1:
            msg = one_line(err)
            log.debug("model call of %d rows failed (%s): %s", rows, type(err).__name__, msg)
            self._fail(pieces[0][0], RowsFailedError(f"the model failed on this request: {msg}"))
            return
        err = batch = None  # do not keep the failed batch alive (through the traceback) during the re-runs
        mid = len(pieces) // 2
        for half in (pieces[:mid], pieces[mid:]):
            half = [p for p in half if not p[0].fut.done()]
            if half:
                await self._run_pieces(half, sum(b - a for _, a, b in half))

    def _deliver(self, pieces: list[_Piece], out: np.ndarray) -> None:
        finite: np.ndarray | None = None
        if out.dtype.kind in "fc" and not np.isfinite(out).all():
            finite = np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
        i = 0
        for r, a, b in pieces:
            j = i + b - a
            if not r.fut.done():
                if finite is not None and not finite[i:j].all():
                    self._fail(r, RowsFailedError(NOT_FINITE))
                elif b - a == r.n:
                    r.fut.set_result(out if len(pieces) == 1 else out[i:j])
                else:
                    o = out[i:j]
                    if r.buf is None:
                        r.buf = np.empty((r.n, *o.shape[1:]), o.dtype)
                    r.buf[a:b] = o
                    r.done_rows += b - a
                    if r.done_rows == r.n:
                        r.fut.set_result(r.buf)
                        r.buf = None
            i = j

    def _fail(self, r: _Req, err: BatcherError) -> None:
        if not r.fut.done():
            r.fut.set_exception(err)
        self._retire(r)

    def _retire(self, r: _Req) -> None:
        """Drops the rows of ``r`` not yet handed to a call (they stay in the queue, skipped)."""
        self._rows -= r.n - r.taken
        r.taken = r.n
        r.buf = None

    # -- supervision --

    def _dead_error(self) -> BatcherDeadError:
        return BatcherDeadError(f"the inference batcher stopped after an internal error ({self._death}):"
                                " the server must be restarted")

    def _die(self, exc: BaseException) -> None:
        if not self._healthy:
            return
        self._healthy = False
        self._death = type(exc).__name__
        self._cancel_timer()
        log.error("the inference batcher died: %s: %s", self._death, one_line(exc), exc_info=exc)
        for r in list(self._live):
            self._fail(r, self._dead_error())
        self._queue.clear()
        self._rows = 0
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._on_death is not None:
            try:
                self._on_death(exc)
            except Exception:  # noqa: BLE001 - the callback's own failure changes nothing here
                log.exception("on_death callback failed")
