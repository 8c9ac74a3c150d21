"""edgecnn bench sweeps: runtime x precision x threads x batch, each configuration in a fresh process
(honest cold start and peak memory), with the machine and a roofline line."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EdgeCNNError, InvalidInputError, RuntimeUnavailableError


@dataclass
class Config:
    runtime: str
    precision: str
    threads: int | None
    model: Path | None = None  # file this configuration runs
    skipped: str = ""  # why it was not run


@dataclass
class SweepResult:
    machine: str
    flops_per_image: float
    peak_gflops: float | None
    peak_threads: int | None
    peak_source: str = ""
    peaks: dict = field(default_factory=dict)  # threads -> measured GFLOP/s (rows use their own)
    rows: list[dict] = field(default_factory=list)  # BenchRow dicts + threads, peak_rss_mb, file_bytes, ...
    skipped: list[dict] = field(default_factory=list)  # not usable here (never run), with the reason
    failed: list[dict] = field(default_factory=list)  # ran and failed: runtime, precision, threads, batch, error

    @property
    def floor_img_s(self) -> float | None:
        return self.peak_gflops * 1e9 / self.flops_per_image if self.peak_gflops else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["floor_img_s"] = self.floor_img_s
        return d


def _variant(model: Path, runtime: str, precision: str, tmp: Path, log) -> Path:
    """The file a (runtime, precision) cell runs: the fp32 model, or its int8 sibling (quantized if absent)."""
    from .bench import model_for_runtime

    if precision != "int8":
        return model_for_runtime(runtime, model)
    if runtime not in ("ort-cpu", "openvino"):
        raise InvalidInputError(f"int8 runs on ort-cpu and openvino, not {runtime}")
    from edgecnn.exporters.quantize import default_output, quantize
    from edgecnn.runtimes.artifact import describe

    if describe(model).precision == "int8":
        return model
    backend = "openvino" if runtime == "openvino" else "ort"
    sib = default_output(model, "int8", backend)
    if sib.is_file():
        return sib
    log(f"quantizing {model.name} to int8 for {runtime} (built-in calibration, accuracy gate on)")
    return quantize(model, tmp / sib.name, backend=backend, calib="builtin").path


def plan(model: Path, runtimes: list[str], precisions: list[str], threads: list[int | None], tmp: Path,
         log) -> list[Config]:
    from edgecnn.runtimes import get_runtime_class

    out = []
    usable = {rt: get_runtime_class(rt).available() for rt in runtimes}  # once per runtime: a GPU probe reads files
    for rt, prec in itertools.product(runtimes, precisions):
        cls = get_runtime_class(rt)
        ok, why = usable[rt]
        if ok and prec != "int8" and prec not in cls.precisions:
            ok, why = False, f"{rt} has no {prec} mode (it has {', '.join(cls.precisions)})"
        path = None
        if ok:
            try:
                path = _variant(model, rt, prec, tmp, log)
            except EdgeCNNError as e:
                ok, why = False, str(e)
        for t in threads:
            out.append(Config(rt, prec, t, path, "" if ok else why))
    return out


def run_config(cfg: Config, batches: list[int], min_time: float, warmup: int, timeout: float = 900,
               options: dict | None = None) -> list[dict]:
    """Time one configuration in a child process; returns its rows (with peak RSS and file size) and, marked
    ``failed``, the batches it could not run. Raises if the child itself fails (crash, timeout)."""
    job = {"model": str(cfg.model), "runtime": cfg.runtime, "precision": cfg.precision, "threads": cfg.threads,
           "batches": batches, "min_time": min_time, "warmup": warmup, "options": options or {}}
    try:
        proc = subprocess.run([sys.executable, "-m", "edgecnn.bench", json.dumps(job, default=str)],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InvalidInputError(f"{cfg.runtime} {cfg.precision}: the benchmark process ran over {timeout:g} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise InvalidInputError(f"{cfg.runtime} {cfg.precision}: the benchmark process failed: {last[:200]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(model: str | os.PathLike | None, runtimes: list[str], precisions: list[str], batches: list[int],
          threads: list[int | None], *, min_time: float = 1.0, warmup: int = 5, roofline: bool = True,
          log=None, progress=None, options: dict | None = None) -> SweepResult:
    """``options``: {runtime: {key: value}}, each runtime's own (edgecnn.runtimes.options.route). A
    configuration that fails is recorded in ``failed`` with its error; the others are still measured."""
    from edgecnn.runtimes.cpu import usable_cpus

    from .bench import default_model
    from .machine import describe, measure_peak, net_flops

    log = log or (lambda s: None)
    if not batches or min(batches) < 1:
        raise InvalidInputError("batch sizes must be >= 1")
    fail_fast(runtimes)
    with tempfile.TemporaryDirectory(prefix="edgecnn-sweep-") as td:
        tmp = Path(td)
        if model is None:
            onnx_path, _ = default_model(tmp)
            model = onnx_path
        model = Path(model)
        if not model.is_file():
            raise InvalidInputError(f"{model}: no such model file")
        num_classes = _num_classes(model)
        configs = plan(model, runtimes, precisions, threads, tmp, log)
        if configs and all(c.skipped for c in configs):  # refuse before measuring the roofline
            raise RuntimeUnavailableError("no configuration can run here: " + "; ".join(
                dict.fromkeys(f"{c.runtime} {c.precision}: {c.skipped}" for c in configs)))
        max_threads = max((t for t in threads if t), default=None)
        res = SweepResult(describe(), net_flops(num_classes), None, max_threads)
        if roofline:
            top = max_threads or usable_cpus()
            for t in sorted({t or usable_cpus() for t in threads} | {top}):
                gflops, source = measure_peak(t)
                res.peaks[t] = gflops
                if t == top:
                    res.peak_gflops, res.peak_source = gflops, source
        for cfg in configs:
            if cfg.skipped:
                res.skipped.append({"runtime": cfg.runtime, "precision": cfg.precision, "threads": cfg.threads,
                                    "reason": cfg.skipped})
                continue
            try:
                rows = run_config(cfg, batches, min_time, warmup, options=(options or {}).get(cfg.runtime))
            except EdgeCNNError as e:
                log(f"failed: {cfg.runtime} {cfg.precision} threads={cfg.threads or 'auto'}: {e}")
                res.failed.append({"runtime": cfg.runtime, "precision": cfg.precision, "threads": cfg.threads,
                                   "batch": None, "error": str(e)})
                continue
            for r in rows:
                r["threads"] = cfg.threads
                if r.get("failed") and r.get("unavailable"):  # not usable here: skipped, as plan() would
                    res.skipped.append({"runtime": cfg.runtime, "precision": cfg.precision, "threads": cfg.threads,
                                        "batch": r["batch"], "reason": r["error"]})
                    continue
                if r.get("failed"):
                    log(f"failed: {cfg.runtime} {cfg.precision} batch {r['batch']}: {r['error']}")
                    res.failed.append({k: r.get(k) for k in ("runtime", "precision", "threads", "batch", "error")})
                    continue
                peak = res.peaks.get(cfg.threads or usable_cpus())
                if peak and r["precision"] == "fp32" and r["device"] == "CPU":
                    r["floor_img_s"] = peak * 1e9 / res.flops_per_image
                    r["floor_pct"] = 100.0 * r["throughput"] / r["floor_img_s"]
                res.rows.append(r)
                if progress:
                    progress(r)
    return res


def resolve(model, runtimes: list[str], precisions: list[str], threads: list[int | None] | None, options,
            log=None) -> tuple:
    """`edgecnn bench`'s arguments -> (model, runtimes, precisions, threads, options per runtime): a
    deploy.json from `tune` gives its runtime, precision and threads; 'all' is every registered runtime;
    unknown names fail (exit 2); none usable fails at once, before anything is measured."""
    from edgecnn.runtimes import get_runtime_class, runtime_names
    from edgecnn.runtimes.options import route_registered

    log = log or (lambda s: None)
    user_threads = [t for t in threads or [] if t] or None
    threads = threads or [None]
    tuned = None
    if model is not None and (str(model).lower().endswith(".json") or Path(model).is_dir()):
        from edgecnn.runtimes.artifact import describe
        from edgecnn.runtimes.deploy import resolve as resolve_deployable

        # A deploy.json or bundle is timed exactly as it runs: its runtime, precision, threads and options.
        tuned = resolve_deployable(model)
        model, runtimes, threads = tuned.model, [tuned.runtime], [tuned.threads]
        graph = describe(tuned.model).precision
        precisions = [graph if graph != "fp32" else tuned.precision]
    if model is not None and not Path(model).is_file():
        raise InvalidInputError(f"{model}: no such model file")
    if runtimes == ["all"]:
        runtimes = runtime_names()
    else:
        runtimes = [get_runtime_class(n).name for n in runtimes]  # an unknown name fails here (exit 2)
    fail_fast(runtimes)  # none usable (e.g. ort-cuda without a GPU): say so before anything is measured
    # Each runtime gets the options it declares (RUNTIME.KEY scopes); a key no runtime takes fails here.
    per_runtime = route_registered(options, runtimes, common=False)
    if tuned is not None:
        given = dict(per_runtime.get(tuned.runtime) or {})
        if given.get("threads") is not None:
            user_threads = [given.pop("threads")]
        given.pop("threads", None)
        run, notes = tuned.override(None, given)
        threads = [run.threads]
        if user_threads and user_threads != threads:
            if "threads" in tuned.configured:
                notes.append(f"threads {','.join(map(str, user_threads))} override the {tuned.kind}'s "
                             f"threads={tuned.threads}")
            threads = user_threads
        for n in notes:
            log(f"note: {n}")
        per_runtime[tuned.runtime] = dict(run.options)
        log(f"bench: {tuned.kind} {tuned.source}: {run.describe()}")
    return model, runtimes, precisions, threads, per_runtime


def fail_fast(runtimes: list[str]) -> None:
    """When no runtime asked for is usable here (e.g. ort-cuda without a GPU), say why at once:
    before the default model is exported and before anything is measured."""
    from edgecnn.runtimes import get_runtime_class

    why = {}
    for rt in runtimes:
        ok, reason = get_runtime_class(rt).available()
        if ok:
            return
        why[rt] = reason
    if why:
        raise RuntimeUnavailableError("; ".join(f"runtime {rt} is not usable here: {r}" for rt, r in why.items()))


def _num_classes(model: Path) -> int:
    """The model's output width (for its FLOPs), read through ONNX Runtime: no onnx package needed."""
    if model.suffix.lower() == ".onnx":
        try:
            from edgecnn.runtimes import load_runtime

            with load_runtime("ort-cpu", model) as rt:
                return int(rt.run(rt.dummy_input()).shape[-1])
        except EdgeCNNError:
            pass
    return 6


