"""One GPU check: ort-cuda / ort-trt parity matrix against PyTorch, then batch-1 latency and throughput.

Run on a lent GPU machine (see ../shared/device/README.md), from the repository root. edgecnn need
not be pip-installed there: the script puts the repository on the path itself. Exact commands:

    # here, once: split the onnxruntime-gpu wheel into 60 MiB pieces under .whl-gpu/
    bash ../shared/device/split-ort-gpu.sh
    # device, one call per piece, back to back:  carry [".whl-gpu/part-XX"], command: ls -l .whl-gpu
    # device, then:
    cat .whl-gpu/part-* > /tmp/onnxruntime_gpu.whl \\
      && python3 -m pip install -q --no-deps --target /tmp/ortgpu /tmp/onnxruntime_gpu.whl \\
      && PYTHONPATH=/tmp/ortgpu:$PWD python3 benchmarks/gpu_check.py --out-dir "$OUT" --require cuda

It needs torch, onnx, numpy and Pillow. Without CUDA it prints a "no CUDA" line, still runs the
parity matrix on what is usable (GPU cells show as skipped with the reason) and writes nothing.
With CUDA it writes benchmarks/results/gpu_<card>.md (and raw JSON into --out-dir).

``--require cuda`` (``trt``, or ``cuda,trt``) makes a runtime mandatory: the exit code is 3 when it
did not run (no GPU visible, or a GPU is visible but its parity row or every timed row was skipped
or failed to load), so a lent machine cannot pass the check by skipping everything. Exit 1: a parity
FAIL, or a timed cell whose configuration has no parity row ("not judged"). Every configuration that
is timed (runtime, precision and options: fp16, IO binding and CUDA graphs included) is first judged
against PyTorch on the CPU under the tolerance table's row for its precision, and the timing table
shows that verdict beside each cell. fp32 rows run with NVIDIA_TF32_OVERRIDE=0 (set here before
anything touches CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap() -> None:
    """Make edgecnn, edgecnn.runtimes and edgecnn.exporters importable from a plain checkout."""
    try:
        import edgecnn.runtimes  # noqa: F401 - installed (editable or not)
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import edgecnn

    # pyproject maps edgecnn.runtimes -> runtimes/ and edgecnn.exporters -> exporters/; do the same.
    edgecnn.__path__.append(str(ROOT))


REQUIRE = {"cuda": "ort-cuda", "trt": "ort-trt"}

# Every ONNX Runtime configuration the benchmark times: (runtime, precision, options, label). Each one
# is judged (its own parity row) before any of them is timed; CUDA-graph cells run batch 1 only.
ORT_CELLS: list[tuple[str, str, dict, str]] = [
    ("ort-cuda", "fp32", {}, "ort-cuda fp32 (host in/out)"),
    ("ort-cuda", "fp32", {"io_binding": True}, "ort-cuda fp32 io-binding (on device)"),
    ("ort-cuda", "fp32", {"cuda_graph": True}, "ort-cuda fp32 CUDA graph (host in/out)"),
    ("ort-cuda", "fp32", {"cuda_graph": True, "io_binding": True}, "ort-cuda fp32 CUDA graph (on device)"),
    ("ort-cuda", "fp16", {"io_binding": True}, "ort-cuda fp16 io-binding (on device)"),
    ("ort-trt", "fp32", {"io_binding": True}, "ort-trt fp32 io-binding (on device)"),
    ("ort-trt", "fp16", {"io_binding": True}, "ort-trt fp16 io-binding (on device)"),
]
# PyTorch eager on the card: label -> the precision it computes in (judged by _torch_cuda_row).
TORCH_CELLS: dict[str, str] = {
    "torch eager fp32 (host in/out)": "fp32",
    "torch eager fp32 (on device)": "fp32",
    "torch eager fp16 (on device)": "fp16",
}
TORCH_DEVICE = "cuda"  # where _torch_cuda_row runs the model (a test runs it on the CPU)
TRT_PROFILE = {"trt_profile_min_shapes": "input:1x3x64x64", "trt_profile_opt_shapes": "input:256x3x64x64",
               "trt_profile_max_shapes": "input:1024x3x64x64"}


def _opts_text(opts: dict) -> str:
    return ", ".join(k.replace("_", "-") for k, v in opts.items() if v is True) or "default options"


def cell_key(label: str) -> tuple[str, str, str] | None:
    """(runtime, precision, options) of a timed cell's label; None for a label no table knows."""
    for name, prec, opts, lab in ORT_CELLS:
        if lab == label:
            return name, prec, _opts_text(opts)
    if label in TORCH_CELLS:
        return "torch-cuda", TORCH_CELLS[label], _opts_text({})
    return None


