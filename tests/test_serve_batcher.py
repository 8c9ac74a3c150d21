"""runtimes/serve_batcher.Batcher with fake models (plain functions): no server, no torch, each test bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from edgecnn.runtimes.serve_batcher import (
    NOT_FINITE,
    Batcher,
    BatcherDeadError,
    BatcherError,
    QueueFullError,
    RowsFailedError,
    ShuttingDownError,
)

BLOCK = -1.0  # a row starting with this makes the fake model wait on its gate
POISON = np.float32(3e38)  # times 2 overflows float32 to inf


class Fake:
    """The model ``x * 2``; records each call's rows; waits on ``gate`` when a row starts with BLOCK."""

    def __init__(self, raises: bool = False) -> None:
        self.gate = threading.Event()
        self.calls: list[int] = []
        self.inputs: list[np.ndarray] = []
        self.raises = raises

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.flags.c_contiguous
        assert threading.current_thread() is not threading.main_thread()  # never on the event loop
        self.calls.append(len(x))
        self.inputs.append(x.copy())
        if (x[:, 0] == BLOCK).any():
            assert self.gate.wait(5), "the test never opened the gate"
        if self.raises and (x == POISON).any():
            raise ValueError("bad value in /tmp/tmpab12cd/model.onnx\nTraceback (most recent call last): ...")
        with np.errstate(over="ignore"):
            return x * 2


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * 3, dtype=np.float32).reshape(n, 3) + start).copy()


def blocker() -> np.ndarray:
    return np.full((1, 3), BLOCK, np.float32)


def run(coro, timeout: float = 10.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def until(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


async def occupy(b: Batcher, fake: Fake, n_calls: int = 1) -> asyncio.Task:
    """Starts a blocked request that holds one instance; returns its task once its call has begun."""
    task = asyncio.ensure_future(b.submit(blocker()))
    await until(lambda: len(fake.calls) >= n_calls)
    return task


def _isolation(raises: bool) -> None:
    async def main():
        fake = Fake(raises=raises)
        sizes: list[int] = []
        b = Batcher(fake, max_batch=8, on_batch=sizes.append)
        b.start()
        held = await occupy(b, fake)
        xs = [rows(1, 10 * i) for i in range(7)]
        xs.insert(3, np.full((1, 3), POISON, np.float32))
        tasks = [asyncio.ensure_future(b.submit(x)) for x in xs]
        await until(lambda: b.queued_rows == 8)
        fake.gate.set()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        await held
        assert fake.calls[:2] == [1, 8]  # all eight really shared one model call
        assert sizes == fake.calls and max(fake.calls) == 8
        if not raises:
            assert len(fake.calls) == 2  # non-finite rows need no re-run
        for i, (x, r) in enumerate(zip(xs, res, strict=True)):
            if i == 3:
                assert isinstance(r, RowsFailedError) and r.status == 422
            else:
                np.testing.assert_array_equal(r, x * 2)
        await b.stop()
        return res[3]

    err = run(main())
    msg = str(err)
    assert "\n" not in msg
    if raises:
        assert msg.startswith("the model failed on this request: bad value in <path>")
        assert "/tmp/" not in msg and "tmpab12cd" not in msg and "Traceback" not in msg
    else:
        assert msg == NOT_FINITE


def test_non_finite_rows_fail_alone():
    _isolation(raises=False)


def test_raising_model_fails_only_the_bad_request():
    _isolation(raises=True)


def test_a_split_request_with_a_bad_row_fails_whole_and_its_other_pieces_are_dropped():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=2)
        x = rows(5)
        x[3, 1] = POISON
        with pytest.raises(RowsFailedError, match="not finite"):
            await b.submit(x)
        assert fake.calls == [2, 2] and b.queued_rows == 0  # its last row never ran
        np.testing.assert_array_equal(await b.submit(rows(3)), rows(3) * 2)
        await b.stop()

    run(main())


def test_rows_that_do_not_stack_run_apart():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=8)
        held = await occupy(b, fake)
        a = asyncio.ensure_future(b.submit(rows(2)))
        c = asyncio.ensure_future(b.submit(np.ones((1, 4), np.float32)))
        await until(lambda: b.queued_rows == 3)
        fake.gate.set()
        np.testing.assert_array_equal(await a, rows(2) * 2)
        np.testing.assert_array_equal(await c, np.full((1, 4), 2, np.float32))
        await held
        assert fake.calls == [1, 2, 1] and b.healthy  # the stacking failure was isolated, not fatal
        await b.stop()

    run(main())


