"""Dynamic batcher for `edgecnn serve`: concurrent requests share model calls of at most max_batch rows."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("edgecnn.serve")

NOT_FINITE = "the model's output for this request is not finite (NaN or Inf): check the input's scale"
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"`,;:()\[\]{}<>]+){2,}[\\/]?")


class BatcherError(Exception):
    """What ``Batcher.submit`` raises: ``status`` is the HTTP status code, ``str(e)`` a one-line message."""
    status = 500


class RowsFailedError(BatcherError):
    """The model raised on this request's rows, or their output is not finite (its batch-mates are fine)."""
    status = 422


class QueueFullError(BatcherError):
    """Too many rows are queued: answer 503 with ``Retry-After: retry_after`` (whole seconds, at least 1)."""
    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(BatcherError):
    """No new requests are taken (``close_to_new``/``stop``), or ``stop(drain=False)`` dropped this one."""
    status = 503


class BatcherDeadError(BatcherError):
    """The batcher failed internally and answers nothing more: the process should exit and be restarted."""
    status = 503


def one_line(e: BaseException) -> str:
    """``str(e)`` on one line, without file paths (``<path>``) or a traceback in it, at most 300 chars."""
    try:
        text = str(e).split("Traceback (most recent call last)")[0]
        text = _PATH.sub("<path>", " ".join(text.split())) or type(e).__name__
    except Exception:  # noqa: BLE001 - an exception whose str() fails
        text = type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _model_failed(exc: BaseException) -> RowsFailedError:
    log.debug("a model call failed: %s: %s", type(exc).__name__, one_line(exc))
    return RowsFailedError(f"the model failed on this request: {one_line(exc)}")


_Piece = tuple["_Req", int, int]  # a request and the row range [start, stop) that one model call runs


def _gather(pieces: list[_Piece]) -> np.ndarray:
    if len(pieces) == 1:
        r, a, b = pieces[0]
        return r.x if b - a == r.n else r.x[a:b]
    return np.concatenate([r.x[a:b] for r, a, b in pieces])


def _checked(out: object, rows: int) -> np.ndarray:
    out = np.asarray(out)
    if out.ndim == 0 or out.shape[0] != rows:
        raise ValueError(f"the model returned {out.shape[0] if out.ndim else 0} rows for {rows}")
    return out


def _all_finite(out: np.ndarray) -> bool:
    """True unless a float output holds NaN or Inf (integer outputs are always finite)."""
    return out.dtype.kind not in "fc" or bool(np.isfinite(out).all())


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody waits for this any more
        pass


class _Req:
    """One submitted request: rows ``[0, taken)`` have been handed to model calls, ``done_rows`` answered."""

    __slots__ = ("x", "n", "fut", "t0", "taken", "done_rows", "buf")

    def __init__(self, x: np.ndarray, fut: asyncio.Future, t0: float) -> None:
        self.x, self.fut, self.t0 = x, fut, t0
        self.n: int = x.shape[0]
        self.taken = self.done_rows = 0
        self.buf: np.ndarray | None = None  # the reassembled answer of a request split over several calls


