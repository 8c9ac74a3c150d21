"""The judge's numbers: the tolerance table, ``compare`` and its results (numpy only, no runtime, no torch).

Rules (ARCHITECTURE.md, README "Default tolerances"): the tolerance row comes from the precision READ
FROM THE GRAPH; int8/fp16/bf16 rows bound the logit error (relative L2 error, cosine), not only the
argmax, and where labels exist the accuracy drop and the worst per-class recall drop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class Tolerance:
    rtol: float | None  # elementwise |a-b| <= atol + rtol*|ref|; None: no elementwise check
    atol: float | None
    min_agreement: float  # top-1 agreement with the reference on non-tied data-set inputs
    max_rel_l2: float  # ||out - ref||_2 / ||ref||_2 over the judged logits
    min_cosine: float  # cosine similarity of the judged logits (flattened)
    max_acc_drop: float | None = None  # top-1 accuracy drop in points, where labels exist
    max_class_drop: float | None = None  # worst per-class recall drop in points, where labels exist
    require_finite: bool = True


# Sources: ONNX backend tests (rtol 1e-3), Optimum (atol 1e-5), NNCF / OpenVINO accuracy control
# (max drop 1%), MLPerf (>= 99% of fp32). Logit-error bounds measured on real quantized models of the
# built-in task (tests' 3-epoch Net, 300 data-set images, AMD EPYC; see README "Default tolerances"):
#   ORT int8 QDQ: rel L2 0.0048, cosine 0.999988;  OpenVINO/NNCF int8: rel L2 0.052, cosine 0.99899,
#   fp16 (both): rel L2 0.0003, cosine 1.000000;   an argmax-preserving x100+37 distortion: rel L2 ~100.
# The bounds sit about 3x (rel L2) and 10x (1 - cosine) beyond the worst honest model measured.
# bf16: 7 mantissa bits to fp16's 10; OpenVINO bf16 on real images measured |diff| up to 1.7e-2*(1+|ref|).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-3, atol=1e-5, min_agreement=1.0, max_rel_l2=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(rtol=1e-2, atol=1e-2, min_agreement=0.99, max_rel_l2=1e-2, min_cosine=0.9999,
                      max_acc_drop=1.0, max_class_drop=5.0),
    "bf16": Tolerance(rtol=5e-2, atol=5e-2, min_agreement=0.99, max_rel_l2=5e-2, min_cosine=0.999,
                      max_acc_drop=1.0, max_class_drop=5.0),
    "int8": Tolerance(rtol=None, atol=None, min_agreement=0.97, max_rel_l2=0.15, min_cosine=0.99,
                      max_acc_drop=1.0, max_class_drop=5.0),
}


def tolerance_for(precision: str, rtol: float | None = None, atol: float | None = None,
                  max_drop: float | None = None) -> Tolerance:
    """The table's row for ``precision``; rtol/atol/max_drop given by the user replace its values."""
    if precision not in TOLERANCES:
        raise InvalidInputError(f"no tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    tol = TOLERANCES[precision]
    if rtol is not None or atol is not None:
        tol = replace(tol, rtol=tol.rtol if rtol is None else rtol, atol=tol.atol if atol is None else atol)
        if tol.rtol is not None and tol.atol is None:
            tol = replace(tol, atol=0.0)
        if tol.atol is not None and tol.rtol is None:
            tol = replace(tol, rtol=0.0)
        # A user who loosens the elementwise check loosens the logit-error bounds with it.
        if tol.rtol is not None:
            loose = max(tol.rtol, tol.atol or 0.0)
            tol = replace(tol, max_rel_l2=max(tol.max_rel_l2, loose), min_cosine=min(tol.min_cosine, 1 - loose))
    if max_drop is not None:
        if max_drop < 0:
            raise InvalidInputError("--max-drop must be >= 0")
        tol = replace(tol, max_acc_drop=max_drop)
    return tol


# ---------------------------------------------------------------------------------------------- numbers
@dataclass
class ClassStats:
    name: str
    support: int
    precision_ref: float
    recall_ref: float
    precision_out: float
    recall_out: float


@dataclass
class ParityResult:
    n: int
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    agreement: float  # top-1 agreement over non-tied data-set inputs
    tied: int  # inputs whose reference top-2 margin is within tolerance (excluded from agreement)
    finite: bool
    passed: bool
    reason: str
    acc_ref: float | None = None  # top-1 accuracy where labels exist
    acc_out: float | None = None
    worst_class_drop: float | None = None  # points
    per_class: list = field(default_factory=list)  # ClassStats
    confusion: list | None = None  # (C, C) of the output's predictions, rows = true class

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("confusion")
        return d


def _per_class(pred: np.ndarray, labels: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (labels, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
    return precision, recall, cm


def compare(refs: dict[str, np.ndarray], outs: dict[str, np.ndarray], tol: Tolerance,
            labels: np.ndarray | None = None, class_names: list[str] | None = None) -> ParityResult:
    """Judge logits ``outs`` against reference ``refs`` (both name -> (N, C)) under ``tol``.

    Elementwise and logit-error figures cover every batch, except for a precision without an
    elementwise check (int8), judged on the "data" batch alone (its ranges were calibrated on real
    images, not on noise). Agreement, accuracy and per-class figures use the "data" batch.
    """
    if not isinstance(refs, dict):  # plain (N, C) arrays: one batch, judged whole
        refs, outs = {"all": refs}, {"all": outs}
    if set(refs) != set(outs):
        raise ValueError("reference and output batches differ")
    task = ["data"] if "data" in refs else list(refs)
    judged = task if tol.rtol is None else list(refs)
    ref = np.concatenate([np.asarray(refs[k], np.float64) for k in judged])
    out = np.concatenate([np.asarray(outs[k], np.float64) for k in judged])
    n = sum(len(refs[k]) for k in refs)
    if ref.shape != out.shape:
        return ParityResult(n, math.inf, math.inf, math.inf, 0.0, 0.0, 0, False, False,
                            f"output shape {out.shape[1:]} != reference {ref.shape[1:]}")
    finite = bool(np.isfinite(out).all())
    reasons: list[str] = []
    if not finite:
        reasons.append("non-finite outputs")
        max_abs = max_rel = rel_l2 = math.inf
        cosine = 0.0
    else:
        diff = np.abs(out - ref)
        max_abs = float(diff.max())
        big = np.abs(ref) > 1e-3  # a near-zero logit makes any ratio meaningless
        max_rel = float((diff[big] / np.abs(ref[big])).max()) if big.any() else 0.0
        nref = float(np.linalg.norm(ref))
        rel_l2 = float(np.linalg.norm(out - ref)) / nref if nref > 0 else (0.0 if max_abs == 0 else math.inf)
        a, b = out.ravel(), ref.ravel()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosine = float(a @ b / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
        if tol.rtol is not None and not np.all(diff <= tol.atol + tol.rtol * np.abs(ref)):
            worst = np.unravel_index(np.argmax(diff - tol.rtol * np.abs(ref)), diff.shape)
            reasons.append(f"|diff| {diff[worst]:.3g} > atol {tol.atol:g} + rtol {tol.rtol:g} * |ref| "
                           f"at {tuple(map(int, worst))}")
        if rel_l2 > tol.max_rel_l2:
            reasons.append(f"relative logit error {rel_l2:.3g} > {tol.max_rel_l2:g}")
        if cosine < tol.min_cosine:
            reasons.append(f"logit cosine similarity {cosine:.6f} < {tol.min_cosine:g}")
    tref = np.concatenate([refs[k] for k in task]).astype(np.float64)
    tout = np.concatenate([outs[k] for k in task]).astype(np.float64)
    srt = np.sort(tref, axis=1)
    margin = srt[:, -1] - srt[:, -2] if tref.shape[1] > 1 else np.full(len(tref), np.inf)
    slack = 2 * ((tol.atol or 0.0) + (tol.rtol or 0.0) * np.abs(srt[:, -1]))
    tied = margin <= slack
    p_ref, p_out = tref.argmax(1), np.where(np.isfinite(tout).all(1), tout.argmax(1), -1)
    keep = ~tied
    agree = float((p_out == p_ref)[keep].mean()) if keep.any() else 1.0
    if agree < tol.min_agreement:
        reasons.append(f"top-1 agreement {agree * 100:.2f}% < {tol.min_agreement * 100:g}%")
    res = ParityResult(n, max_abs, max_rel, rel_l2, cosine, agree, int(tied.sum()), finite, False, "")
    if labels is not None and len(labels) == len(tref) and class_names and len(class_names) == tref.shape[1]:
        c = tref.shape[1]
        res.acc_ref, res.acc_out = float((p_ref == labels).mean()), float((p_out == labels).mean())
        pr, rr, _ = _per_class(p_ref, labels, c)
        po, ro, cm = _per_class(np.clip(p_out, 0, c - 1), labels, c) if finite else (pr * 0, rr * 0, None)
        support = np.bincount(labels, minlength=c)
        res.per_class = [ClassStats(str(class_names[i]), int(support[i]), float(pr[i]), float(rr[i]),
                                    float(po[i]), float(ro[i])) for i in range(c)]
        res.confusion = cm.tolist() if cm is not None else None
        present = support > 0
        res.worst_class_drop = float(((rr - ro) * 100)[present].max()) if present.any() else 0.0
        drop = (res.acc_ref - res.acc_out) * 100
        if tol.max_acc_drop is not None and drop > tol.max_acc_drop + 1e-9:
            reasons.append(f"top-1 accuracy drops {drop:.2f} points ({res.acc_ref * 100:.2f}% -> "
                           f"{res.acc_out * 100:.2f}%) > {tol.max_acc_drop:g}")
        if tol.max_class_drop is not None and res.worst_class_drop > tol.max_class_drop + 1e-9:
            worst = int(np.argmax(np.where(present, rr - ro, -np.inf)))
            reasons.append(f"recall of class {class_names[worst]!r} drops {res.worst_class_drop:.1f} points "
                           f"> {tol.max_class_drop:g}")
    res.passed = not reasons
    res.reason = "; ".join(reasons) or "ok"
    return res