def test_instances_run_calls_at_the_same_time():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=4, instances=2)
        first = await occupy(b, fake)
        second = await occupy(b, fake, 2)
        assert b.running_batches == 2 and b.queued_rows == 0
        queued = asyncio.ensure_future(b.submit(rows(1)))
        await until(lambda: b.queued_rows == 1)
        assert b.retry_after_s() >= 1
        fake.gate.set()
        await asyncio.gather(first, second, queued)
        assert fake.calls == [1, 1, 1] and b.running_batches == 0
        await b.stop()

    run(main())


def test_call_rows_spread_the_queue_over_the_instances_and_each_request_gets_its_own_rows():
    async def main():
        fake, sizes = Fake(), []
        b = Batcher(fake, max_batch=8, instances=2, call_rows=2, on_batch=sizes.append)
        assert b.call_rows == 2 and Batcher(fake, max_batch=4, call_rows=9).call_rows == 4  # at most max_batch
        first = await occupy(b, fake)  # one instance blocked: the other takes 2 rows a call, not all 7
        xs = [rows(3, 100.0), rows(1, 200.0), rows(3, 300.0)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, x * 2)  # split over calls and reassembled, in order
        assert sum(fake.calls[1:]) == 7 and max(fake.calls[1:]) == 2 and len(fake.calls) >= 5 and max(sizes) == 2
        fake.gate.set()
        await first
        await b.stop()

    run(main())
    with pytest.raises(ValueError, match="call_rows"):
        Batcher(Fake(), max_batch=4, call_rows=0)


def test_memory_error_from_the_model_is_a_request_failure_not_death():
    def model(x):
        if len(x) > 2:
            raise MemoryError()
        return x * 2

    async def main():
        b = Batcher(model, max_batch=4)
        with pytest.raises(RowsFailedError, match="the model failed on this request: MemoryError"):
            await b.submit(rows(3))
        np.testing.assert_array_equal(await b.submit(rows(2)), rows(2) * 2)
        assert b.healthy
        await b.stop()

    run(main())


def test_wrong_row_count_from_the_model_is_a_request_failure():
    async def main():
        b = Batcher(lambda x: x[:1], max_batch=4)
        with pytest.raises(RowsFailedError, match="returned 1 rows for 3"):
            await b.submit(rows(3))
        assert b.healthy
        await b.stop()

    run(main())


def test_max_batch_caps_every_call_and_rows_come_back_in_order():
    async def main():
        fake = Fake()
        sizes: list[int] = []
        b = Batcher(fake, max_batch=4, on_batch=sizes.append)
        big = rows(10, 100)
        np.testing.assert_array_equal(await b.submit(big), big * 2)
        assert fake.calls == [4, 4, 2] and sizes == fake.calls

        held = await occupy(b, fake, 4)
        xs = [rows(1, 1000), big, rows(3, 2000), rows(1, 3000), rows(2, 4000)]
        tasks = [asyncio.ensure_future(b.submit(x)) for x in xs]
        await until(lambda: b.queued_rows == 17)
        fake.gate.set()
        for x, r in zip(xs, await asyncio.gather(*tasks), strict=True):
            np.testing.assert_array_equal(r, x * 2)
        await held
        later = fake.calls[4:]
        assert max(later) <= 4 and sum(later) == 17 and len(later) == 5
        assert sizes == fake.calls
        await b.stop()

    run(main())


def test_one_whole_request_reaches_the_model_without_a_copy():
    seen: list[np.ndarray] = []

    def model(x):
        seen.append(x)
        return x * 2

    async def main():
        b = Batcher(model, max_batch=8)
        x = rows(3)
        await b.submit(x)
        assert seen[0] is x
        xt = rows(4).T.copy().T  # not C-contiguous: the model gets a contiguous copy
        np.testing.assert_array_equal(await b.submit(xt), xt * 2)
        assert seen[1].flags.c_contiguous
        await b.stop()

    run(main())


def test_queue_bound_refuses_with_retry_after_then_drains():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=2, max_queue_rows=4)
        held = await occupy(b, fake)
        tasks = [asyncio.ensure_future(b.submit(rows(2, 10 * i))) for i in range(2)]
        await until(lambda: b.queued_rows == 4)
        with pytest.raises(QueueFullError) as e:
            await b.submit(rows(1))
        assert e.value.status == 503 and isinstance(e.value.retry_after, int) and e.value.retry_after >= 1
        assert b.retry_after_s() >= 1 and b.queued_rows == 4
        fake.gate.set()
        for i, r in enumerate(await asyncio.gather(*tasks)):
            np.testing.assert_array_equal(r, rows(2, 10 * i) * 2)
        await held
        assert b.queued_rows == 0
        await b.stop()

    run(main())


