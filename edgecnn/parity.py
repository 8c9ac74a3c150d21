"""Parity: compare a runtime's logits with PyTorch's under the precision's stated tolerance."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InvalidInputError


@dataclass(frozen=True)
class Tolerance:
    rtol: float | None  # elementwise check |a-b| <= atol + rtol*|ref|; None: no elementwise check
    atol: float | None
    min_agreement: float  # top-1 agreement required on non-tied inputs
    require_finite: bool = True


# ARCHITECTURE.md's table. Sources: ONNX backend tests (rtol 1e-3), Optimum (atol 1e-5),
# NNCF / OpenVINO accuracy control, MLPerf (>= 99% of fp32).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-3, atol=1e-5, min_agreement=1.0),
    "fp16": Tolerance(rtol=1e-2, atol=1e-2, min_agreement=0.99),
    # bf16 keeps 7 mantissa bits to fp16's 10 (unit roundoff 2^-8 vs 2^-11): 1e-2 is ~20 fp16 ulps but
    # only ~2.5 bf16 ulps, and OpenVINO bf16 on real images measured |diff| up to 1.7e-2 * (1 + |ref|).
    "bf16": Tolerance(rtol=5e-2, atol=5e-2, min_agreement=0.99),
    "int8": Tolerance(rtol=None, atol=None, min_agreement=0.97),
}


def tolerance_for(precision: str, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    if precision not in TOLERANCES:
        raise InvalidInputError(f"no tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    base = TOLERANCES[precision]
    if rtol is None and atol is None:
        return base
    return Tolerance(rtol=base.rtol if rtol is None else rtol, atol=base.atol if atol is None else atol,
                     min_agreement=base.min_agreement, require_finite=base.require_finite)


@dataclass
class ParityResult:
    n: int
    max_abs: float
    max_rel: float
    cosine: float
    agreement: float  # top-1 agreement over non-tied inputs
    tied: int  # inputs whose reference top-2 margin is within tolerance (excluded from agreement)
    finite: bool
    passed: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def compare(ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> ParityResult:
    """Compare logits ``out`` with reference ``ref`` (both (N, C)) under ``tol``."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        return ParityResult(len(ref), float("inf"), float("inf"), 0.0, 0.0, 0, False, False,
                            f"shape {out.shape} != reference {ref.shape}")
    finite = bool(np.isfinite(out).all())
    diff = np.abs(out - ref)
    max_abs = float(diff.max()) if finite else float("inf")
    # Relative error where the reference is not tiny (a near-zero logit makes any ratio meaningless).
    big = np.abs(ref) > 1e-3
    max_rel = float((diff[big] / np.abs(ref[big])).max()) if finite and big.any() else 0.0
    a, b = out.ravel(), ref.ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if finite and denom > 0 else 0.0
    # Ties: the reference's top-2 margin is within what the tolerance allows either side to move.
    srt = np.sort(ref, axis=1)
    margin = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    slack = 2 * ((tol.atol or 0.0) + (tol.rtol or 0.0) * np.abs(srt[:, -1]))
    tied = margin <= slack
    keep = ~tied
    agree = float((out.argmax(1) == ref.argmax(1))[keep].mean()) if keep.any() else 1.0
    reasons = []
    if tol.require_finite and not finite:
        reasons.append("non-finite outputs")
    if finite and tol.rtol is not None and not np.all(diff <= tol.atol + tol.rtol * np.abs(ref)):
        worst = np.unravel_index(np.argmax(diff - tol.rtol * np.abs(ref)), diff.shape)
        reasons.append(f"|diff| {diff[worst]:.3g} > atol {tol.atol:g} + rtol {tol.rtol:g} * |ref| at {tuple(map(int, worst))}")
    if agree < tol.min_agreement:
        reasons.append(f"top-1 agreement {agree * 100:.2f}% < {tol.min_agreement * 100:g}%")
    return ParityResult(len(ref), max_abs, max_rel, cosine, agree, int(tied.sum()), finite,
                        not reasons, "; ".join(reasons) or "ok")