def row_key(row) -> tuple[str, str, str]:
    """The same key for a parity row (its options are kept in ``row.options_text``)."""
    return row.runtime, row.precision, getattr(row, "options_text", _opts_text({}))


def judged_bench(bench: list[list], parity: list) -> tuple[list[list], list[str]]:
    """``bench`` with a parity column (the verdict of the row that judged the same configuration), and
    the labels of timed cells that nothing judged."""
    verdicts = {row_key(r): r.status for r in parity}
    out, unjudged = [], []
    for r in bench:
        key = cell_key(str(r[0]))
        verdict = verdicts.get(key) if key else None
        if verdict is None:
            verdict = "not judged"
            if r[2] != "-":  # a cell with numbers but no verdict: the check is incomplete
                unjudged.append(str(r[0]))
        out.append([*r[:-1], verdict, r[-1]])
    return out, unjudged


def _timeit(fn, min_time: float, warmup: int, sync=None) -> dict:
    """edgecnn's timing helper: warm-up, >= 20 calls and >= min_time, the device synced inside each call."""
    from edgecnn.runtimes.timing import measure

    t = measure(fn, warmup=warmup, min_time=min_time, min_iters=20, max_iters=None, sync=sync)
    return {"iters": t.iterations, "p50_ms": t.p50_ms, "p99_ms": t.p99_ms, "mean_ms": t.mean_ms}


def require_failures(required: list[str], card: str | None, parity: list, bench: list[list]) -> list[str]:
    """Why each required runtime did not run (empty: all ran). A runtime ran when its parity row passed or
    failed (not skipped) and at least one of its timed rows has numbers."""
    out = []
    for req in required:
        rt = REQUIRE[req]
        if card is None:
            out.append(f"--require {req}: no GPU visible here, so {rt} did not run")
            continue
        prow = [r for r in parity if r.runtime == rt]
        ran_parity = any(r.status in ("pass", "FAIL") for r in prow)
        brow = [r for r in bench if str(r[0]).startswith(rt)]
        ran_bench = any(r[2] != "-" for r in brow)
        if not (ran_parity and ran_bench):
            why = next((r.note for r in prow if r.status == "skipped" and r.note), "") or \
                next((str(r[-1]) for r in brow if r[2] == "-"), "") or "no row"
            out.append(f"--require {req}: a GPU is visible ({card}) but {rt} did not run: {why[:200]}")
    return out