def test_queue_bound_defaults_and_an_empty_queue_takes_a_big_request():
    b = Batcher(lambda x: x, max_batch=4)
    assert b.max_queue_rows == 32
    assert Batcher(lambda x: x, max_batch=4, max_queue_rows=1).max_queue_rows == 4

    async def main():
        small = Batcher(lambda x: x * 2, max_batch=2, max_queue_rows=2)
        np.testing.assert_array_equal(await small.submit(rows(7)), rows(7) * 2)
        await small.stop()

    run(main())


def test_cancelled_submit_never_reaches_the_model():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=8)
        held = await occupy(b, fake)
        gone = asyncio.ensure_future(b.submit(np.full((3, 3), 7.0, np.float32)))
        kept = asyncio.ensure_future(b.submit(rows(2)))
        await until(lambda: b.queued_rows == 5)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert b.queued_rows == 2
        fake.gate.set()
        np.testing.assert_array_equal(await kept, rows(2) * 2)
        await held
        assert not any((x == 7.0).all(axis=1).any() for x in fake.inputs)
        assert fake.calls == [1, 2]
        await b.stop()

    run(main())


def test_enqueue_without_a_task_answers_on_the_future_and_a_dropped_one_never_runs():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=8)
        held = await occupy(b, fake)
        gone = b.enqueue(np.full((3, 3), 7.0, np.float32))
        kept = b.enqueue(rows(2))
        assert b.queued_rows == 5
        b.settle(gone, drop=True)  # the caller no longer wants it: its rows are skipped
        assert b.queued_rows == 2
        fake.gate.set()
        np.testing.assert_array_equal(await kept.fut, rows(2) * 2)
        b.settle(kept)
        await held
        assert not gone.fut.done()  # nobody is answered for a dropped request
        assert not any((x == 7.0).all(axis=1).any() for x in fake.inputs)
        assert fake.calls == [1, 2]
        await b.stop()  # nothing live is left to wait for

    run(main())


def test_cancelled_split_request_drops_its_remaining_pieces():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=2)
        x = rows(6, 1)
        x[0, 0] = BLOCK  # its first piece blocks
        gone = asyncio.ensure_future(b.submit(x))
        await until(lambda: fake.calls == [2])
        assert b.queued_rows == 4
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert b.queued_rows == 0
        fake.gate.set()
        np.testing.assert_array_equal(await b.submit(rows(1, 50)), rows(1, 50) * 2)
        assert fake.calls == [2, 1]
        await b.stop()

    run(main())


def test_a_lone_request_with_a_free_instance_runs_at_once():
    async def main():
        b = Batcher(lambda x: x * 2, max_batch=8, max_delay_s=1.0, instances=1)
        t = time.monotonic()
        np.testing.assert_array_equal(await b.submit(rows(1)), rows(1) * 2)
        assert time.monotonic() - t < 0.5
        await b.stop()

    run(main())


def test_delay_fills_a_batch_only_while_another_instance_is_busy_and_is_bounded():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=4, max_delay_s=0.6, instances=2)
        held = await occupy(b, fake)
        t = time.monotonic()
        first = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(b.submit(rows(1, 5)))
        await asyncio.gather(first, second)
        waited = time.monotonic() - t
        assert 0.5 < waited < 3.0  # waited for the delay (bounded), not for the blocked instance
        assert fake.calls == [1, 2]  # the two shared one call
        full = asyncio.ensure_future(b.submit(rows(4)))  # max_batch rows: no waiting
        await asyncio.wait_for(full, 0.5)
        assert fake.calls == [1, 2, 4]
        assert not held.done()
        fake.gate.set()
        await held
        await b.stop()

    run(main())


def test_queue_wait_hook_sees_each_request_once():
    async def main():
        waits: list[float] = []
        b = Batcher(lambda x: x * 2, max_batch=2, on_queue_wait=waits.append)
        await b.submit(rows(5))
        await b.submit(rows(1))
        assert len(waits) == 2 and all(w >= 0 for w in waits)
        await b.stop()

    run(main())


