"""Benchmark int8 and fp16 against fp32 in one run on one machine (ort-cpu and openvino); writes results/quantization.md.

    python benchmarks/quantization.py [--checkpoint model.pt] [--rounds 3] [--min-time 1.0]

Without --checkpoint it trains the test suite's small model (built-in set, 3 epochs). Every
quantized model goes through `edgecnn quantize`'s accuracy gate first; cells are timed in
interleaved rounds (fp32, int8, fp16, fp32, ...) so load from other processes hits all alike,
and the best round is reported beside the median.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown CPU", "", platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name}, {os.cpu_count()} logical CPUs visible, {' '.join(isa) or 'no AVX flags read'}"


def trained_checkpoint(folder: Path) -> Path:
    from edgecnn.data import synthetic_dataset
    from edgecnn.train import TrainConfig, train_to_file

    pt = folder / "model.pt"
    ds = synthetic_dataset(per_class=300, seed=0)
    train_to_file(ds, TrainConfig(epochs=3, progress=False, seed=0), pt, log=lambda s: None)
    return pt


def time_cell(runtime: str, path: Path, batch: int, min_time: float) -> tuple[float, float]:
    """(throughput img/s, p50 ms) for one cell."""
    from edgecnn.runtimes import load_runtime

    from edgecnn.bench import time_runtime

    with load_runtime(runtime, path) as rt:
        row = time_runtime(rt, batch, warmup=5, min_time=min_time)
    return row.throughput, row.p50_ms


def float_nodes_profile(path: Path, batch: int = 64, runs: int = 20) -> list[tuple[str, float, bool]]:
    """ORT profile of an int8 model: (op type, share of kernel time, runs in int8?) per op type."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as td:
        so.profile_file_prefix = str(Path(td) / "prof")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        for _ in range(runs):
            s.run(None, {s.get_inputs()[0].name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    agg: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"]
    total = sum(agg.values()) or 1
    int8_ops = {"QLinearConv", "QGemm", "NhwcMaxPool", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul"}
    return [(op, dur / total, op in int8_ops) for op, dur in agg.most_common()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quantization.md")
    args = ap.parse_args()

    from edgecnn.exporters.onnx import export
    from edgecnn.exporters.quantize import quantize
    from edgecnn.runtimes import get_runtime_class

    from edgecnn._io import write_text_atomic
    from edgecnn.quant_report import file_size

    load_start = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="edgecnn-qbench-") as td:
        work = Path(td)
        pt = args.checkpoint or trained_checkpoint(work)
        fp32 = export(pt, work / "model.onnx", dynamic_batch=True).path
        runtimes = ["ort-cpu"] + (["openvino"] if get_runtime_class("openvino").available()[0] else [])
        files: dict[tuple[str, str], Path] = {}
        reports = {}
        for rt in runtimes:
            files[(rt, "fp32")] = fp32
            backend, ext = ("ort", ".onnx") if rt == "ort-cpu" else ("openvino", ".xml")
            for prec in ("int8", "fp16"):
                res = quantize(fp32, work / f"model.{backend}.{prec}{ext}", precision=prec, backend=backend)
                files[(rt, prec)] = res.path
                reports[(rt, prec)] = res.report
        # Interleaved rounds: every cell once per round.
        tput: dict = collections.defaultdict(list)
        lat: dict = collections.defaultdict(list)
        for _ in range(args.rounds):
            for key, path in files.items():
                t, _ = time_cell(key[0], path, 64, args.min_time)
                _, p50 = time_cell(key[0], path, 1, args.min_time)
                tput[key].append(t)
                lat[key].append(p50)
        prof = float_nodes_profile(files[("ort-cpu", "int8")])
        sizes = {key: file_size(path) for key, path in files.items()}
    load_end = os.getloadavg()

    import onnxruntime
    import openvino

    lines = [
        "# int8 and fp16 against fp32 (same machine, same run)",
        "",
        f"- CPU: {cpu_name()}",
        f"- onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}; default threads",
        f"- model: the seed Net ({'given checkpoint' if args.checkpoint else 'trained 3 epochs on the built-in set'}), "
        "exported with the exact graph pass (MaxPool before ELU), dynamic batch",
        f"- load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, "
        f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}: the machine is shared with other jobs, "
        "so cells run in interleaved rounds and the best round is the headline figure (median beside it)",
        f"- {args.rounds} rounds x {args.min_time:g} s per cell; total {time.time() - t_start:.0f} s",
        "- command: `python benchmarks/quantization.py`",
        "",
        "| runtime | precision | file size | b1 p50 latency ms (best / median) | b64 throughput img/s (best / median) "
        "| vs fp32 (b64, best) | held-out top-1 (fp32 -> q) | agreement | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in files:
        rt, prec = key
        t, lt = tput[key], lat[key]
        base = max(tput[(rt, "fp32")])
        rep = reports.get(key)
        acc = (f"{rep.acc_fp32 * 100:.2f}% -> {rep.acc_quant * 100:.2f}% ({rep.drop_points:+.2f} pt)"
               if rep else "-")
        lines.append(
            f"| {rt} | {prec} | {sizes[key] / 1e3:.0f} kB | {min(lt):.3f} / {np.median(lt):.3f} | "
            f"{max(t):,.0f} / {np.median(t):,.0f} | {max(t) / base:.2f}x | {acc} | "
            f"{rep.agreement * 100:.2f}% | {'pass' if rep.passed else 'FAIL'} |" if rep else
            f"| {rt} | {prec} | {sizes[key] / 1e3:.0f} kB | {min(lt):.3f} / {np.median(lt):.3f} | "
            f"{max(t):,.0f} / {np.median(t):,.0f} | 1.00x | - | - | - |")
    lines += ["", "## Where ort-cpu int8 time goes (ORT profile, batch 64)", "",
              "| op (as ORT ran it) | share of kernel time | int8? |", "|---|---|---|"]
    lines += [f"| {op} | {share * 100:.1f}% | {'yes' if q else 'no (float)'} |" for op, share, q in prof]
    lines += ["", "## Notes", "", (HERE / "results" / "quantization_notes.md").read_text().strip()
              if (HERE / "results" / "quantization_notes.md").is_file() else ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, "\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