def _gpu_visible() -> str | None:
    """The first CUDA card's name as torch sees it, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _model(args, work: Path) -> tuple[Path, Path, Path]:
    from edgecnn.exporters.onnx import export

    pt = Path(args.model) if args.model else None
    if pt is None:
        from edgecnn.data import synthetic_dataset
        from edgecnn.train import TrainConfig, train_to_file

        pt = work / "model.pt"
        print("training a small model (2 epochs, 300 images per class) ...", flush=True)
        res = train_to_file(synthetic_dataset(per_class=300, seed=0), TrainConfig(epochs=2, progress=False, seed=0),
                            pt, log=lambda s: None)
        print(f"  validation accuracy {res.val_accuracy * 100:.2f}%", flush=True)
    fixed = export(pt, work / "model.onnx").path
    dyn = export(pt, work / "model_dynamic.onnx", dynamic_batch=True).path
    return pt, Path(fixed), Path(dyn)


def _parity(pt: Path, fixed: Path, dyn: Path, cuda: bool, work: Path) -> list:
    """ort-cpu fp32 as a sanity row, then one row per timed configuration (ORT_CELLS: each with its own
    precision and options, on the model file it is timed on) and PyTorch on the card in fp32 and fp16."""
    from edgecnn.checkpoint import load_checkpoint
    from edgecnn.verify import judge, make_inputs

    ckpt = load_checkpoint(pt)
    inputs = make_inputs(ckpt.mean, ckpt.std, ckpt.class_names)  # the judge's default inputs, shared
    rows = judge(dyn, ckpt, runtimes=["ort-cpu"], precision="fp32", inputs=inputs).rows
    for name, prec, opts, _label in ORT_CELLS:
        own = dict(opts)
        if name == "ort-trt":
            own.update(cache_dir=str(work / "trt-cache"), trt_options=dict(TRT_PROFILE))
        model = fixed if opts.get("cuda_graph") else dyn  # a CUDA graph is captured for one fixed shape
        for r in judge(model, ckpt, runtimes=[name], precision=prec, options=own, inputs=inputs).rows:
            r.options_text = _opts_text(opts)
            r.note = f"{r.options_text}{'; ' + r.note if r.note else ''}"
            rows.append(r)
    if cuda:
        rows += [_torch_cuda_row(ckpt, inputs, p) for p in sorted(set(TORCH_CELLS.values()))]
    return rows


def _torch_cuda_row(ckpt, inputs, precision: str = "fp32"):
    """PyTorch eager on the card (TORCH_DEVICE), fp32 with TF32 off or fp16 (weights and inputs halved),
    against PyTorch on the CPU in fp32, under the tolerance table's row for that precision."""
    import torch

    from edgecnn.verify import VerifyRow, compare, reference_logits, tolerance_for

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    refs = reference_logits(ckpt, inputs.batches)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    net = ckpt.build_model().to(TORCH_DEVICE, dtype).eval()
    with torch.inference_mode():
        outs = {k: net(torch.from_numpy(v).to(TORCH_DEVICE, dtype)).float().cpu().numpy()
                for k, v in inputs.batches.items()}
    full = compare(refs, outs, tolerance_for(precision), inputs.labels, inputs.class_names)
    row = VerifyRow("torch-cuda", precision, f"{TORCH_DEVICE}:0" if TORCH_DEVICE == "cuda" else TORCH_DEVICE,
                    "pass" if full.passed else "FAIL", full, "" if full.passed else full.reason)
    row.options_text = _opts_text({})
    return row