def test_death_inside_the_batcher_fails_pending_requests_and_calls_on_death():
    deaths: list[BaseException] = []

    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=2, on_death=deaths.append)
        held = await occupy(b, fake)
        pending = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(3)]
        await until(lambda: b.queued_rows == 3)

        def boom():
            raise MemoryError("no memory")

        b._take = boom  # the next dispatch fails inside the batcher
        fake.gate.set()
        res = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, BatcherDeadError) and r.status == 503 for r in res)
        np.testing.assert_array_equal(await held, blocker() * 2)  # answered before the death
        assert not b.healthy and len(deaths) == 1 and isinstance(deaths[0], MemoryError)
        with pytest.raises(BatcherDeadError, match="MemoryError"):
            await b.submit(rows(1))
        assert b.queued_rows == 0
        await b.stop()

    run(main())


def test_a_failing_hook_or_a_base_exception_from_the_model_is_death():
    async def main(b: Batcher, deaths: list):
        with pytest.raises(BatcherDeadError):
            await b.submit(rows(2))
        assert not b.healthy and len(deaths) == 1
        await b.stop()
        return deaths[0]

    def bad_hook(n: int) -> None:
        raise RuntimeError("metrics broke")

    def exits(x):
        raise SystemExit(3)

    d1: list = []
    assert isinstance(run(main(Batcher(lambda x: x, max_batch=4, on_batch=bad_hook, on_death=d1.append), d1)),
                      RuntimeError)
    d2: list = []
    assert isinstance(run(main(Batcher(exits, max_batch=4, on_death=d2.append), d2)), SystemExit)


def test_stop_drains_everything_and_refuses_new_submits():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=2, max_delay_s=5.0, instances=2)
        held = await occupy(b, fake)
        xs = [rows(1, 10 * i) for i in range(3)]
        tasks = [asyncio.ensure_future(b.submit(x)) for x in xs]
        await asyncio.sleep(0.02)
        stopping = asyncio.ensure_future(b.stop(drain=True))
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDownError) as e:
            await b.submit(rows(1))
        assert e.value.status == 503
        fake.gate.set()
        for x, r in zip(xs, await asyncio.gather(*tasks), strict=True):
            np.testing.assert_array_equal(r, x * 2)
        await held
        await stopping
        assert b.queued_rows == 0 and b.running_batches == 0 and b.healthy

    run(main(), timeout=4.0)  # the 5 s delay must not hold the drain


def test_stop_without_drain_fails_what_is_queued():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch=2)
        held = await occupy(b, fake)
        queued = asyncio.ensure_future(b.submit(rows(2)))
        await until(lambda: b.queued_rows == 2)
        stopping = asyncio.ensure_future(b.stop(drain=False))
        with pytest.raises(ShuttingDownError):
            await queued
        fake.gate.set()
        np.testing.assert_array_equal(await held, blocker() * 2)  # the running call still answers
        await stopping
        assert fake.calls == [1]

    run(main())


def test_errors_share_one_base_with_a_status():
    for cls, status in ((RowsFailedError, 422), (ShuttingDownError, 503), (BatcherDeadError, 503)):
        assert issubclass(cls, BatcherError) and cls.status == status
    e = QueueFullError("busy", 3)
    assert isinstance(e, BatcherError) and e.status == 503 and e.retry_after == 3 and str(e) == "busy"
    with pytest.raises(ValueError):
        Batcher(lambda x: x, max_batch=0)


class OnLoop(Fake):
    """Fake for ``run_now``: records the thread of each call (run_now calls the model on the caller's thread)."""

    def __init__(self, result=None, exc: BaseException | None = None) -> None:
        super().__init__()
        self.threads: list[threading.Thread] = []
        self.result, self.exc = result, exc

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread())
        self.calls.append(len(x))
        if self.exc is not None:
            raise self.exc
        if (x[:, 0] == BLOCK).any():
            assert self.gate.wait(5), "the test never opened the gate"
        return x * 2 if self.result is None else self.result


def test_run_now_runs_a_lone_request_on_the_calling_thread_and_counts_it_as_a_batch():
    async def main():
        fake, sizes, waits = OnLoop(), [], []
        b = Batcher(fake, max_batch=4, on_batch=sizes.append, on_queue_wait=waits.append)
        b.start()
        x = rows(3)
        out = b.run_now(x)
        np.testing.assert_array_equal(out, x * 2)
        assert fake.threads == [threading.current_thread()] and sizes == [3] and waits == [0.0]
        assert b.running_batches == 0 and b._idle.is_set()
        assert b.run_now(rows(5)) is None  # over max_batch: submit splits it
        np.testing.assert_array_equal(await b.submit(rows(2, 7.0)), rows(2, 7.0) * 2)  # submit still works after
        await b.stop()
    run(main())


