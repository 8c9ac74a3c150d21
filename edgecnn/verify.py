"""The judge: does a model file compute what the PyTorch checkpoint computes, and say what it says?

The only place where a verdict is decided. `export`, `verify`, `quantize`, `tune`, `package` and the
demo call it with the same rules and the same default inputs, and print the same table and reasons.

Rules (ARCHITECTURE.md, README "Default tolerances"):
- the tolerance row comes from the precision READ FROM THE GRAPH (runtimes/artifact.py), never from
  what the file's metadata claims; a claim that disagrees with the graph is itself a failure;
- the PyTorch checkpoint is the reference, shown as the reference, never counted as a passing row;
  a verdict in which no row ran MODEL is an error, not a pass;
- the device metadata (class names, mean/std, input size, layout) must equal the checkpoint's;
- int8/fp16/bf16 rows bound the logit error (relative L2 error, cosine), not only the argmax, and
  where labels exist the accuracy drop and the worst per-class recall drop.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgecnn.runtimes.artifact import ModelArtifact, describe

from .errors import InvalidInputError, InvalidModelError, ParityError, RuntimeUnavailableError

# Default inputs, the same for every command: random normal inputs (outside the data distribution:
# they catch what data-set images do not exercise) and data-set images (the task-level figures).
N_RANDOM = 16
N_DATA = 300  # 50 per class of the built-in set: one image is 0.33 points of accuracy
SEED = 1234


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


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Named float32 (N,3,H,W) batches ("random", "data"), the data batch's labels and class names."""

    batches: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # for the "data" batch, when its classes are the model's
    class_names: list[str] | None = None
    raw: dict[str, np.ndarray] | None = None  # uint8 (N,H,W,3) images, for models with embedded preprocessing
    source: str = ""
    mean: tuple = ()
    std: tuple = ()

    def pixels(self) -> Inputs:
        """The same inputs for a model that takes raw pixels: ``raw`` to the graph, and as ``batches``
        the same pixels through the Python preprocessing (what PyTorch gets)."""
        from edgecnn.runtimes.preprocess import normalize

        return replace(self, batches={k: normalize(v, self.mean, self.std) for k, v in self.raw.items()})

    @property
    def n(self) -> int:
        return sum(len(v) for v in self.batches.values())


