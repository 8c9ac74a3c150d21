"""edgecnn tune: try runtimes x precisions x threads x options, keep those that pass the accuracy gate,
time them, and write the fastest as a deployment config (deploy.json) that Classifier and bench load."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgecnn.runtimes.cpu import describe_cpu, usable_cpus

from ._io import write_text_atomic
from .errors import InvalidInputError, ParityError


@dataclass
class Candidate:
    runtime: str
    precision: str  # what the label says: fp32 / bf16 / int8
    model: Path
    run_precision: str = "fp32"  # the runtime's precision setting (int8 files run with fp32 compute)
    threads: int | None = None
    options: dict = field(default_factory=dict)
    # filled in
    gate: str = ""  # "pass" / why not
    accuracy: float | None = None
    drop_points: float | None = None
    agreement: float | None = None
    max_abs: float | None = None
    throughput: float | None = None  # img/s at the tuning batch (screening: in this process)
    p50_ms: float | None = None  # latency at batch 1 (screening)
    winner: bool = False  # deploy.json's configuration
    # the winner only: its re-timing alone in a fresh process (None: not re-timed, or that figure failed)
    retimed_throughput: float | None = None
    retimed_p50_ms: float | None = None
    retime_error: str = ""  # why (part of) the re-timing failed

    @property
    def precision_label(self) -> str:
        """The precision as tables and the final line show it: int8 files with bf16 float ops are int8+bf16."""
        return precision_label(self.precision, self.run_precision)

    def label(self) -> str:
        opts = _opts(self.options)
        prec = self.precision
        if self.run_precision not in ("fp32", self.precision):
            prec += f" ({self.run_precision} float ops)"
        return f"{self.runtime} {prec} threads={self.threads or 'auto'}" + (f" {opts}" if opts else "")

    def config(self, base: Path) -> dict:
        return {"runtime": self.runtime, "precision": self.run_precision, "label_precision": self.precision,
                "model": os.path.relpath(self.model, base), "threads": self.threads, "options": self.options}


def precision_label(label_precision: str, run_precision: str) -> str:
    """``label_precision`` (what the file is) plus ``+run_precision`` where the runtime computes otherwise."""
    return label_precision if run_precision in ("fp32", label_precision) else f"{label_precision}+{run_precision}"


@dataclass
class Retimed:
    """The winner's re-timing in a fresh process; a figure is None where its batch failed (``error`` says why)."""

    throughput: float | None
    p50_ms: float | None
    error: str = ""


def _gate(cand: Candidate, ref: dict, out: dict, data, names, max_drop: float) -> None:
    """The judge's verdict on one candidate (edgecnn.verify.compare), against the fp32 model's logits."""
    from .verify import compare, tolerance_for

    res = compare(ref, out, tolerance_for(cand.precision, max_drop=max_drop), data.labels, names)
    cand.accuracy = res.acc_out
    cand.drop_points = None if res.acc_ref is None else (res.acc_ref - res.acc_out) * 100
    cand.agreement, cand.max_abs = res.agreement, res.max_abs
    cand.gate = "pass" if res.passed else res.reason


def candidates(fp32: Path, int8: dict[str, Path], threads: list[int],
               runtimes: list[str] | None = None, cpu_defaults=None) -> list[Candidate]:
    from edgecnn.runtimes import get_runtime_class
    from edgecnn.runtimes.cpu import current_defaults

    out: list[Candidate] = []
    have = {n for n in (runtimes or ("ort-cpu", "openvino")) if get_runtime_class(n).available()[0]}
    # Per CPU kind (runtimes/cpu.py): bf16 candidates only where bf16 is native (AVX-512 BF16, AMX-BF16).
    kind = cpu_defaults or current_defaults()
    bf16, int8_bf16 = kind.bf16_candidates, kind.int8_bf16_candidates
    for t in threads:
        if "ort-cpu" in have:
            out.append(Candidate("ort-cpu", "fp32", fp32, threads=t))
            if "ort-cpu" in int8:
                out.append(Candidate("ort-cpu", "int8", int8["ort-cpu"], threads=t))
        if "openvino" in have:
            for hint in ("latency", "throughput"):
                out.append(Candidate("openvino", "fp32", fp32, threads=t, options={"hint": hint}))
                if bf16:
                    out.append(Candidate("openvino", "bf16", fp32, "bf16", threads=t, options={"hint": hint}))
                if "openvino" in int8:
                    out.append(Candidate("openvino", "int8", int8["openvino"], threads=t, options={"hint": hint}))
                    if int8_bf16:  # the ops NNCF leaves in float (Elu, pooling, logits) run in bf16
                        out.append(Candidate("openvino", "int8", int8["openvino"], "bf16", threads=t,
                                             options={"hint": hint}))
    return out