def test_run_now_calls_run_lone_and_batches_call_run():
    async def main():
        lone, fake = OnLoop(result=None), Fake()
        b = Batcher(fake, max_batch=4, instances=2, run_lone=lone)
        b.start()
        np.testing.assert_array_equal(b.run_now(rows(1)), rows(1) * 2)
        np.testing.assert_array_equal(await b.submit(rows(2, 5.0)), rows(2, 5.0) * 2)
        assert lone.calls == [1] and lone.threads == [threading.current_thread()] and fake.calls == [2]
        await b.stop()

    run(main())


def test_run_now_declines_while_a_call_runs_or_rows_are_queued():
    async def main():
        fake = OnLoop()
        b = Batcher(fake, max_batch=4)
        b.start()
        task = asyncio.ensure_future(b.submit(blocker()))
        await until(lambda: len(fake.calls) >= 1)  # the blocked call runs on the worker thread
        assert b.run_now(rows(1)) is None
        queued = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0)
        assert b.queued_rows == 1 and b.run_now(rows(1)) is None
        fake.gate.set()
        await task
        np.testing.assert_array_equal(await queued, rows(1) * 2)
        assert all(t is not threading.current_thread() for t in fake.threads)  # none of those ran here
        await b.stop()
    run(main())


def test_run_now_failures_are_the_requests_own_and_a_base_exception_is_death():
    async def main():
        inf = np.array([[1.0, np.inf, 0.0]], np.float32)
        b = Batcher(OnLoop(result=inf), max_batch=4)
        b.start()
        with pytest.raises(RowsFailedError, match="not finite"):
            b.run_now(rows(1))
        b2 = Batcher(OnLoop(exc=ValueError("bad in /tmp/x/y/model.onnx")), max_batch=4)
        b2.start()
        with pytest.raises(RowsFailedError, match="<path>") as e:
            b2.run_now(rows(1))
        assert "/tmp/x" not in str(e.value) and b2.healthy  # the path is hidden; the batcher lives on
        died: list[BaseException] = []
        b3 = Batcher(OnLoop(exc=SystemExit(3)), max_batch=4, on_death=died.append)
        b3.start()
        with pytest.raises(BatcherDeadError):
            b3.run_now(rows(1))
        assert not b3.healthy and len(died) == 1
        with pytest.raises(BatcherDeadError):
            await b3.submit(rows(1))
        b3.close_to_new()
        with pytest.raises(ShuttingDownError):
            b.close_to_new() or b.run_now(rows(1))
        for x in (b, b2):
            await x.stop()
    run(main())


def test_an_instance_runs_the_queued_rows_itself_when_its_call_ends_while_the_loop_is_busy():
    async def main():
        fake = Fake()
        sizes: list[int] = []
        b = Batcher(fake, max_batch=8, on_batch=sizes.append)
        b.start()
        first = await occupy(b, fake)  # a blocked call holds the one instance
        later = [asyncio.ensure_future(b.submit(rows(1, 10.0 * i))) for i in range(1, 4)]
        await asyncio.sleep(0)
        assert b.queued_rows == 3
        threading.Timer(0.05, fake.gate.set).start()
        time.sleep(0.5)  # the loop is busy (as when it parses requests): it cannot start the next call
        assert fake.calls == [1, 3] and sizes == [1, 3] and b.queued_rows == 0  # the instance's thread did
        assert b.running_batches == 1  # still the one instance: no second call was launched beside it
        await first
        for i, t in enumerate(later, 1):
            np.testing.assert_array_equal(await t, rows(1, 10.0 * i) * 2)
        await until(lambda: b.running_batches == 0)
        await b.stop()
    run(main())


def test_a_hook_failing_on_an_instances_thread_is_death_and_nobody_waits_for_ever():
    async def main():
        fake = Fake()
        deaths: list = []
        calls = []

        def hook(n: int) -> None:
            calls.append(n)
            if len(calls) == 2:  # the call the instance's thread takes itself
                raise RuntimeError("metrics broke")

        b = Batcher(fake, max_batch=8, on_batch=hook, on_death=deaths.append)
        b.start()
        first = await occupy(b, fake)
        later = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(2)]
        await asyncio.sleep(0)
        fake.gate.set()
        np.testing.assert_array_equal(await first, blocker() * 2)  # answered before the death
        for t in later:
            with pytest.raises(BatcherDeadError):
                await t
        assert not b.healthy and len(deaths) == 1 and isinstance(deaths[0], RuntimeError)
        await b.stop()
    run(main())
