"""Bulk prediction speed and memory: the streaming pipeline against a naive per-file loop, in one run.

    pip install scikit-learn   # its sample photos (matplotlib's grace_hopper.jpg is used too)
    python benchmarks/bulk_predict.py [--photos 1000] [--rounds 2] [--rss-files 10000,100000] [--no-ray]

Writes benchmarks/results/bulk_predict.md and .json. Every speed is images/s over the same folder of real
640x480 photos (JPEG at qualities 60-95, every 10th a PNG; made by benchmarks/photos.py in a temp folder),
the best of --rounds interleaved rounds (the machine is shared: the best round is the least disturbed),
and every ratio is against the naive loop measured in the same run:
- naive loop: what a user writes: per file Pillow open -> RGB -> resize -> normalize -> ONNX Runtime batch 1;
- exact / fast: `edgecnn predict DIR -o out.csv` (edgecnn.bulk.run, in this process), default options,
  without / with --fast-decode; variants: decode processes instead of threads, the runtime on 2 threads;
- decode ceiling: all cores doing nothing but the same decode + resize (decode_many on a thread pool);
- runtime: Classifier.probabilities_from_pixels on ready uint8 batches (the network alone);
- Ray local: `--engine ray` on a local instance started once for it (its start-up time reported apart),
  interleaved in the rounds like the others.
Peak RSS: `edgecnn predict` in a child process (its VmHWM) over 10,000 and 100,000 files that are hard
links to 2,000 small JPEGs (so 100,000 files take minutes, not half an hour; memory does not depend on
the image size beyond one batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def train_model(folder: Path) -> Path:
    """The seed Net trained briefly on the built-in set, exported with a symbolic batch axis."""
    from edgecnn.exporters.onnx import export

    from edgecnn.data import synthetic_dataset
    from edgecnn.train import TrainConfig, train_to_file

    ds = synthetic_dataset(per_class=300, seed=0)
    train_to_file(ds, TrainConfig(epochs=3, progress=False, seed=0), folder / "model.pt", log=lambda s: None)
    return export(folder / "model.pt", folder / "model.onnx", dynamic_batch=True).path


def naive_loop(model: Path, paths: list[str]) -> list[int]:
    import onnxruntime as ort
    from PIL import Image

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    mean, std = np.float32(0.5), np.float32(0.25)
    top = []
    for p in paths:
        try:
            im = Image.open(p).convert("RGB").resize((64, 64), Image.BILINEAR)
        except OSError:
            top.append(-1)
            continue
        x = ((np.asarray(im, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None]
        logits = sess.run(None, {name: np.ascontiguousarray(x)})[0]
        top.append(int(logits.argmax()))
    return top


def run_bulk(model: Path, folder: Path, out: Path, **kw) -> list[dict]:
    from edgecnn.runtimes.tables import iter_table

    from edgecnn import bulk

    opts = bulk.BulkOptions(force=True, progress=False, **kw)
    bulk.run(model, [str(folder)], str(out), opts)
    return list(iter_table(str(out)))


def decode_ceiling(paths: list[str], fast: bool, workers: int) -> None:
    from edgecnn.runtimes.pipeline import decode_many

    chunks = [paths[i:i + 64] for i in range(0, len(paths), 64)]
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda c: decode_many(c, 64, fast), chunks))


def runtime_rate(model: Path, threads: int, batch: int, n: int) -> float:
    from edgecnn.runtimes import Classifier

    from edgecnn.data import synthetic_dataset

    ds = synthetic_dataset(per_class=max(1, batch // 6 + 1), seed=3)
    rgb = np.ascontiguousarray(ds.images[:batch])
    with Classifier(model, threads=threads) as clf:
        clf.probabilities_from_pixels(rgb)
        reps = max(1, n // batch)
        t = time.perf_counter()
        for _ in range(reps):
            clf.probabilities_from_pixels(rgb)
        return reps * batch / (time.perf_counter() - t)


def draft_variants(model: Path, paths: list[str], rounds: int = 2) -> list[dict]:
    """A survey of the JPEG decoders that scale in the DCT, on the same JPEGs: decode-only speed (1 thread, the
    best of ``rounds`` interleaved rounds) and top-1 agreement with the exact path, each followed by the same
    Pillow bilinear resize to 64x64. A decoder that cannot run here is a row that says why (``not_measured``),
    never a number."""
    from edgecnn.runtimes import Classifier
    from edgecnn.runtimes.preprocess import to_rgb_uint8
    from PIL import Image

    size = 64

    def resized(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))

    def draft(req: int):
        def f(p: str) -> np.ndarray:
            with Image.open(p) as im:
                im.draft("RGB", (req, req))
                return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        return f

    rows: list[tuple[str, object]] = [
        ("exact (Pillow full decode)", lambda p: to_rgb_uint8(p, size)),
        ("--fast-decode as shipped (runtimes/preprocess.py)", lambda p: to_rgb_uint8(p, size, fast_jpeg=True)),
        ("Pillow draft to 2x input (1/2 scale for 640x480)", draft(2 * size)),
        ("Pillow draft to 1x input (1/4 scale)", draft(size)),
    ]
    try:
        import simplejpeg

        def sj(rule: str, fastdct: bool, fastup: bool):
            def f(p: str) -> np.ndarray:
                with open(p, "rb") as fh:
                    data = fh.read()
                if rule == "half":  # exactly 1/2 scale, as Pillow's draft to 2x picks for 640x480
                    h, w = simplejpeg.decode_jpeg_header(data)[:2]
                    mw, mh = (w + 1) // 2, (h + 1) // 2
                else:  # the smallest libjpeg-turbo scale (n/8) that keeps both sides >= rule x input
                    mw = mh = int(rule) * size
                return resized(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fastdct, fastupsample=fastup,
                                                      min_width=mw, min_height=mh))
            return f

        for rule, what in (("2", "min 2x input (3/8 scale for 640x480)"), ("half", "1/2 scale"),
                           ("1", "min 1x input (1/4 scale)")):
            for fastdct, fastup in ((False, False), (True, True), (True, False), (False, True)):
                flags = (f"fastdct {'on' if fastdct else 'off'}, fastupsample {'on' if fastup else 'off'}")
                rows.append((f"simplejpeg {simplejpeg.__version__}, {what}, {flags}", sj(rule, fastdct, fastup)))
    except ImportError:
        rows.append(("simplejpeg", "not measured: simplejpeg is not installed (pip install simplejpeg)"))
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        tj = TurboJPEG()

        def tjf(factor: tuple[int, int]):
            def f(p: str) -> np.ndarray:
                with open(p, "rb") as fh:
                    return resized(tj.decode(fh.read(), pixel_format=TJPF_RGB, scaling_factor=factor))
            return f

        rows += [("PyTurboJPEG, scaling_factor 1/2", tjf((1, 2))), ("PyTurboJPEG, scaling_factor 1/4", tjf((1, 4)))]
    except ImportError:
        rows.append(("PyTurboJPEG", "not measured: PyTurboJPEG is not installed (pip install PyTurboJPEG)"))
    except Exception as e:  # the package is there, the C library it loads is not
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        rows.append(("PyTurboJPEG", f"not measurable here: libturbojpeg not installed (PyTurboJPEG: {first})"))
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            simd = distribution("Pillow-SIMD").version
        except PackageNotFoundError:
            simd = None
    except ImportError:
        simd = None
    if simd:
        rows.append((f"pillow-simd {simd}", "is the Pillow of this run: every row above resizes with it"))
    else:
        rows.append(("pillow-simd (SIMD resize)", "not measured: sdist only, and it replaces Pillow (run this "
                                                  "benchmark in a virtual environment that has it instead)"))

    jpeg = [p for p in paths if p.endswith(".jpg")]
    best: dict[str, float] = {}
    prob: dict[str, np.ndarray] = {}
    out = []
    with Classifier(model, threads=1) as clf:
        for _ in range(max(1, rounds)):
            for name, fn in rows:
                if not isinstance(fn, str):
                    secs, x = timed(lambda fn=fn: np.stack([fn(p) for p in jpeg]))
                    best[name] = min(best.get(name, secs), secs)
                    prob.setdefault(name, clf.probabilities_from_pixels(x))  # untimed; the same pixels each round
        ref = None
        for name, fn in rows:
            if isinstance(fn, str):
                out.append({"decode": name, "not_measured": fn, "jpegs": len(jpeg)})
                continue
            secs, probs = best[name], prob[name]
            ref = probs if ref is None else ref
            top = np.sort(ref, 1)
            dis = probs.argmax(1) != ref.argmax(1)
            out.append({"decode": name, "img_s_1_thread": round(len(jpeg) / secs, 1),
                        "top1_agreement_pct": round(100 * (1 - dis.mean()), 2), "jpegs": len(jpeg),
                        "max_margin_of_disagreements": round(float((top[:, -1] - top[:, -2])[dis].max()), 4)
                        if dis.any() else None})
    return out


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


RSS_SNIPPET = r"""
import atexit, sys
def peak():
    with open("/proc/self/status") as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    sys.stderr.write(f"VMHWM_KB {kb}\n")
