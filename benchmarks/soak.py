"""Soak test: many inferences through one Classifier, resident memory sampled as it goes.

    python benchmarks/soak.py [--runtime ort-cpu] [--iterations 100000] [--out benchmarks/results]

Writes soak_<runtime>.md and .json: RSS after warm-up and at the end, the growth, and the samples.
Every 10th call goes through classify() on a raw uint8 image (preprocessing path), the rest through
run() on a float32 batch of 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil


def soak(runtime: str = "ort-cpu", iterations: int = 100_000, samples: int = 50) -> dict:
    from edgecnn.runtimes import Classifier

    from edgecnn.bench import default_model
    from edgecnn.data import synthetic_dataset
    from edgecnn.machine import describe

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as td:
        onnx_path, pt_path = default_model(Path(td))
        model = pt_path if runtime == "torch" else onnx_path
        ds = synthetic_dataset(4, seed=7)
        with Classifier(model, runtime=runtime) as clf:
            x = clf.preprocess(list(ds.images[:8]))
            every = max(1, iterations // samples)
            warmup = iterations // 10
            rss, t0 = [], time.perf_counter()
            for i in range(iterations):
                if i % 10 == 9:
                    clf.classify(ds.images[i % len(ds.images)], top_k=3)
                else:
                    clf.run(x[i % 8 : i % 8 + 1])
                if i % every == 0 or i == iterations - 1:
                    rss.append((i, proc.memory_info().rss))
            seconds = time.perf_counter() - t0
    after_warmup = next(r for i, r in rss if i >= warmup)
    post = [r for i, r in rss if i >= warmup]
    return {
        "runtime": runtime, "iterations": iterations, "seconds": round(seconds, 1),
        "rss_after_warmup_mb": after_warmup / 2**20, "rss_end_mb": rss[-1][1] / 2**20,
        "rss_max_after_warmup_mb": max(post) / 2**20,
        "growth_after_warmup_mb": (rss[-1][1] - after_warmup) / 2**20,
        "samples": [(i, r / 2**20) for i, r in rss],
        "machine": f"{describe()}, Python {sys.version.split()[0]}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="ort-cpu")
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()
    r = soak(a.runtime, a.iterations)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"soak_{a.runtime}.json").write_text(json.dumps(r, indent=1) + "\n")
    md = [f"# Soak: {r['iterations']:,} inferences on {r['runtime']}", "",
          f"Machine: {r['machine']}. Command: `python benchmarks/soak.py --runtime {r['runtime']}"
          f" --iterations {r['iterations']}`", "",
          "| iterations | seconds | RSS after warm-up (10%) | RSS at end | max RSS after warm-up | growth after warm-up |",
          "|---|---|---|---|---|---|",
          f"| {r['iterations']:,} | {r['seconds']} | {r['rss_after_warmup_mb']:.1f} MiB | {r['rss_end_mb']:.1f} MiB | "
          f"{r['rss_max_after_warmup_mb']:.1f} MiB | {r['growth_after_warmup_mb']:+.2f} MiB |", ""]
    (a.out / f"soak_{a.runtime}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
