"""edgecnn tune: try runtimes x precisions x threads x options, keep those that pass the accuracy gate,
time them, and write the fastest as a deployment config (deploy.json) that Classifier and bench load."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
    throughput: float | None = None  # img/s at the tuning batch
    p50_ms: float | None = None  # latency at batch 1

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        prec = self.precision
        if self.run_precision not in ("fp32", self.precision):
            prec += f" ({self.run_precision} float ops)"
        return f"{self.runtime} {prec} threads={self.threads or 'auto'}" + (f" {opts}" if opts else "")

    def config(self, base: Path) -> dict:
        return {"runtime": self.runtime, "precision": self.run_precision, "label_precision": self.precision,
                "model": os.path.relpath(self.model, base), "threads": self.threads, "options": self.options}


def _gate(cand: Candidate, ref: np.ndarray, out: np.ndarray, labels: np.ndarray, max_drop: float) -> None:
    from .parity import TOLERANCES, compare

    res = compare(ref, out, TOLERANCES[cand.precision])
    acc_ref = float((ref.argmax(1) == labels).mean())
    cand.accuracy = float((out.argmax(1) == labels).mean())
    cand.drop_points = (acc_ref - cand.accuracy) * 100
    cand.agreement, cand.max_abs = res.agreement, res.max_abs
    reasons = [] if res.passed else [res.reason]
    if cand.drop_points > max_drop + 1e-9:
        reasons.append(f"accuracy drop {cand.drop_points:.2f} > {max_drop:g} points")
    cand.gate = "pass" if not reasons else "; ".join(reasons)


def candidates(fp32: Path, int8: dict[str, Path], threads: list[int],
               runtimes: list[str] | None = None) -> list[Candidate]:
    from edgecnn.runtimes import get_runtime_class

    from .machine import cpu_info

    out: list[Candidate] = []
    have = {n for n in (runtimes or ("ort-cpu", "openvino")) if get_runtime_class(n).available()[0]}
    bf16 = "avx512_bf16" in cpu_info()["isa"] or "amx_bf16" in cpu_info()["isa"]
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
                    if bf16:  # the ops NNCF leaves in float (Elu, pooling, logits) run in bf16
                        out.append(Candidate("openvino", "int8", int8["openvino"], "bf16", threads=t,
                                             options={"hint": hint}))
    return out


def tune(model: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, max_drop: float = 1.0,
         calib: str = "builtin", threads: list[int] | None = None, batch: int = 64,
         objective: str = "throughput", min_time: float = 1.0, runtimes: list[str] | None = None,
         int8: bool = True, log=print) -> tuple[dict, list[Candidate]]:
    """Tune ``model`` (fp32 .onnx exported by edgecnn); write ``out_dir``/deploy.json and return it."""
    from edgecnn.exporters.quantize import quantize

    from .bench import relax_batch, time_runtime
    from .quant_report import logits, model_classes_and_norm, quant_data

    model = Path(model)
    if not model.is_file() or model.suffix.lower() != ".onnx":
        raise InvalidInputError(f"{model}: give the fp32 .onnx file edgecnn exported")
    if objective not in ("throughput", "latency"):
        raise InvalidInputError("--objective must be throughput or latency")
    threads = threads or sorted({1, os.cpu_count() or 1})
    out_dir = Path(out_dir) if out_dir else model.with_name(model.stem + ".tuned")
    out_dir.mkdir(parents=True, exist_ok=True)
    from edgecnn.exporters.meta import onnx_metadata

    meta = onnx_metadata(model)
    if meta.get("precision", "fp32") != "fp32":
        raise InvalidInputError(f"{model}: is {meta['precision']}; tune starts from the fp32 model")
    names, _, _ = model_classes_and_norm(meta)
    data = quant_data(calib, meta, 300)
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
            log(f"int8 ({backend}): accuracy {res.report.acc_quant * 100:.2f}% "
                f"(drop {res.report.drop_points:.2f} points)")
        except ParityError as e:
            log(f"int8 ({backend}) refused by the accuracy gate: {e}")
    ref = logits("ort-cpu", fp32, data.heldout)
    cands = candidates(fp32, variants, threads, runtimes)
    from edgecnn.runtimes import load_runtime

    for c in cands:
        with load_runtime(c.runtime, c.model, precision=c.run_precision, threads=c.threads, **c.options) as rt:
            outs = np.concatenate([rt.run(data.heldout[i : i + 64]) for i in range(0, len(data.heldout), 64)])
            _gate(c, ref, outs, data.labels, max_drop)
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
    from .machine import describe

    cfg = {"format": "edgecnn-deploy/1", **best.config(out_dir), "objective": objective, "batch": batch,
           "max_drop": max_drop, "machine": describe(), "class_names": names,
           "measured": {"throughput": best.throughput, "p50_ms_batch1": best.p50_ms,
                        "accuracy": best.accuracy, "drop_points": best.drop_points},
           "candidates": [_row(c, out_dir) for c in cands]}
    write_text_atomic(out_dir / "deploy.json", json.dumps(cfg, indent=2) + "\n")
    return cfg, cands


def _row(c: Candidate, base: Path) -> dict:
    d = asdict(c)
    d["model"] = os.path.relpath(c.model, base)
    return d