atexit.register(peak)
from edgecnn.cli import main
sys.argv = ["edgecnn", "predict", *sys.argv[1:]]
main()
"""


def peak_rss(model: Path, folder: Path, out: Path) -> tuple[float, float]:
    """(MiB, seconds) of `edgecnn predict folder -o out.csv` in a child process."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RSS_SNIPPET, str(model), str(folder), "-o", str(out), "--force",
                        "--no-progress"], capture_output=True, text=True)
    secs = time.perf_counter() - t
    kb = [int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("VMHWM_KB")]
    if r.returncode != 0 or not kb:
        raise SystemExit(f"RSS run failed: {r.stderr[-2000:]}")
    return kb[0] / 1024, secs


def link_farm(folder: Path, n: int, sources: list[Path]) -> None:
    folder.mkdir()
    for i in range(n):
        os.link(sources[i % len(sources)], folder / f"f_{i:06d}.jpg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rss-files", default="10000,100000")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from edgecnn.runtimes.pipeline import default_workers
    from photos import make_photos

    from edgecnn.machine import describe

    cores = default_workers()
    load0 = os.getloadavg()
    res: dict = {"machine": describe(), "python": platform.python_version(), "cores": cores, "photos": args.photos,
                 "load_before": [round(v, 2) for v in load0], "rates": {}}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        t0 = time.perf_counter()
        model = train_model(td)
        photos = td / "photos"
        paths = sorted(str(p) for p in make_photos(photos, args.photos))
        print(f"model and {len(paths)} photos ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out = td / "out.csv"
        res["default_split"] = default_splits = []  # what the default chose, each round (BulkSummary.split)

        def exact_default() -> list[dict]:
            from edgecnn.runtimes.tables import iter_table

            from edgecnn import bulk

            s = bulk.run(model, [str(photos)], str(out), bulk.BulkOptions(force=True, progress=False))
            default_splits.append(s.split)
            return list(iter_table(str(out)))

        def plural(n: int, what: str) -> str:
            return f"{n} {what}{'s' if n != 1 else ''}"

        configs = {
            "naive loop (per file, ORT batch 1)": lambda: naive_loop(model, paths),
            "exact pipeline (default)": exact_default,
            "fast decode pipeline (--fast-decode)": lambda: run_bulk(model, photos, out, fast_jpeg=True),
            "exact, decode in processes": lambda: run_bulk(model, photos, out, executor="process"),
        }
        for w in sorted({1, cores}):  # the fixed splits the default is judged against
            for t in sorted({1, cores}):
                configs[f"exact, fixed split: {plural(w, 'decode worker')}, runtime {plural(t, 'thread')}"] = (
                    lambda w=w, t=t: run_bulk(model, photos, out, workers=w, options={"threads": t}))
        configs |= {
            f"decode ceiling, exact ({cores} threads)": lambda: decode_ceiling(paths, False, cores),
            f"decode ceiling, fast ({cores} threads)": lambda: decode_ceiling(paths, True, cores),
            "decode, exact (1 thread)": lambda: decode_ceiling(paths, False, 1),
        }
        if not args.no_ray:  # a local instance started once; its start-up time is reported apart
            import ray

            from edgecnn import bulk, ray_engine

            t = time.perf_counter()
            ray_engine.start_local(cores)  # as the engine starts it (workers at the user's priority)
            res["ray_init_s"] = time.perf_counter() - t
            ray_opts = bulk.BulkOptions(engine="ray", force=True, progress=False)
            # Ray starts its worker processes (imports, then the model) at the first tasks: start-up too, so
            # one untimed run on a few files before the rounds, else only the later rounds time the engine.
            t = time.perf_counter()
            bulk.run(model, paths[:8 * cores], str(td / "ray_warmup.csv"), ray_opts)
            res["ray_warmup_s"] = time.perf_counter() - t
            configs["Ray local (worker tasks, excl. start-up)"] = lambda: bulk.run(model, [str(photos)], str(out),
                                                                                 ray_opts)
        best: dict[str, float] = {}
        outputs: dict[str, object] = {}
        for rnd in range(args.rounds):
            for name, fn in configs.items():
                secs, o = timed(fn)
                best[name] = max(best.get(name, 0.0), len(paths) / secs)
                outputs[name] = o
                print(f"round {rnd + 1}: {name}: {len(paths) / secs:,.0f} img/s", file=sys.stderr)
        for threads in (1, 2):
            for batch in (1, 16, 64, 256):
                best[f"runtime alone, batch {batch}, {threads} thread(s)"] = runtime_rate(model, threads, batch, 4096)
        # agreement of fast decode with the exact path, and of the pipeline with the naive loop's labels
        exact = {r["path"]: r for r in outputs["exact pipeline (default)"]}
        fast = {r["path"]: r for r in outputs["fast decode pipeline (--fast-decode)"]}
        jpeg = [p for p in paths if p.endswith(".jpg")]
        agree = sum(exact[p]["label_1"] == fast[p]["label_1"] for p in jpeg)
        res["fast_top1_agreement"] = {"jpeg_files": len(jpeg), "agree": agree, "pct": 100 * agree / len(jpeg)}
        diffs = [abs(float(exact[p]["prob_1"]) - float(fast[p]["prob_1"])) for p in jpeg]
        res["fast_prob1_abs_diff"] = {"median": float(np.median(diffs)), "max": float(np.max(diffs))}
        res["draft"] = draft_variants(model, paths)
        if not args.no_ray:
            ray.shutdown()
            res["ray"] = {"rate": best["Ray local (worker tasks, excl. start-up)"], "init_s": res["ray_init_s"],
                          "warmup_s": res["ray_warmup_s"]}
        res["rates"] = {k: round(v, 1) for k, v in best.items()}
        # peak RSS over many files: links to small JPEGs
        small = td / "small"
        srcs = [Path(p) for p in make_photos(small, 2000, seed=5, png_every=0)]
        from PIL import Image

        for p in srcs:
            Image.open(p).resize((160, 120)).save(p, quality=85)
        res["rss"] = []
        for n in [int(v) for v in args.rss_files.split(",") if v]:
            farm = td / f"farm{n}"
            link_farm(farm, n, srcs)
            mib, secs = peak_rss(model, farm, td / f"rss{n}.csv")
            res["rss"].append({"files": n, "peak_rss_mib": round(mib, 1), "seconds": round(secs, 1)})
            print(f"RSS {n} files: {mib:.1f} MiB in {secs:.0f} s", file=sys.stderr)
            subprocess.run(["rm", "-rf", str(farm)], check=True)
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    write(res, Path(args.out), " ".join(["python", "benchmarks/bulk_predict.py", *sys.argv[1:]]))


def write(res: dict, out: Path, command: str) -> None:
    r = res["rates"]
    naive = r["naive loop (per file, ORT batch 1)"]
    cores = res["cores"]
    lines = [
        "# Bulk prediction: streaming pipeline vs a naive per-file loop",
        "",
        f"Machine: {res['machine']}, Python {res['python']}; load average before/after: "
        f"{res['load_before'][0]} / {res['load_after'][0]} (the 2 cores are shared with other work).",
        f"Command: `{command}`. {res['photos']} real 640x480 photos (JPEG q60-95, every 10th a PNG); "
        "images/s = best of the interleaved rounds; ratios against the naive loop of the same run.",
        "",
        "| configuration | images/s | × naive |",
        "|---|---:|---:|",
    ]
    for name, v in r.items():
        lines.append(f"| {name} | {v:,.0f} | {v / naive:.2f}× |")
    exact, fast = r["exact pipeline (default)"], r["fast decode pipeline (--fast-decode)"]
    run1 = r["runtime alone, batch 64, 1 thread(s)"]
    ceil_e, ceil_f = r[f"decode ceiling, exact ({cores} threads)"], r[f"decode ceiling, fast ({cores} threads)"]
    ag = res["fast_top1_agreement"]
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| exact ≥ 1.7× naive | {exact / naive:.2f}× | {'yes' if exact / naive >= 1.7 else 'no'} |",
        f"| fast ≥ 4× naive | {fast / naive:.2f}× | {'yes' if fast / naive >= 4 else 'no'} |",
        f"| fast top-1 agreement with exact ≥ 99% | {ag['pct']:.1f}% ({ag['agree']}/{ag['jpeg_files']} JPEGs) | "
        f"{'yes' if ag['pct'] >= 99 else 'no'} |",
        f"| exact pipeline ≥ 80% of min(decode ceiling {ceil_e:,.0f}, runtime {run1:,.0f}) | "
        f"{100 * exact / min(ceil_e, run1):.0f}% | {'yes' if exact >= 0.8 * min(ceil_e, run1) else 'no'} |",
        f"| fast pipeline ≥ 80% of min(decode ceiling {ceil_f:,.0f}, runtime {run1:,.0f}) | "
        f"{100 * fast / min(ceil_f, run1):.0f}% | {'yes' if fast >= 0.8 * min(ceil_f, run1) else 'no'} |",
    ]
    # What any pipeline on these cores can reach: each image costs its decode's CPU time (the ceiling's
    # cores / rate) plus the model's (the cheapest per image of the runtime-alone rows), all on `cores` cores.
    model_cpu = min(t / r[f"runtime alone, batch 64, {t} thread(s)"] for t in (1, 2)
                    if f"runtime alone, batch 64, {t} thread(s)" in r)
    bounds = {}
    for kind, ceil, got in (("exact", ceil_e, exact), ("fast", ceil_f, fast)):
        bound = cores / (cores / ceil + model_cpu)
        bounds[kind] = bound
        res.setdefault("shared_core_bound", {})[kind] = {"img_s": round(bound, 1), "pct_of_ceiling_target":
                                                         round(100 * bound / min(ceil, run1), 1),
                                                         "pipeline_pct_of_bound": round(100 * got / bound, 1)}
    fixed = {k: v for k, v in r.items() if k.startswith("exact, fixed split: ")}
    if fixed:
        best_name = max(fixed, key=fixed.get)
        chose = sorted({(s["workers"], s["threads"]) for s in res.get("default_split") or [] if s})
        chose_txt = ", ".join(f"{w} decode worker(s) / {t} runtime thread(s)" for w, t in chose) or "?"
        lines.append(f"| default within 10% of the best fixed split ({best_name.split(': ', 1)[1]}, "
                     f"{fixed[best_name]:,.0f}; the default chose {chose_txt}) | {100 * exact / fixed[best_name]:.0f}% | "
                     f"{'yes' if exact >= 0.9 * fixed[best_name] else 'no'} |")
    if "ray" in res:  # the same CPUs for both engines, so per CPU the ratio is the same
        q = res["ray"]["rate"] / exact
        lines.append(f"| Ray local ≥ 0.9× the local engine per CPU ({cores} CPUs each; start-up apart: "
                     f"{res['ray']['init_s']:.1f} s + first tasks {res['ray'].get('warmup_s', 0):.1f} s) | {q:.2f}× | "
                     f"{'yes' if q >= 0.9 else 'no'} |")
    lines += [
        "",
        f"An estimate of what any pipeline can reach on these {cores} cores, from the rows above: every image "
        f"costs its decode's CPU time ({cores} / the decode ceiling) plus the model's ({model_cpu * 1e3:.2f} ms, the "
        "cheaper of the runtime-alone batch-64 rows per image), so a pipeline that decodes and runs the model on "
        f"the same cores reaches at most about {cores} / (that sum) images/s. The rows come from phases minutes "
        "apart on a shared box whose speed drifts by 10-20%, so this is an estimate, not a hard bound (a "
        "pipeline above 100% of it shows the drift):",
        "",
        "| pipeline | estimated reach on these cores | as % of min(decode ceiling, runtime) | × naive | "
        "pipeline as % of it |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, got, ceil in (("exact", exact, ceil_e), ("fast", fast, ceil_f)):
        b = bounds[kind]
        lines.append(f"| {kind} | {b:,.0f} | {100 * b / min(ceil, run1):.0f}% | {b / naive:.2f}× | "
                     f"{100 * got / b:.0f}% |")
    lines.append(f"\nThe fast decode alone, on both cores and with no model, runs at {ceil_f / naive:.2f}× the naive loop.")
    d = res["fast_prob1_abs_diff"]
    lines.append(f"\nFast decode vs exact, top-1 probability: median |diff| {d['median']:.4f}, max {d['max']:.4f}.")
    if res.get("draft"):
        lines += ["", "| JPEG decode (+ the same resize) | images/s, 1 thread, decode only | top-1 agreement with exact | "
                  "largest top-2 margin among disagreements |", "|---|---:|---:|---:|"]
        lines += [f"| {x['decode']} | {x['not_measured']} | - | - |" if "not_measured" in x else
                  f"| {x['decode']} | {x['img_s_1_thread']:,.0f} | {x['top1_agreement_pct']:.2f}% of {x['jpegs']} | "
                  f"{x['max_margin_of_disagreements'] if x['max_margin_of_disagreements'] is not None else '-'} |"
                  for x in res["draft"]]
    if "ray" in res:
        ray = res["ray"]
        lines.append(f"\nRay local: {ray['rate']:,.0f} img/s through `--engine ray` on an already started local "
                     f"instance ({cores} CPUs; its task workers keep the model loaded; `ray.init` itself took {ray['init_s']:.1f} s, and a first untimed run on {8 * cores} files, which starts the "
                     f"worker processes, {ray.get('warmup_s', 0):.1f} s), "
                     f"{ray['rate'] / exact:.2f}× the local engine.")
    if res.get("rss"):
        lines += ["", "| files (hard links to 2,000 small JPEGs) | peak RSS (VmHWM, child process) | seconds |",
                  "|---:|---:|---:|"]
        lines += [f"| {x['files']:,} | {x['peak_rss_mib']:.1f} MiB | {x['seconds']:.0f} |" for x in res["rss"]]
        if len(res["rss"]) >= 2:
            g = res["rss"][-1]["peak_rss_mib"] - res["rss"][0]["peak_rss_mib"]
            lines.append(f"\nGrowth from {res['rss'][0]['files']:,} to {res['rss'][-1]['files']:,} files: "
                         f"{g:+.1f} MiB (target: within 50 MB).")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bulk_predict.md").write_text("\n".join(lines) + "\n")
    (out / "bulk_predict.json").write_text(json.dumps(res, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