def parity_inputs(mean, std, n_random: int = 16, n_data: int = 48, data: str | os.PathLike | None = None,
                  seed: int = 1234) -> dict[str, np.ndarray]:
    """Named float32 batches: random normal inputs and data-set images (built-in set unless ``data``)."""
    from .data import image_folder, synthetic_dataset

    rng = np.random.default_rng(seed)
    batches = {"random": rng.standard_normal((n_random, 3, 64, 64)).astype(np.float32)}
    if n_data > 0:
        if data is None:
            ds = synthetic_dataset(per_class=max(1, -(-n_data // 6)), seed=seed)
        else:
            ds = image_folder(data)
        idx = rng.permutation(len(ds))[:n_data]
        batches["data"] = ds.subset(np.sort(idx)).tensors(mean, std)
    return batches


@dataclass
class VerifyRow:
    runtime: str
    precision: str
    device: str
    status: str  # "pass", "FAIL", "skipped"
    result: ParityResult | None = None
    note: str = ""

    def as_dict(self) -> dict:
        d = {"runtime": self.runtime, "precision": self.precision, "device": self.device,
             "status": self.status, "note": self.note}
        if self.result is not None:
            d.update(self.result.as_dict())
        return d


def reference_logits(ckpt, batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    net = ckpt.build_model()
    with torch.inference_mode():
        return {k: net(torch.from_numpy(v)).numpy() for k, v in batches.items()}


def check_runtime(model_path, runtime: str, precision: str, batches: dict[str, np.ndarray],
                  refs: dict[str, np.ndarray], tol: Tolerance, run_precision: str | None = None,
                  **options) -> VerifyRow:
    """Run ``model_path`` on ``runtime`` over every batch and compare with the reference logits.

    ``run_precision``: the runtime's compute setting when the file itself carries ``precision``
    (a quantized int8 / fp16 model runs with the runtime at fp32 and is labelled by its file).
    """
    from edgecnn.runtimes import load_runtime

    with load_runtime(runtime, model_path, precision=run_precision or precision, **options) as rt:
        outs = {k: rt.run(v) for k, v in batches.items()}
        device = rt.device
        actual_precision = precision if run_precision else getattr(rt, "actual_precision", precision)
    if tol.rtol is None and "data" in batches:  # task-level only (int8): judged on data-set images
        batches = {"data": batches["data"]}
    ref = np.concatenate([refs[k] for k in batches])
    out = np.concatenate([outs[k] for k in batches])
    res = compare(ref, out, tol)
    # Top-1 agreement is reported on the data-set images (the task-level figure) when present.
    if "data" in batches:
        data_res = compare(refs["data"], outs["data"], tol)
        res.agreement, res.tied = data_res.agreement, data_res.tied
        if data_res.agreement < tol.min_agreement and res.passed:
            res.passed, res.reason = False, data_res.reason
    return VerifyRow(runtime, actual_precision, device, "pass" if res.passed else "FAIL", res,
                     "" if res.passed else res.reason)


@dataclass(frozen=True)
class Cell:
    """One entry of the verify matrix: this model file, on this runtime, at this precision."""

    runtime: str
    precision: str
    model_path: str
    options: tuple = ()  # (key, value) pairs passed to the runtime
    run_precision: str | None = None  # runtime setting when the file carries the precision (int8/fp16)
    skip: str = ""  # why this cell cannot run (a skipped row)


def matrix_cells(model_path, checkpoint, runtimes: list[str] | None = None,
                 precision: str | None = None) -> list[Cell]:
    """Every (runtime, precision, model) cell: ``runtimes`` None means every registered one, ``precision``
    None every precision each runtime supports. The torch runtime runs the checkpoint itself."""
    from pathlib import Path

    from edgecnn.exporters.quantize import model_precision
    from edgecnn.runtimes import get_runtime_class, runtime_names

    cells = []
    file_precision = model_precision(model_path)  # "int8"/"fp16" for a file `edgecnn quantize` wrote
    for name in runtimes or runtime_names():
        cls = get_runtime_class(name)
        reads = Path(model_path).suffix.lower() in cls.suffixes
        if file_precision != "fp32":  # the file decides the precision; the runtime computes at fp32
            cells.append(Cell(name, file_precision, str(model_path if reads else checkpoint),
                              run_precision="fp32" if reads else None,
                              skip="" if reads else f"cannot run this {file_precision} {Path(model_path).suffix} file "
                                                         f"(reads {'/'.join(cls.suffixes)})"))
            continue
        path = model_path if reads else checkpoint
        for p in ([precision] if precision else list(cls.precisions)):
            cells.append(Cell(name, p, str(path)))
    return cells


def verify_cells(cells: list[Cell], batches: dict[str, np.ndarray], refs: dict[str, np.ndarray],
                 rtol: float | None = None, atol: float | None = None) -> list[VerifyRow]:
    """Run every cell under its precision's default tolerance (or rtol/atol). A runtime that is not
    usable here, or cannot give the asked precision, is a skipped row with the reason, never a pass;
    a model it cannot load is a FAIL."""
    from edgecnn.errors import InvalidModelError, RuntimeUnavailableError
    from edgecnn.runtimes import get_runtime_class

    rows, why_not = [], {}
    bad: dict[str, Exception] = {}  # model file -> the first load error
    loaded: set[str] = set()  # model files some runtime opened
    for c in cells:
        if c.runtime not in why_not:
            why_not[c.runtime] = get_runtime_class(c.runtime).available()[1] or None
        if why_not[c.runtime] or c.skip:
            rows.append(VerifyRow(c.runtime, c.precision, "-", "skipped", note=why_not[c.runtime] or c.skip))
            continue
        try:
            rows.append(check_runtime(c.model_path, c.runtime, c.precision, batches, refs,
                                      tolerance_for(c.precision, rtol, atol), run_precision=c.run_precision,
                                      **dict(c.options)))
        except RuntimeUnavailableError as e:
            rows.append(VerifyRow(c.runtime, c.precision, "-", "skipped", note=str(e)))
            continue
        except InvalidModelError as e:
            rows.append(VerifyRow(c.runtime, c.precision, "-", "FAIL", note=f"cannot load: {e}"))
            bad.setdefault(c.model_path, e)
            continue
        loaded.add(c.model_path)
    # A file no runtime could open is bad input (exit 2), not a parity failure of one runtime.
    for path, err in bad.items():
        if path not in loaded:
            raise err
    return rows