def _bench(pt: Path, fixed: Path, dyn: Path, args, work: Path) -> list[list]:
    import numpy as np
    import torch
    from edgecnn.runtimes import get_runtime_class, load_runtime

    from edgecnn.checkpoint import load_checkpoint

    rows: list[list] = []
    sync = torch.cuda.synchronize
    net = load_checkpoint(pt).build_model().cuda().eval()
    rng = np.random.default_rng(0)

    def add(what: str, batch: int, fn, note: str = "", s=None) -> None:
        try:
            r = _timeit(fn, args.min_time, args.warmup, s)
            rows.append([what, batch, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                         f"{batch / (r['mean_ms'] / 1e3):,.0f}", r["iters"], note])
        except Exception as e:  # noqa: BLE001 - one failing cell must not lose the run
            rows.append([what, batch, "-", "-", "-", 0, f"error: {str(e).strip().splitlines()[0][:120]}"])
        print(f"  {rows[-1]}", flush=True)

    def torch_cells(batch: int) -> None:
        x_host = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        x_dev = torch.from_numpy(x_host).cuda()
        with torch.inference_mode():
            add("torch eager fp32 (host in/out)", batch, lambda: net(torch.from_numpy(x_host).cuda()).cpu())
            add("torch eager fp32 (on device)", batch, lambda: net(x_dev), s=sync)
            half = net.half()
            xh = x_dev.half()
            add("torch eager fp16 (on device)", batch, lambda: half(xh), s=sync)
            net.float()

    def ort_cells(batch: int) -> None:
        x_host = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        model = fixed if batch == 1 else dyn  # TensorRT always gets the dynamic model and one profile (cached)
        for name, prec, opts, label in ORT_CELLS:
            if opts.get("cuda_graph") and batch != 1:
                continue
            ok, why = get_runtime_class(name).available()
            if not ok:
                rows.append([label, batch, "-", "-", "-", 0, f"skipped: {why}"])
                continue
            if name == "ort-trt":
                opts = {**opts, "cache_dir": str(work / "trt-cache"), "trt_options": dict(TRT_PROFILE)}
            try:
                rt = load_runtime(name, dyn if name == "ort-trt" else model, precision=prec, **opts)
            except Exception as e:  # noqa: BLE001
                rows.append([label, batch, "-", "-", "-", 0, f"error: {str(e).strip().splitlines()[0][:120]}"])
                continue
            with rt:
                if opts.get("io_binding") and opts.get("cuda_graph"):
                    xv = rt.graph_input()  # the captured input buffer: replays need no copy
                    xv.update_inplace(x_host)
                    add(label, batch, lambda rt=rt, xv=xv: rt.run_device(xv), note=rt.device)
                elif opts.get("io_binding"):
                    import onnxruntime as ort

                    xv = ort.OrtValue.ortvalue_from_numpy(x_host, "cuda", 0)
                    add(label, batch, lambda rt=rt, xv=xv: rt.run_device(xv), note=rt.device)
                else:
                    add(label, batch, lambda rt=rt: rt.run(x_host), note=rt.device)

    print("batch-1 latency ...", flush=True)
    torch_cells(1)
    ort_cells(1)
    for b in args.batches:
        print(f"throughput at batch {b} ...", flush=True)
        torch_cells(b)
        ort_cells(b)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an edgecnn checkpoint (.pt); default: train a small one")
    ap.add_argument("--out-dir", default=None, help="where to put raw JSON (e.g. $OUT on the device)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timed cell")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[256, 1024])
    ap.add_argument("--require", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=[],
                    help="cuda, trt or cuda,trt: exit 3 unless that runtime ran (parity and timing)")
    args = ap.parse_args(argv)
    bad = [r for r in args.require if r not in REQUIRE]
    if bad:
        ap.error(f"--require takes {', '.join(REQUIRE)}, not {', '.join(bad)}")
    # fp32 means fp32 on every provider: TensorRT reads this once per process (ORT issue 26029).
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

    try:
        import PIL  # noqa: F401
    except ImportError:
        print("gpu_check: Pillow is missing on this machine: carry a Pillow wheel and pip install --target it")
        return 3
    _bootstrap()
    import onnxruntime as ort
    import torch

    from edgecnn.report import table, verify_table

    card = _gpu_visible()
    cuda = card is not None
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} from {Path(ort.__file__).parent}, "
          f"providers {', '.join(ort.get_available_providers())}")
    if not cuda:
        print("no CUDA: torch sees no GPU here; running the parity matrix on what is usable, no benchmark, "
              "nothing written")
    else:
        print(f"card: {card}")
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        pt, fixed, dyn = _model(args, work)
        rows = _parity(pt, fixed, dyn, cuda, work)
        matrix = verify_table(rows)
        print("\nparity against PyTorch (CPU, fp32), one row per timed configuration:\n" + matrix, flush=True)
        bench = _bench(pt, fixed, dyn, args, work) if cuda else []
    heads = ["what", "batch", "p50 ms", "p99 ms", "img/s", "iters", "parity", "note"]
    bench, unjudged = judged_bench(bench, rows)
    if bench:
        print("\nlatency and throughput (parity: the verdict of the row above that judged the same "
              "configuration):\n" + table(heads, bench))
    rc = 1 if any(r.status == "FAIL" for r in rows) else 0
    for label in unjudged:
        print(f"gpu_check: {label!r} was timed but not judged: no parity row for its runtime, precision "
              f"and options")
    rc = rc or (1 if unjudged else 0)
    missing = require_failures(args.require, card, rows, bench)
    for m in missing:
        print(f"gpu_check: {m}")
    if missing:
        rc = rc or 3
    if not cuda:
        return rc
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    from edgecnn._io import write_text_atomic

    md = (f"# GPU check on {card}\n\n`PYTHONPATH=/tmp/ortgpu:$PWD python3 benchmarks/gpu_check.py` "
          f"(torch {torch.__version__}, onnxruntime-gpu {ort.__version__}).\n\n"
          f"## Parity against PyTorch (CPU, fp32), one row per timed configuration\n\n```\n{matrix}\n```\n\n"
          f"## Latency (batch 1) and throughput\n\n```\n{table(heads, bench)}\n```\n")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / f"gpu_{slug}.md", md)
    print(f"wrote {results / f'gpu_{slug}.md'}")
    if args.out_dir:
        write_text_atomic(Path(args.out_dir) / f"gpu_{slug}.json", json.dumps(
            {"card": card, "parity": [{**r.as_dict(), "options": row_key(r)[2]} for r in rows], "bench": [dict(zip(heads, r, strict=True)) for r in bench]},
            indent=2, default=str))
        write_text_atomic(Path(args.out_dir) / f"gpu_{slug}.md", md)
    return rc


if __name__ == "__main__":
    sys.exit(main())
