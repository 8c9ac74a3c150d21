"""One timing helper for every benchmark: warm-up excluded, a stop rule (minimum time and iterations,
an iteration cap), an optional device-sync hook, percentiles. Torch-free (numpy only)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Per-call latencies of the timed iterations (warm-up excluded)."""

    times_ms: np.ndarray

    @property
    def iterations(self) -> int:
        return int(self.times_ms.size)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    @property
    def mean_ms(self) -> float:
        return float(self.times_ms.mean())

    def throughput(self, batch: int) -> float:
        """Items per second over the timed iterations: batch x iterations / total timed seconds."""
        return float(batch * self.iterations / (self.times_ms.sum() / 1e3))


def measure(fn: Callable, inputs: Sequence | None = None, *, warmup: int = 5, min_time: float = 1.0,
            min_iters: int = 10, max_iters: int | None = 10_000, sync: Callable[[], object] | None = None) -> Timing:
    """Time ``fn`` (called as ``fn(inputs[i % len(inputs)])``, rotating between the buffers, or ``fn()``).

    ``warmup`` calls first (not timed; ``sync`` after them). Then timed calls until at least
    ``min_iters`` calls and ``min_time`` seconds, or ``max_iters`` calls (None: no cap). With ``sync``
    (e.g. torch.cuda.synchronize), each timed interval ends after ``sync()`` returns, so asynchronous
    device work is counted in the call that launched it.
    """
    if min_iters < 1:
        raise ValueError("min_iters must be >= 1")
    if inputs is not None and len(inputs) == 0:
        raise ValueError("inputs is empty")

    def call(i: int):
        return fn(inputs[i % len(inputs)]) if inputs is not None else fn()

    for i in range(warmup):
        call(i)
    if sync is not None:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    clock = time.perf_counter
    while (max_iters is None or len(times) < max_iters) and (len(times) < min_iters or clock() - start < min_time):
        i = len(times)
        t0 = clock()
        call(i)
        if sync is not None:
            sync()
        times.append(clock() - t0)
    return Timing(np.asarray(times) * 1e3)
