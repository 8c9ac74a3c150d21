"""The one timing helper (runtimes/timing.py) every benchmark uses: warm-up, stop rule, sync hook, percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from edgecnn.runtimes.timing import measure


def test_warmup_is_not_timed_inputs_rotate_and_the_stop_rule_holds():
    seen, synced = [], []
    t = measure(seen.append, ["a", "b", "c"], warmup=4, min_time=0.0, min_iters=7, max_iters=None,
                sync=lambda: synced.append(len(seen)))
    assert t.iterations == 7 and len(seen) == 11
    assert seen == ["a", "b", "c", "a"] + ["a", "b", "c", "a", "b", "c", "a"]  # warm-up, then timed from buffer 0
    assert synced == [4] + list(range(5, 12))  # once after warm-up, then inside every timed call
    capped = measure(lambda: None, warmup=0, min_time=60.0, min_iters=1, max_iters=5)
    assert capped.iterations == 5  # the iteration cap ends a long min_time
    with pytest.raises(ValueError):
        measure(lambda x: None, [], warmup=0)


def test_min_time_keeps_timing_and_sync_time_is_counted():
    import time

    t = measure(lambda: None, warmup=0, min_time=0.05, min_iters=1, max_iters=None,
                sync=lambda: time.sleep(0.002))
    assert t.iterations >= 5 and t.p50_ms >= 2.0  # the device wait belongs to the call that launched the work


def test_statistics_are_the_percentiles_of_the_timed_calls():
    t = measure(lambda: sum(range(1000)), warmup=1, min_time=0.0, min_iters=50)
    ms = t.times_ms
    assert t.p50_ms == pytest.approx(np.percentile(ms, 50)) and t.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert t.p50_ms <= t.p90_ms <= t.p99_ms and t.mean_ms == pytest.approx(ms.mean())
    assert t.throughput(8) == pytest.approx(8 * 1000.0 / t.mean_ms)
