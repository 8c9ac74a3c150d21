"""`edgecnn demo`: the whole pipeline on the built-in set in one command (train, export, verify, bench)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ._io import write_text_atomic
from .errors import InvalidInputError


def run_demo(output, epochs: int, per_class: int, seed: int, progress: bool, out=print, log=print) -> bool:
    """Train on the built-in set, export, verify (the judge), benchmark; write summary.json and print one
    summary table through ``out``. True when the verdict passed."""
    from . import bench as b
    from .exporters.onnx import export
    from .report import bench_table, table
    from .train import train_command
    from .verify import judge

    t0 = time.perf_counter()
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{folder}: exists and is not a folder; give a folder for the demo's artefacts")
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[1/4] training on the built-in synthetic set -> {folder / 'model.pt'}")
    res = train_command(None, epochs, 32, 1e-3, seed, per_class, 0.2, None, folder / "model.pt", progress, log=log)
    log(f"[2/4] exporting -> {folder / 'model.onnx'}")
    exp = export(folder / "model.pt", folder / "model.onnx")
    log("[3/4] verifying against PyTorch")
    verdict = judge(folder / "model.onnx", folder / "model.pt", runtimes=["ort-cpu"], precision="fp32")
    rows = verdict.rows
    log("[4/4] benchmarking")
    bench_rows = b.bench(folder / "model.onnx", ["ort-cpu", "torch"], [1, 64], min_time=1.0)
    write_text_atomic(folder / "summary.json", json.dumps({
        "val_accuracy": res.val_accuracy, "history": res.history,
        "export_parity": [r.as_dict() for r in exp.parity],
        "verify": verdict.as_dict(), "bench": [r.as_dict() for r in bench_rows],
    }, indent=2) + "\n")
    log(f"wrote {folder / 'summary.json'}")
    out("\nverify (model.onnx vs model.pt):\n" + verdict.text())
    out("\nbench:\n" + bench_table(bench_rows))
    by = {(r.runtime, r.batch): r for r in bench_rows}
    summary = [
        ["validation accuracy", f"{res.val_accuracy * 100:.2f}% ({len(res.history)} epochs, {res.seconds:.0f} s)"],
        ["export parity (ort-cpu)", f"{exp.parity[0].status}, max abs {exp.parity[0].result.max_abs:.2e}"],
        ["verify (vs PyTorch)", ", ".join(f"{r.runtime} {r.status}" for r in rows)
         + ("" if verdict.passed else f" ({verdict.reason()})")],
    ]
    for rt in ("ort-cpu", "torch"):
        r1, r64 = by[(rt, 1)], by[(rt, 64)]
        summary.append([f"{rt} latency b1 p50", f"{r1.p50_ms:.3f} ms"])
        summary.append([f"{rt} throughput b64", f"{r64.throughput:,.0f} img/s"])
    summary.append(["artefacts", f"{folder}/ (model.pt, model.onnx, summary.json)"])
    summary.append(["total time", f"{time.perf_counter() - t0:.0f} s"])
    out("\nsummary:\n" + table(["item", "value"], summary))
    return verdict.passed
