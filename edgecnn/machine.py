"""What machine a benchmark ran on, its measured fp32 peak, and the model's FLOPs (for the roofline)."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache

from edgecnn.runtimes.cpu import describe_cpu, usable_cpus


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
    gpu = gpu_name()
    return describe_cpu().text() + (f"; GPU {gpu}" if gpu else "; no GPU")


def net_flops(num_classes: int = 6, size: int = 64) -> float:
    """Multiply-adds x 2 of the seed Net per image (convolutions and the linear layer)."""
    conv1 = 2 * 32 * size * size * 3 * 9
    conv2 = 2 * 64 * (size // 2) ** 2 * 32 * 9
    fc = 2 * 64 * (size // 4) ** 2 * num_classes
    return float(conv1 + conv2 + fc)


_PEAK_SNIPPET = r"""
import json, sys, time
import numpy as np
threads, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out = {}
try:
    from threadpoolctl import threadpool_info, threadpool_limits
    info = [f"{i.get('internal_api')} {i.get('architecture') or ''}".strip() for i in threadpool_info()]
except ImportError:
    threadpool_limits, info = None, []
def best(mm, a, b):
    mm(a, b)
    top, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter(); mm(a, b); top = max(top, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return top
a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32); b = a.T.copy()
if threadpool_limits:
    with threadpool_limits(threads):
        out["numpy (" + ", ".join(info) + ")"] = best(np.matmul, a, b)
else:
    out["numpy"] = best(np.matmul, a, b)
try:
    import torch
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch.matmul"] = best(torch.matmul, ta, tb)
except ImportError:
    pass
print(json.dumps(out))
"""


def measure_peak(threads: int | None = None, n: int = 4096, seconds: float = 2.0) -> tuple[float, str]:
    """The machine's fp32 peak: the best GFLOP/s of a large matrix product (numpy's BLAS and, if
    installed, torch), measured in a child process with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset:
    they pin OpenBLAS to an older kernel here (Haswell: ~250 GFLOP/s vs ~450 with SkylakeX on 2 cores)
    and would understate the floor. Returns (GFLOP/s, which product gave it)."""
    import json
    import sys

    threads = threads or usable_cpus()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    try:
        out = subprocess.run([sys.executable, "-c", _PEAK_SNIPPET, str(threads), str(n), str(seconds)],
                             capture_output=True, text=True, timeout=300, env=env)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0.0, "not measured"
    src, gf = max(res.items(), key=lambda kv: kv[1])
    return float(gf), f"{src}, {n}^3 fp32, {threads} threads"


def measure_peak_gflops(threads: int | None = None) -> float:
    return measure_peak(threads)[0]