def tune(model: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, max_drop: float = 1.0,
         calib: str = "builtin", threads: list[int] | None = None, batch: int = 64,
         objective: str = "throughput", min_time: float = 1.0, runtimes: list[str] | None = None,
         int8: bool = True, log=print) -> tuple[dict, list[Candidate]]:
    """Tune ``model`` (fp32 .onnx exported by edgecnn); write ``out_dir``/deploy.json and return it.

    The winner is the best passing candidate on the screening figures; it is then re-timed alone in a fresh
    process, the figure deploy.json records. If that re-timing fails (one batch or the whole child), the
    winner is kept (it is still the best passing configuration), the failure is recorded on its candidate
    row ("retime_error") and in "measured" ("retime_error", "how", "sources"), and each figure that could
    not be re-timed is recorded, and printed, as the screening figure it is."""
    from edgecnn.exporters.quantize import quantize

    from .bench import relax_batch, time_runtime
    from .quant_report import logits, model_classes_and_norm, quant_data

    model = Path(model)
    if not model.is_file() or model.suffix.lower() != ".onnx":
        raise InvalidInputError(f"{model}: give the fp32 .onnx file edgecnn exported")
    if objective not in ("throughput", "latency"):
        raise InvalidInputError("--objective must be throughput or latency")
    threads = threads or sorted({1, usable_cpus()})
    out_dir = Path(out_dir) if out_dir else model.with_name(model.stem + ".tuned")
    from edgecnn.exporters.meta import onnx_metadata
    from edgecnn.runtimes.artifact import describe

    meta = onnx_metadata(model)
    graph = describe(model).precision
    if graph != "fp32":
        raise InvalidInputError(f"{model}: is {graph} (read from its graph); tune starts from the fp32 model")
    names, _, _ = model_classes_and_norm(meta)
    data = quant_data(calib, meta, 300)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every variant accepts any batch: the fp32 file gets a symbolic batch axis if it has none.
    fp32 = out_dir / "model.fp32.onnx"
    relax_batch(model, fp32)
    from edgecnn.runtimes import get_runtime_class

    runtimes = runtimes or ["ort-cpu", "openvino"]
    for r in runtimes:
        if r not in ("ort-cpu", "openvino"):
            raise InvalidInputError(f"tune tries ort-cpu and openvino on this machine, not {r!r}")
    variants: dict[str, Path] = {}
    for backend, runtime, suffix in (("ort", "ort-cpu", ".onnx"), ("openvino", "openvino", ".xml")):
        if not int8 or runtime not in runtimes or not get_runtime_class(runtime).available()[0]:
            continue
        try:
            res = quantize(fp32, out_dir / f"model.int8{'.ov' if backend == 'openvino' else ''}{suffix}",
                           backend=backend, calib=calib, max_drop=max_drop)
            variants[runtime] = res.path
            rep = res.report
            log(f"int8 ({backend}): " + (f"top-1 agreement with fp32 {rep.agreement * 100:.2f}% (no labels)"
                                         if rep.acc_quant is None or rep.acc_quant != rep.acc_quant else
                                         f"accuracy {rep.acc_quant * 100:.2f}% (drop {rep.drop_points:.2f} points)"))
        except ParityError as e:
            log(f"int8 ({backend}) refused by the accuracy gate: {e}")
    ref = logits("ort-cpu", fp32, data.inputs.batches)
    cands = candidates(fp32, variants, threads, runtimes)
    from edgecnn.runtimes import load_runtime

    for c in cands:
        with load_runtime(c.runtime, c.model, precision=c.run_precision, threads=c.threads, **c.options) as rt:
            outs = {k: np.concatenate([rt.run(v[i : i + 64]) for i in range(0, len(v), 64)])
                    for k, v in data.inputs.batches.items()}
            _gate(c, ref, outs, data, names, max_drop)
            if c.gate == "pass":
                c.throughput = time_runtime(rt, batch, min_time=min_time).throughput
                c.p50_ms = time_runtime(rt, 1, min_time=min_time).p50_ms
        log(f"  {c.label():55s} gate {c.gate[:60]:8s} "
            + (f"{c.throughput:8,.0f} img/s @b{batch}  p50 b1 {c.p50_ms:.3f} ms" if c.throughput else ""))
    passing = [c for c in cands if c.gate == "pass"]
    if not passing:
        raise ParityError("no configuration passed the accuracy gate")
    best = (max(passing, key=lambda c: c.throughput) if objective == "throughput"
            else min(passing, key=lambda c: c.p50_ms))
    # The screening figures above are single runs in one busy process (and the best of several noisy
    # ones picked the winner): the figure recorded is the winner re-timed alone in a fresh process.
    best.winner = True
    fresh = retime(best, batch, min_time)
    best.retimed_throughput, best.retimed_p50_ms, best.retime_error = fresh.throughput, fresh.p50_ms, fresh.error
    log(_retime_line(best, batch))
    from .machine import describe

    cfg = {"format": "edgecnn-deploy/1", **best.config(out_dir), "objective": objective, "batch": batch,
           "max_drop": max_drop, "machine": describe(), "cpu_kind": describe_cpu().kind, "class_names": names,
           "measured": measured(best), "candidates": [_row(c, out_dir) for c in cands]}
    write_text_atomic(out_dir / "deploy.json", json.dumps(cfg, indent=2) + "\n")
    return cfg, cands


