"""What machine a benchmark ran on, its measured fp32 peak, and the model's FLOPs (for the roofline)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from functools import lru_cache

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "avx_vnni")


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count() or 1, "isa": [f for f in ISA_FLAGS if f in flags]}


@lru_cache(maxsize=1)
def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe() -> str:
    c = cpu_info()
    gpu = gpu_name()
    return (f"{c['model']}, {c['cores']} logical cores, {', '.join(c['isa']) or 'no AVX-512'}"
            + (f"; GPU {gpu}" if gpu else "; no GPU"))


def net_flops(num_classes: int = 6, size: int = 64) -> float:
    """Multiply-adds x 2 of the seed Net per image (convolutions and the linear layer)."""
    conv1 = 2 * 32 * size * size * 3 * 9
    conv2 = 2 * 64 * (size // 2) ** 2 * 32 * 9
    fc = 2 * 64 * (size // 4) ** 2 * num_classes
    return float(conv1 + conv2 + fc)


def measure_peak_gflops(threads: int | None = None, n: int = 2048, seconds: float = 1.5) -> float:
    """fp32 GFLOP/s of a large matrix product (numpy's BLAS), the best of repeated runs."""
    import numpy as np

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        threadpool_limits = None
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ctx = threadpool_limits(threads) if (threadpool_limits and threads) else _null()
    best = 0.0
    with ctx:
        a @ b
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
