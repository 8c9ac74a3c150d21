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
FAIL. fp32 rows run with NVIDIA_TF32_OVERRIDE=0 (set here before anything touches CUDA).
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


def _parity(pt: Path, dyn: Path, cuda: bool, work: Path) -> list:
    from edgecnn.checkpoint import load_checkpoint
    from edgecnn.verify import judge, make_inputs

    ckpt = load_checkpoint(pt)
    inputs = make_inputs(ckpt.mean, ckpt.std, ckpt.class_names)  # the judge's default inputs, shared
    trt = {"cache_dir": str(work / "trt-cache"),
           "trt_options": {"trt_profile_min_shapes": "input:1x3x64x64",
                           "trt_profile_opt_shapes": "input:256x3x64x64",
                           "trt_profile_max_shapes": "input:1024x3x64x64"}}
    rows = judge(dyn, ckpt, runtimes=["ort-cpu"], precision="fp32", inputs=inputs).rows
    rows += judge(dyn, ckpt, runtimes=["ort-cuda"], inputs=inputs).rows
    rows += judge(dyn, ckpt, runtimes=["ort-trt"], inputs=inputs, options=trt).rows
    if cuda:
        rows.append(_torch_cuda_row(ckpt, inputs))
    return rows


def _torch_cuda_row(ckpt, inputs):
    """PyTorch eager on the card, fp32 with TF32 off, against PyTorch on the CPU."""
    import torch

    from edgecnn.verify import TOLERANCES, VerifyRow, compare, reference_logits

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    refs = reference_logits(ckpt, inputs.batches)
    net = ckpt.build_model().cuda()
    with torch.inference_mode():
        outs = {k: net(torch.from_numpy(v).cuda()).cpu().numpy() for k, v in inputs.batches.items()}
    full = compare(refs, outs, TOLERANCES["fp32"], inputs.labels, inputs.class_names)
    return VerifyRow("torch-cuda", "fp32", "cuda:0", "pass" if full.passed else "FAIL", full,
                     "" if full.passed else full.reason)


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
        for name, prec, opts, label in [
            ("ort-cuda", "fp32", {}, "ort-cuda fp32 (host in/out)"),
            ("ort-cuda", "fp32", {"io_binding": True}, "ort-cuda fp32 io-binding (on device)"),
            ("ort-cuda", "fp32", {"cuda_graph": True}, "ort-cuda fp32 CUDA graph (host in/out)"),
            ("ort-cuda", "fp32", {"cuda_graph": True, "io_binding": True}, "ort-cuda fp32 CUDA graph (on device)"),
            ("ort-cuda", "fp16", {"io_binding": True}, "ort-cuda fp16 io-binding (on device)"),
            ("ort-trt", "fp32", {"io_binding": True}, "ort-trt fp32 io-binding (on device)"),
            ("ort-trt", "fp16", {"io_binding": True}, "ort-trt fp16 io-binding (on device)"),
        ]:
            if opts.get("cuda_graph") and batch != 1:
                continue
            ok, why = get_runtime_class(name).available()
            if not ok:
                rows.append([label, batch, "-", "-", "-", 0, f"skipped: {why}"])
                continue
            if name == "ort-trt":
                opts = {**opts, "cache_dir": str(work / "trt-cache"), "trt_options": {
                    "trt_profile_min_shapes": "input:1x3x64x64", "trt_profile_opt_shapes": "input:256x3x64x64",
                    "trt_profile_max_shapes": "input:1024x3x64x64"}}
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
        rows = _parity(pt, dyn, cuda, work)
        matrix = verify_table(rows)
        print("\nparity against PyTorch (CPU, fp32):\n" + matrix, flush=True)
        bench = _bench(pt, fixed, dyn, args, work) if cuda else []
    heads = ["what", "batch", "p50 ms", "p99 ms", "img/s", "iters", "note"]
    if bench:
        print("\nlatency and throughput:\n" + table(heads, bench))
    rc = 1 if any(r.status == "FAIL" for r in rows) else 0
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
          f"## Parity against PyTorch (CPU, fp32)\n\n```\n{matrix}\n```\n\n"
          f"## Latency (batch 1) and throughput\n\n```\n{table(heads, bench)}\n```\n")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / f"gpu_{slug}.md", md)
    print(f"wrote {results / f'gpu_{slug}.md'}")
    if args.out_dir:
        write_text_atomic(Path(args.out_dir) / f"gpu_{slug}.json", json.dumps(
            {"card": card, "parity": [r.as_dict() for r in rows], "bench": [dict(zip(heads, r, strict=True)) for r in bench]},
            indent=2, default=str))
        write_text_atomic(Path(args.out_dir) / f"gpu_{slug}.md", md)
    return rc


if __name__ == "__main__":
    sys.exit(main())