FRESH, SCREENING = "re-timed in a fresh process", "screening"


def retime(c: Candidate, batch: int, min_time: float) -> Retimed:
    """(img/s at ``batch``, p50 ms at batch 1) of candidate ``c``, timed in a fresh child process. Never
    raises for a failed re-timing: a batch that failed (or a child that crashed or ran over) leaves its
    figure None and the reason in ``error``."""
    from .sweep import Config, run_config

    label = c.run_precision if c.run_precision != "fp32" else c.precision  # the worker maps int8 -> fp32 compute
    try:
        rows = run_config(Config(c.runtime, label, c.threads, c.model), sorted({1, batch}), min_time, 5,
                          options=c.options)
    except InvalidInputError as e:  # the child itself failed: crash, timeout
        return Retimed(None, None, str(e))
    ok = {r["batch"]: r for r in rows if not r.get("failed")}
    errors = [f"batch {r['batch']}: {r.get('error', 'failed')}" for r in rows if r.get("failed")]
    errors += [f"batch {b}: no figure came back" for b in sorted({1, batch}) if b not in ok
               and not any(r.get("batch") == b for r in rows if r.get("failed"))]
    return Retimed(ok[batch]["throughput"] if batch in ok else None, ok[1]["p50_ms"] if 1 in ok else None,
                   "; ".join(errors))


def figures(c: Candidate) -> dict:
    """The winner's recorded figures and where each comes from: the fresh-process re-timing where it
    succeeded, else the screening figure (never shown as re-timed)."""
    tput, p50 = c.retimed_throughput is not None, c.retimed_p50_ms is not None
    return {"throughput": c.retimed_throughput if tput else c.throughput,
            "p50_ms_batch1": c.retimed_p50_ms if p50 else c.p50_ms,
            "sources": {"throughput": FRESH if tput else SCREENING, "p50_ms_batch1": FRESH if p50 else SCREENING}}