def make_inputs(mean, std, class_names: list[str] | None = None, data: str | os.PathLike | None = None,
                dataset=None, n_random: int = N_RANDOM, n_data: int = N_DATA, seed: int = SEED) -> Inputs:
    """The judge's default inputs: ``n_random`` random images and ``n_data`` data-set images (the
    built-in set, the folder ``data``, or a given ``dataset``), normalized with ``mean``/``std``.
    Labels are kept when the data set's classes are ``class_names``."""
    from edgecnn.runtimes.preprocess import normalize

    from .data import image_folder

    rng = np.random.default_rng(seed)
    raw = {"random": rng.integers(0, 256, size=(n_random, 64, 64, 3), dtype=np.uint8)}
    if dataset is None and n_data > 0:
        dataset = _builtin(max(1, -(-n_data // 6)), seed) if data is None else image_folder(data)
    labels = names = None
    source = f"{n_random} random images"
    if dataset is not None and n_data > 0:
        idx = np.sort(rng.permutation(len(dataset))[:n_data])
        raw["data"] = dataset.images[idx]
        if class_names is not None and list(dataset.class_names) == list(class_names):
            labels, names = dataset.labels[idx], list(class_names)
        where = "built-in set" if data is None else str(data)
        source += f" + {len(idx)} images of the {where}" if data is None else f" + {len(idx)} images of {where}"
        if labels is None:
            source += " (its classes are not the model's: no accuracy figures)"
    batches = {k: normalize(v, mean, std) for k, v in raw.items()}
    # Random *normalized* inputs exercise the whole float range, not only what pixels can give.
    batches["random"] = rng.standard_normal(batches["random"].shape).astype(np.float32)
    return Inputs(batches, labels, names, raw, source, tuple(mean), tuple(std))


@functools.lru_cache(maxsize=4)
def _builtin(per_class: int, seed: int):
    """The built-in set is drawn with Pillow (about 1 s for 300 images): drawn once per process."""
    from .data import synthetic_dataset

    ds = synthetic_dataset(per_class=per_class, seed=seed)
    ds.images.setflags(write=False)
    ds.labels.setflags(write=False)
    return ds


def reference_logits(ckpt, batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch eager, fp32, on the checkpoint: the reference."""
    import torch

    net = ckpt.build_model()
    with torch.inference_mode():
        return {k: net(torch.from_numpy(v)).numpy() for k, v in batches.items()}


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class MetaCheck:
    field: str
    model: object
    checkpoint: object
    status: str  # "ok", "FAIL", "absent"

    def line(self) -> str:
        if self.status == "ok":
            return f"{self.field}: ok"
        if self.status == "absent":
            return f"{self.field}: not in the model's metadata (the device would assume a default)"
        if self.field == "precision":
            return f"precision: metadata claims {self.model!r}, the graph computes {self.checkpoint}"
        return f"{self.field}: model says {_short(self.model)}, checkpoint says {_short(self.checkpoint)}"


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 120 else s[:100] + f"... ({len(s)} chars)"


def _json_field(meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except (ValueError, TypeError):
        return meta[key]


def check_metadata(art: ModelArtifact, ckpt) -> list[MetaCheck]:
    """The metadata the device uses, field by field, against the checkpoint; and the graph's own shape."""
    meta = art.metadata
    out: list[MetaCheck] = []
    # judge: what the checkpoint does not carry (a bare state_dict: class_0.. and the default mean/std were
    # assumed) cannot be compared; the model's own values (export --labels/--mean/--std) stand.
    assumed = set(getattr(ckpt, "assumed", ()))
    for key, want in (("class_names", list(ckpt.class_names)), ("mean", list(ckpt.mean)), ("std", list(ckpt.std))):
        if key not in meta:
            out.append(MetaCheck(key, None, want, "absent"))
            continue
        if ("labels" if key == "class_names" else "normalization") in assumed:
            got = _json_field(meta, key)  # nothing to compare with: it must at least be well-formed
            if key == "class_names":
                ok = isinstance(got, list) and len(got) == ckpt.num_classes and all(isinstance(x, str) for x in got)
            else:
                try:
                    arr = np.asarray(got, np.float64)
                    ok = arr.shape == (3,) and bool(np.isfinite(arr).all()) and (key == "mean" or arr.min() > 0)
                except (TypeError, ValueError):
                    ok = False
            out.append(MetaCheck(key, got, "(not in the checkpoint: must be well-formed)", "ok" if ok else "FAIL"))
            continue
        got = _json_field(meta, key)
        if key == "class_names":
            ok = isinstance(got, list) and [str(x) for x in got] == [str(x) for x in want]
        else:
            try:
                arr = np.asarray(got, np.float64)
                ok = arr.shape == (3,) and bool(np.isfinite(arr).all()) and np.allclose(arr, want, rtol=1e-6, atol=0)
            except (TypeError, ValueError):
                ok = False
        out.append(MetaCheck(key, got, want, "ok" if ok else "FAIL"))
    size = art.input_shape[2] if art.input_layout == "NCHW" and len(art.input_shape) == 4 else (
        art.input_shape[1] if len(art.input_shape) == 4 else None)
    out.append(MetaCheck("input size (graph)", size, ckpt.input_size, "ok" if size == ckpt.input_size else "FAIL"))
    if "input_size" in meta:
        ok = meta["input_size"].strip() == str(ckpt.input_size)
        out.append(MetaCheck("input_size", meta["input_size"], ckpt.input_size, "ok" if ok else "FAIL"))
    if "input_layout" in meta:
        ok = meta["input_layout"] == art.input_layout
        out.append(MetaCheck("input_layout", meta["input_layout"], f"{art.input_layout} (the graph's input)",
                             "ok" if ok else "FAIL"))
    width = art.num_classes
    if width is not None:
        out.append(MetaCheck("classes (graph output)", width, ckpt.num_classes,
                             "ok" if width == ckpt.num_classes else "FAIL"))
    if art.claimed_precision is not None and art.claimed_precision != art.precision:
        out.append(MetaCheck("precision", art.claimed_precision, f"{art.precision} (read from the graph: "
                             f"{art.precision_evidence})", "FAIL"))
    return out


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class VerifyRow:
    runtime: str
    precision: str
    device: str
    status: str  # "pass", "FAIL", "skipped"
    result: ParityResult | None = None
    note: str = ""
    model: str = ""  # file name of what ran
    model_sha256: str = ""

    def as_dict(self) -> dict:
        d = {"runtime": self.runtime, "precision": self.precision, "device": self.device,
             "status": self.status, "note": self.note, "model": self.model, "model_sha256": self.model_sha256}
        if self.result is not None:
            d.update(self.result.as_dict())
        return d


@dataclass(frozen=True)
class Cell:
    """One verdict row to compute: MODEL on this runtime, with this compute precision setting."""

    runtime: str
    precision: str  # the row's label: the graph's precision, or the runtime's compute precision for fp32 graphs
    run_precision: str = "fp32"  # what the runtime is asked for
    options: tuple = ()
    skip: str = ""


def cells_for(art: ModelArtifact, runtimes: list[str] | None, precision: str | None,
              options: dict | None = None, per_runtime_options: dict[str, dict] | None = None) -> list[Cell]:
    """Rows for MODEL: ``runtimes`` None means every registered runtime that runs MODEL's format
    (torch is the reference, never a row); ``precision`` None means every compute precision each
    runtime supports (fp32 graphs; fp32 alone for runtimes named in ``runtimes``) or the graph's own
    precision (int8/fp16 graphs)."""
    from edgecnn.runtimes import get_runtime_class, runtime_names

    suffix = art.path.suffix.lower()
    if runtimes is not None and "torch" in runtimes:
        others = [n for n in runtime_names() if suffix in get_runtime_class(n).suffixes]
        raise InvalidInputError(f"--runtime torch: PyTorch runs the checkpoint given as --against; it is the "
                                f"reference, not a runtime for {art.path.name} (use one of: {', '.join(others)})")
    names = runtimes or [n for n in runtime_names() if n != "torch"]
    if art.precision != "fp32" and precision not in (None, art.precision):
        raise InvalidInputError(f"{art.path.name} is {art.precision} (read from its graph: {art.precision_evidence});"
                                f" --precision {precision} does not apply")
    cells = []
    for name in names:
        cls = get_runtime_class(name)
        # ``per_runtime_options``: each runtime's own (routed by edgecnn.runtimes.options), else ``options``.
        own = (per_runtime_options.get(name) or {}) if per_runtime_options is not None else (options or {})
        opts = tuple(own.items())
        skip = "" if suffix in cls.suffixes else f"reads {'/'.join(cls.suffixes)} files, not {suffix}"
        if art.precision != "fp32":  # the file decides; the runtime computes at its fp32 setting
            cells.append(Cell(name, art.precision, "fp32", opts, skip))
            continue
        every = list(cls.precisions) if runtimes is None else ["fp32"]  # named runtimes: fp32 unless asked
        for p in ([precision] if precision else every):
            cells.append(Cell(name, p, p, opts,
                              skip or ("" if p in cls.precisions else f"supports {', '.join(cls.precisions)}")))
    return cells


def _run_all(rt, batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    fixed = rt.input_shape[0]
    step = fixed or 64
    return {k: np.concatenate([rt.run(v[i:i + step]) for i in range(0, len(v), step)]) for k, v in batches.items()}


def run_cell(art: ModelArtifact, cell: Cell, inputs: Inputs, refs: dict[str, np.ndarray], tol: Tolerance) -> VerifyRow:
    from edgecnn.runtimes import load_runtime

    with load_runtime(cell.runtime, art.path, precision=cell.run_precision, **dict(cell.options)) as rt:
        feed = inputs.raw if art.embedded_preprocessing else inputs.batches
        outs = _run_all(rt, feed)
        device = rt.device
    res = compare(refs, outs, tol, inputs.labels, inputs.class_names)
    return VerifyRow(cell.runtime, cell.precision, device, "pass" if res.passed else "FAIL", res,
                     "" if res.passed else res.reason, art.path.name, art.sha256)


# ---------------------------------------------------------------------------------------------- verdict
@dataclass
class Verdict:
    model: ModelArtifact
    reference: str
    inputs: str
    metadata: list[MetaCheck]
    rows: list[VerifyRow]
    notes: list[str] = field(default_factory=list)
    reference_stats: ParityResult | None = None  # the reference's own accuracy / per-class figures
    name: str = ""  # what to call MODEL (the file name unless given)

    def __post_init__(self):
        self.name = self.name or self.model.path.name

    @property
    def ran(self) -> list[VerifyRow]:
        return [r for r in self.rows if r.status in ("pass", "FAIL")]

    @property
    def metadata_failures(self) -> list[MetaCheck]:
        return [m for m in self.metadata if m.status == "FAIL"]

    @property
    def passed(self) -> bool:
        return bool(self.ran) and not self.metadata_failures and all(r.status == "pass" for r in self.ran)

    def reason(self) -> str:
        """One line: why the verdict is not a pass ("" when it is)."""
        parts = [f"metadata {m.line()}" for m in self.metadata_failures]
        parts += [f"{r.runtime} {r.precision}: {r.note}" for r in self.ran if r.status == "FAIL"]
        if not self.ran:
            parts.append("no runtime ran " + self.name + ": " +
                         "; ".join(f"{r.runtime}: {r.note}" for r in self.rows))
        return "; ".join(parts)

    def raise_for_status(self, what: str = "") -> None:
        """ParityError (exit 1) on a failed check; RuntimeUnavailableError (exit 3) when no row ran."""
        if not self.ran:
            raise RuntimeUnavailableError(self.reason())
        if not self.passed:
            raise ParityError(f"{self.name} does not match PyTorch: {self.reason()}{what}")

    def as_dict(self) -> dict:
        return {"model": self.name, "model_sha256": self.model.sha256,
                "graph_precision": self.model.precision, "precision_evidence": self.model.precision_evidence,
                "reference": self.reference, "inputs": self.inputs, "passed": self.passed,
                "reason": self.reason(), "notes": self.notes,
                "metadata": [asdict(m) for m in self.metadata],
                "reference_accuracy": self.reference_stats.acc_ref if self.reference_stats else None,
                "rows": [r.as_dict() for r in self.rows]}

    def text(self, per_class: bool = True) -> str:
        from .report import table, verify_table

        lines = [f"model      {self.name} ({self.model.format}, {self.model.precision} read from the "
                 f"graph: {self.model.precision_evidence}; sha256 {self.model.sha256[:12]})",
                 f"reference  {self.reference}",
                 f"inputs     {self.inputs}"]
        bad = self.metadata_failures
        absent = [m.field for m in self.metadata if m.status == "absent"]
        lines.append("metadata   " + ("; ".join(m.line() for m in bad) if bad else
                                      "class names, mean/std, input size, layout: match the checkpoint"
                                      if not absent else f"matches where present; absent: {', '.join(absent)}"))
        lines += [f"note       {n}" for n in self.notes]
        lines.append(verify_table(self.rows))
        stats = [r for r in self.ran if r.result is not None and r.result.per_class]
        if per_class and stats and self.reference_stats is not None:
            ref = self.reference_stats
            heads = ["class", "n", "reference P/R"] + [f"{r.runtime} {r.precision} P/R" for r in stats]
            body = []
            for i, c in enumerate(ref.per_class):
                body.append([c.name, c.support, f"{c.precision_ref * 100:.1f}/{c.recall_ref * 100:.1f}"] +
                            [f"{r.result.per_class[i].precision_out * 100:.1f}/{r.result.per_class[i].recall_out * 100:.1f}"
                             for r in stats])
            body.append(["top-1 accuracy", sum(c.support for c in ref.per_class), f"{ref.acc_ref * 100:.2f}%"] +
                        [f"{r.result.acc_out * 100:.2f}%" for r in stats])
            lines.append("\nper class (precision/recall %, data-set images):\n" + table(heads, body))
        return "\n".join(lines)


def judge(model: str | os.PathLike | ModelArtifact, checkpoint, *, runtimes: list[str] | None = None,
          precision: str | None = None, rtol: float | None = None, atol: float | None = None,
          max_drop: float | None = None, data: str | os.PathLike | None = None, options: dict | None = None,
          per_runtime_options: dict[str, dict] | None = None,
          inputs: Inputs | None = None, name: str | None = None) -> Verdict:
    """Judge MODEL against ``checkpoint`` (a path or a loaded Checkpoint) on ``runtimes`` (None: every
    runtime that runs MODEL's format). Raises InvalidModelError (exit 2) when MODEL cannot be read by
    any runtime that tried; the verdict itself says pass / fail / nothing ran."""
    from edgecnn.runtimes import get_runtime_class

    from .checkpoint import load_checkpoint

    art = model if isinstance(model, ModelArtifact) else describe(model)
    ckpt = checkpoint if hasattr(checkpoint, "build_model") else load_checkpoint(checkpoint)
    if runtimes is not None:
        runtimes = [get_runtime_class(n).name for n in runtimes]  # unknown names fail here
    if precision is not None:
        tolerance_for(precision, rtol, atol)
    cells = cells_for(art, runtimes, precision, options, per_runtime_options)
    inputs = inputs or make_inputs(ckpt.mean, ckpt.std, ckpt.class_names, data=data)
    if art.embedded_preprocessing:
        inputs = inputs.pixels()
    refs = reference_logits(ckpt, inputs.batches)
    notes = []
    if art.embedded_softmax:
        from edgecnn.runtimes.preprocess import softmax

        refs = {k: softmax(v) for k, v in refs.items()}
        notes.append("the graph ends in Softmax: compared as probabilities with softmax(PyTorch logits)")
    if art.embedded_preprocessing:
        notes.append("preprocessing is inside the graph: it gets raw uint8 pixels, PyTorch the same images "
                     "through edgecnn.runtimes.preprocess with the checkpoint's mean/std")
    meta = check_metadata(art, ckpt)
    if all(m.status == "absent" for m in meta if m.field in ("class_names", "mean", "std")):
        notes.append("the model has no edgecnn metadata (class names, mean/std): the graph was judged; "
                     "a device would fall back to defaults")
    ref_stats = compare(refs, refs, TOLERANCES["fp32"], inputs.labels, inputs.class_names) \
        if inputs.labels is not None else None
    rows: list[VerifyRow] = []
    why_not: dict[str, str] = {}
    load_errors: list[InvalidModelError] = []
    for c in cells:
        if c.runtime not in why_not:
            why_not[c.runtime] = get_runtime_class(c.runtime).available()[1] or ""
        if why_not[c.runtime] or c.skip:
            rows.append(VerifyRow(c.runtime, c.precision, "-", "skipped", note=why_not[c.runtime] or c.skip))
            continue
        try:
            rows.append(run_cell(art, c, inputs, refs, tolerance_for(c.precision, rtol, atol, max_drop)))
        except RuntimeUnavailableError as e:
            rows.append(VerifyRow(c.runtime, c.precision, "-", "skipped", note=str(e)))
        except InvalidModelError as e:
            rows.append(VerifyRow(c.runtime, c.precision, "-", "FAIL", note=f"cannot load: {e}",
                                  model=art.path.name, model_sha256=art.sha256))
            load_errors.append(e)
    # A file that no runtime could open is bad input (exit 2), not a parity failure of one runtime.
    if load_errors and not any(r.result is not None for r in rows):
        raise load_errors[0]
    where = Path(checkpoint).name if isinstance(checkpoint, (str, Path)) else "the checkpoint"
    reference = f"PyTorch eager fp32 on {where} (sha256 {ckpt.sha256[:12]}), shown as the reference, not a row"
    if name:
        for r in rows:
            r.model = name if r.model else r.model
    return Verdict(art, reference, inputs.source, meta, rows, notes, ref_stats, name or "")


def confusion_plot(verdict: Verdict, path: str | os.PathLike) -> None:
    """One confusion matrix per row that ran (and the reference), as a PNG (matplotlib, the `plot` extra)."""
    from ._io import atomic_path
    from .errors import MissingDependencyError

    ref = verdict.reference_stats
    if ref is None:
        raise InvalidInputError("no labels for a confusion matrix: the data set's classes are not the model's")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "--confusion") from None
    panels = [("reference (PyTorch)", ref.confusion)] + [
        (f"{r.runtime} {r.precision}", r.result.confusion) for r in verdict.ran if r.result.confusion is not None]
    names = [c.name for c in ref.per_class]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, cm) in zip(axes[0], panels, strict=True):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