class Batcher:
    """Collects submitted row blocks into model calls, runs up to ``instances`` calls at once (each on a
    worker thread, Triton's instance count) and hands each caller its own output rows, in order.

    Dispatch rule: whenever an instance is free and rows are queued, the next call takes the queued rows,
    oldest first, up to ``call_rows`` (default and at most ``max_batch``; a request may be split over calls,
    shared with other requests, and is reassembled before it is answered). A smaller ``call_rows`` with
    several instances keeps every instance busy: one free instance does not take all that is queued while
    the others finish. So a request that finds a free instance runs at once, and batches
    form by themselves while every instance is busy. ``max_delay_s > 0`` only applies while another call is
    running (never with ``instances=1``) and fewer than ``call_rows`` rows are queued: the free instance then
    waits until ``call_rows`` rows are queued, the oldest has waited ``max_delay_s``, no other call runs any
    more, or ``close_to_new`` is called, whichever comes first.

    Failures stay with their request: non-finite output rows, or a call that raises an ``Exception``
    (MemoryError too: its requests are re-run in halves until the failing one is alone), give that request
    ``RowsFailedError``. At most ``max_queue_rows`` rows wait (default ``8 * max_batch``, at least
    ``max_batch``; an empty queue takes any one request), else ``QueueFullError``. A cancelled submit's rows
    not yet run are dropped. Death: an error in the batcher's own code or hooks, or a non-``Exception``
    (SystemExit...) from ``run``, fails every pending submit and later ones with ``BatcherDeadError``,
    sets ``healthy`` False and calls ``on_death(exc)`` once.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_delay_s: float = 0.0,
                 instances: int = 1, max_queue_rows: int | None = None,
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_wait: Callable[[float], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None,
                 run_lone: Callable[[np.ndarray], np.ndarray] | None = None,
                 call_rows: int | None = None) -> None:
        """``run_lone``: what ``run_now`` calls (a call that runs alone; default ``run``)."""
        if max_batch < 1 or instances < 1 or not max_delay_s >= 0 or (call_rows is not None and call_rows < 1):
            raise ValueError(f"need max_batch, instances, call_rows >= 1 and max_delay_s >= 0, not "
                             f"{max_batch}, {instances}, {call_rows}, {max_delay_s}")
        self._run = run
        self._run_lone = run_lone or run
        self.max_batch = int(max_batch)
        self.call_rows = min(self.max_batch, int(call_rows or max_batch))
        self.max_delay_s = float(max_delay_s)
        self.instances = int(instances)
        self.max_queue_rows = max(self.max_batch, 8 * max_batch if max_queue_rows is None else max_queue_rows)
        self._on_batch, self._on_queue_wait, self._on_death = on_batch, on_queue_wait, on_death
        self._pool = ThreadPoolExecutor(self.instances, thread_name_prefix="edgecnn-batch")
        self._queue: deque[_Req] = deque()
        # The queue and each request's ``taken`` count are shared with the instances' threads, which take the
        # next rows themselves when a call ends (``_work``): every change to them holds this lock.
        self._lock = threading.Lock()
        self._live: set[_Req] = set()  # submitted and not answered yet
        self.queued_rows = 0  # rows queued and not yet handed to a call
        self.running_batches = 0  # model calls (or re-runs after a failed call) in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()  # set when no call runs
        self._closed = False
        self.healthy = True  # False once the batcher died
        self._death = ""
        self._call_s = 0.05  # moving average of one model call's seconds, for retry_after_s

    def start(self) -> None:
        """Bind to the running event loop (``submit`` does this itself if it was not called)."""
        self._loop = asyncio.get_running_loop()

    def retry_after_s(self) -> int:
        """Whole seconds the queue now needs to drain (at least 1, at most 60): the Retry-After to send."""
        calls = math.ceil(self.queued_rows / self.call_rows) + self.running_batches
        return max(1, min(60, math.ceil(calls * self._call_s / self.instances)))

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Runs ``x`` (rows on the first axis) through the model; returns its output rows, in order."""
        req = self.enqueue(x)
        try:
            return await req.fut
        except asyncio.CancelledError:
            self._retire(req)  # the client is gone: its rows not yet run never run
            raise
        finally:
            self._live.discard(req)

    def enqueue(self, x: np.ndarray) -> _Req:
        """``submit`` without a task: queues ``x`` and returns its request, whose ``fut`` gets the output rows
        (or the error). The caller calls ``settle(req)`` once that future is done, or ``settle(req, drop=True)``
        when it no longer wants the answer (its rows not yet run never run). Raises as ``submit`` does."""
        if not self.healthy:
            raise self._dead_error()
        if self._closed:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        if self._loop is None:
            self.start()
        x = np.ascontiguousarray(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError("submit needs an array with at least one row on its first axis")
        n = x.shape[0]
        if self.queued_rows and self.queued_rows + n > self.max_queue_rows:
            wait = self.retry_after_s()
            raise QueueFullError(f"the server is busy ({self.queued_rows} rows queued, at most "
                                 f"{self.max_queue_rows}): retry in {wait} s", wait)
        loop = self._loop
        assert loop is not None
        req = _Req(x, loop.create_future(), loop.time())
        with self._lock:
            self._queue.append(req)
            self.queued_rows += n
        self._live.add(req)
        self._pump()
        return req

    def settle(self, req: _Req, drop: bool = False) -> None:
        """The end of an ``enqueue``: its answer was taken, or (``drop``) it is not wanted any more."""
        if drop:
            self._retire(req)
        self._live.discard(req)

    def run_now(self, x: np.ndarray) -> np.ndarray | None:
        """Runs ``x`` at once on the calling thread (the event loop) when nothing runs and nothing is queued,
        else returns None (then ``submit`` it). For a lone request: no hand-off to a worker thread and back
        (about 0.15 ms at batch 1); the loop is blocked for the call, so the caller keeps it to small
        requests that find no other request in progress. Failures are the same as ``submit``'s."""
        if not self.healthy:
            raise self._dead_error()
        if self._closed:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        if self.running_batches or self.queued_rows or self._loop is None:
            return None
        x = np.ascontiguousarray(x)
        n = x.shape[0] if x.ndim else 0
        if n == 0 or n > self.max_batch:
            return None
        if self._on_queue_wait is not None:
            self._on_queue_wait(0.0)
        if self._on_batch is not None:
            self._on_batch(n)
        self.running_batches += 1
        self._idle.clear()
        t = time.perf_counter()
        try:
            out = _checked(self._run_lone(x), n)
        except Exception as e:  # noqa: BLE001 - this request's own failure
            raise _model_failed(e) from None
        except BaseException as e:  # SystemExit, KeyboardInterrupt... from the model: the batcher's death
            self._die(e)
            raise self._dead_error() from None
        finally:
            self._call_s += 0.2 * (time.perf_counter() - t - self._call_s)
            self.running_batches -= 1
            if not self.running_batches:
                self._idle.set()
        if not _all_finite(out):
            raise RowsFailedError(NOT_FINITE)
        return out

    def close_to_new(self) -> None:
        """From now on ``submit`` raises ``ShuttingDownError``; what is queued still runs, without delay."""
        if not self._closed:
            self._closed = True
            if self._loop is not None:
                self._pump()

    async def stop(self, drain: bool = True) -> None:
        """Closes to new requests; with ``drain`` answers everything queued and running, else fails what
        is queued with ``ShuttingDownError`` (calls already running still finish); then ends the threads."""
        self.close_to_new()
        if not drain:
            for r in list(self._queue):
                if r.taken < r.n:
                    self._fail(r, ShuttingDownError("the server shut down before this request ran"))
        pending = [r.fut for r in self._live if not r.fut.done()]
        if pending and self.healthy:
            await asyncio.wait(pending)
        while self.running_batches and self.healthy:  # calls of cancelled or failed requests
            self._idle.clear()
            await self._idle.wait()
        self._cancel_timer()
        if self.healthy:
            await asyncio.to_thread(self._pool.shutdown, True)
        else:
            self._pool.shutdown(wait=False, cancel_futures=True)

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
        while self.running_batches < self.instances and self.queued_rows and self.healthy:
            with self._lock:
                while q and q[0].taken == q[0].n:  # cancelled or failed requests left at the head
                    q.popleft()
                if not q:
                    return  # an instance's thread took the rows meanwhile
                if (self.max_delay_s > 0 and self.running_batches and self.queued_rows < self.call_rows
                        and not self._closed):
                    wait = q[0].t0 + self.max_delay_s - loop.time()
                    if wait > 5e-4:
                        if self._timer is None:
                            self._timer = loop.call_later(wait, self._on_timer)
                        return
                pieces, rows = self._take()
            if not rows:
                return
            self.running_batches += 1
            self._launch(pieces, rows)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self) -> tuple[list[_Piece], int]:
        """Up to ``call_rows`` queued rows, oldest first, as pieces of requests (the caller holds the lock)."""
        q, cap = self._queue, self.call_rows
        pieces: list[_Piece] = []
        rows = 0
        now = self._loop.time() if self._loop is not None else 0.0
        while q and rows < cap:
            r = q[0]
            k = min(r.n - r.taken, cap - rows)
            if k > 0:
                if r.taken == 0 and self._on_queue_wait is not None:
                    self._on_queue_wait(now - r.t0)
                pieces.append((r, r.taken, r.taken + k))
                r.taken += k
                rows += k
            if r.taken == r.n:
                q.popleft()
        self.queued_rows -= rows
        return pieces, rows

    def _launch(self, pieces: list[_Piece], rows: int, todo: list[list[_Piece]] | None = None) -> None:
        """Starts a call on an instance's thread; ``_landed`` takes each result on the loop (no task, no extra
        hop). ``todo``: the groups of requests still to re-run on this instance after a failed call."""
        if self._on_batch is not None:
            self._on_batch(rows)
        try:
            self._pool.submit(self._work, pieces, rows, todo)
        except RuntimeError as e:  # the pool is shut down (the batcher died meanwhile)
            self._landed(None, e, pieces, rows, time.perf_counter(), todo, False)

    def _work(self, pieces: list[_Piece], rows: int, todo: list | None) -> None:
        """On an instance's thread: runs the call and hands its result to the loop. Then, when it succeeded and
        rows are queued, it takes them itself and runs them at once: the loop may be busy parsing or
        answering other requests, and the model does not wait for it (not during the re-runs that isolate
        a failed request, ``todo``; never with ``max_delay_s``, whose wait is the loop's to decide)."""
        loop = self._loop
        while True:
            t = time.perf_counter()
            try:
                out, exc = _checked(self._run(_gather(pieces)), rows), None
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which isolates or dies
                out, exc = None, e
            more: tuple[list[_Piece], int] | None = None
            hook_error: BaseException | None = None
            # Not after a failure, nor after non-finite rows: the loop answers those first (a failed request's
            # rows still queued are dropped then, never run).
            if (exc is None and todo is None and self.max_delay_s == 0 and self.healthy and self.queued_rows
                    and _all_finite(out)):
                try:
                    with self._lock:
                        more = self._take() if self.healthy else None
                    if more is not None and not more[1]:
                        more = None
                    if more is not None and self._on_batch is not None:
                        self._on_batch(more[1])
                except BaseException as e:  # noqa: BLE001 - a failing hook is the batcher's death, on the loop
                    hook_error = e
            going_on = more is not None and hook_error is None
            _soon(loop, self._landed, out, exc, pieces, rows, t, todo, going_on, hook_error)
            if not going_on:
                return
            pieces, rows = more

    def _landed(self, out, exc, pieces: list[_Piece], rows: int, t: float, todo: list | None,
                still_running: bool, hook_error: BaseException | None = None) -> None:
        """A call's result, on the loop. ``still_running``: the instance went on with the next rows itself;
        ``hook_error``: a hook failed on the instance's thread (the batcher's death, once this is answered)."""
        try:
            self._call_s += 0.2 * (time.perf_counter() - t - self._call_s)
            if exc is None:
                self._deliver(pieces, out)
                if hook_error is not None:  # only after a success, never with re-runs
                    raise hook_error
            elif not isinstance(exc, Exception):
                raise exc  # SystemExit, KeyboardInterrupt... from the model: the batcher's death
            elif len(pieces) > 1:  # isolate the failing request(s): re-run both halves, first half first
                mid = len(pieces) // 2
                todo = [*(todo or ()), pieces[mid:], pieces[:mid]]
            else:
                self._fail(pieces[0][0], _model_failed(exc))
            if still_running:
                return
            while todo and self.healthy:
                group = [p for p in todo.pop() if not p[0].fut.done()]
                if group:  # the same instance runs it next
                    self._launch(group, sum(b - a for _, a, b in group), todo)
                    return
        except BaseException as e:  # noqa: BLE001 - a failure here must not leave callers waiting forever
            self._die(e)
            if still_running:
                return
        self._release()

    def _release(self) -> None:
        self.running_batches -= 1
        if not self.running_batches:
            self._idle.set()
        if self.queued_rows and self.healthy:
            self._pump()

    def _deliver(self, pieces: list[_Piece], out: np.ndarray) -> None:
        finite: np.ndarray | None = None
        if not _all_finite(out):
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
        with self._lock:
            self.queued_rows -= r.n - r.taken
            r.taken = r.n
        r.buf = None

    def _dead_error(self) -> BatcherDeadError:
        return BatcherDeadError(f"the inference batcher stopped after an internal error ({self._death}):"
                                " the server must be restarted")

    def _die(self, exc: BaseException) -> None:
        if not self.healthy:
            return
        self.healthy = False
        self._death = type(exc).__name__
        self._cancel_timer()
        log.error("the inference batcher died: %s: %s", self._death, one_line(exc), exc_info=exc)
        for r in list(self._live):
            self._fail(r, self._dead_error())
        with self._lock:
            self._queue.clear()
            self.queued_rows = 0
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._idle.set()
        if self._on_death is not None:
            try:
                self._on_death(exc)
            except Exception:  # noqa: BLE001 - the callback's own failure changes nothing here
                log.exception("on_death callback failed")