def _auto(used) -> str:
    """Threads not given: the runtime ran with one per usable CPU (shown when it reported the count)."""
    return f"auto ({used})" if used else "auto"


def table(res: SweepResult) -> str:
    from .report import table as tbl

    lines = [f"machine: {res.machine}"]
    if res.peak_gflops:
        lines.append(f"roofline: {res.flops_per_image / 1e6:.1f} MFLOP/image; measured fp32 peak "
                     f"{res.peak_gflops:.1f} GFLOP/s ({res.peak_source}) -> fp32 compute floor "
                     f"{res.floor_img_s:,.0f} img/s"
                     + "".join(f"; {t} thread(s): {g:.1f} GFLOP/s" for t, g in sorted(res.peaks.items())
                               if len(res.peaks) > 1))
    body = tbl(["runtime", "device", "precision", "threads", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s",
                "% floor", "load s", "peak RSS MB", "file MB", "note"],
               [[r["runtime"], r["device"], r["precision"], r["threads"] or _auto(r.get("threads_used")), r["batch"], r["p50_ms"],
                 r["p90_ms"], r["p99_ms"], r["throughput"],
                 f"{r['floor_pct']:.0f}%" if r.get("floor_pct") is not None else "-", r["load_s"],
                 r["peak_rss_mb"], r["file_bytes"] / 1e6, r.get("note", "")] for r in res.rows])
    lines.append(body)
    for f in res.failed:
        lines.append(f"FAILED: {f['runtime']} {f['precision']} threads={f['threads'] or 'auto'}"
                     f"{'' if f['batch'] is None else ' batch ' + str(f['batch'])}: {f['error']}")
    for s in res.skipped:
        lines.append(f"skipped: {s['runtime']} {s['precision']} threads={s['threads'] or 'auto'}"
                     f"{' batch ' + str(s['batch']) if s.get('batch') else ''}: {s['reason']}")
    return "\n".join(lines)


