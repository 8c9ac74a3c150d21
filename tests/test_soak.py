"""Soak (slow, not in the default run): 100 000 inferences, resident memory flat after warm-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_soak_100k_inferences_memory_flat():
    from soak import soak

    r = soak("ort-cpu", 100_000)
    # Flat: after warm-up, resident memory grows by less than 8 MiB over 90 000 inferences
    # (a leak of even 100 bytes per call would show as ~9 MiB).
    assert r["growth_after_warmup_mb"] < 8, r
    assert r["rss_max_after_warmup_mb"] - r["rss_after_warmup_mb"] < 16, r