def measured(c: Candidate) -> dict:
    """deploy.json's "measured" for the winner ``c``. When its fresh-process re-timing failed (on one batch or
    wholly), the winner stays the best passing configuration of the screening, the failed figure is its
    screening figure, "sources" names which figure is which, and "retime_error" keeps the reason."""
    f = figures(c)
    screened = {"throughput": c.throughput, "p50_ms_batch1": c.p50_ms}
    if not c.retime_error:
        how = "the winner alone in a fresh process (edgecnn.sweep.run_config)"
    else:
        fell = [k for k, v in f["sources"].items() if v == SCREENING]
        how = (f"screening figure for {', '.join(fell)}: the fresh-process re-timing failed: {c.retime_error}"
               + "".join(f"; {k} re-timed in a fresh process" for k, v in f["sources"].items() if v == FRESH))
    out = {"throughput": f["throughput"], "p50_ms_batch1": f["p50_ms_batch1"], "how": how,
           "sources": f["sources"], "screening": screened, "accuracy": c.accuracy, "drop_points": c.drop_points}
    if c.retime_error:
        out["retime_error"] = c.retime_error
    return out


def _retime_line(c: Candidate, batch: int) -> str:
    """What the re-timing gave, saying which figure is re-timed and which is the screening one."""
    f = figures(c)
    src = f["sources"]
    line = (f"winner {c.label()}: {f['throughput']:,.0f} img/s @b{batch} ({src['throughput']}; screening "
            f"{c.throughput:,.0f}), p50 b1 {f['p50_ms_batch1']:.3f} ms ({src['p50_ms_batch1']}; screening "
            f"{c.p50_ms:.3f})")
    return line + (f"; the fresh-process re-timing failed: {c.retime_error}" if c.retime_error else "")


def table(cands: list[Candidate], batch: int) -> tuple[list[str], list[list]]:
    """The tune table (headers, rows), fastest screening figure first: ``*`` marks the winner (deploy.json's
    configuration), whose fresh-process figures stand beside its screening ones ("failed" where they failed)."""
    heads = ["", "runtime", "precision", "threads", "options", "gate", "accuracy", f"img/s b{batch}",
             f"re-timed img/s b{batch}", "p50 ms b1", "re-timed p50 ms b1"]
    return heads, [_table_row(c, c.winner) for c in sorted(cands, key=lambda c: -(c.throughput or 0))]


def _table_row(c: Candidate, winner: bool) -> list:
    def fresh(v: float | None, fmt: str) -> str:
        return "-" if not winner else ("failed" if v is None else format(v, fmt))

    return ["*" if winner else "", c.runtime, c.precision_label, c.threads or "auto", _opts(c.options),
            "pass" if c.gate == "pass" else c.gate[:50],
            f"{c.accuracy * 100:.2f}%" if c.accuracy is not None else "-",
            f"{c.throughput:,.0f}" if c.throughput else "-", fresh(c.retimed_throughput, ",.0f"),
            f"{c.p50_ms:.3f}" if c.p50_ms else "-", fresh(c.retimed_p50_ms, ".3f")]


def _opts(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def final_line(cfg: dict, where: Path) -> str:
    """The last line tune prints: deploy.json's configuration (label as the table shows it, options as k=v)
    and its recorded figures, each saying whether it was re-timed in a fresh process or is the screening one."""
    m, src = cfg["measured"], cfg["measured"]["sources"]
    opts = _opts(cfg["options"])
    return (f"fastest passing ({cfg['objective']}): {cfg['runtime']} "
            f"{precision_label(cfg['label_precision'], cfg['precision'])} threads={cfg['threads'] or 'auto'}"
            + (f" {opts}" if opts else "")
            + f": {m['throughput']:,.0f} img/s @b{cfg['batch']} ({src['throughput']}), p50 b1 "
              f"{m['p50_ms_batch1']:.3f} ms ({src['p50_ms_batch1']}) -> {where}")


def _row(c: Candidate, base: Path) -> dict:
    d = asdict(c)
    d["model"] = os.path.relpath(c.model, base)
    return d