def to_csv(res: SweepResult) -> str:
    keys = ["runtime", "device", "precision", "threads", "threads_used", "batch", "iterations", "p50_ms", "p90_ms", "p99_ms",
            "mean_ms", "throughput", "floor_pct", "load_s", "peak_rss_mb", "file_bytes", "note", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in res.rows:
        w.writerow(r)
    for f in res.failed:  # measured rows first; each failed configuration/batch is a row with its error
        w.writerow(f)
    return buf.getvalue()


def plot(res: SweepResult, path: str | os.PathLike) -> None:
    """Throughput vs batch and latency percentiles, one line per configuration (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "plot", "--plot") from None
    from ._io import atomic_path

    groups: dict[str, list[dict]] = {}
    for r in res.rows:
        groups.setdefault(f"{r['runtime']} {r['precision']} t={r['threads'] or 'auto'}", []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        bs = [r["batch"] for r in rows]
        a.plot(bs, [r["throughput"] for r in rows], marker="o", label=name)
        line = b.plot(bs, [r["p50_ms"] for r in rows], marker="o", label=f"{name} p50")[0]
        b.fill_between(bs, [r["p50_ms"] for r in rows], [r["p99_ms"] for r in rows], color=line.get_color(),
                       alpha=0.15)
    if res.floor_img_s:
        a.axhline(res.floor_img_s, color="k", ls="--", lw=1, label="fp32 compute floor")
    for ax, title, ylabel in ((a, "throughput", "images / s"), (b, "latency p50 (band: p50-p99)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(res.machine, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
