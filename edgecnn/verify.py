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

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgecnn.runtimes.artifact import ModelArtifact, describe

from .errors import InvalidInputError, InvalidModelError, ParityError, RuntimeUnavailableError
from .judge_inputs import N_DATA, N_RANDOM, SEED, Inputs, make_inputs, reference_logits
from .parity import TOLERANCES, ClassStats, ParityResult, Tolerance, compare, tolerance_for
from .report import confusion_plot

__all__ = ["N_DATA", "N_RANDOM", "SEED", "TOLERANCES", "ClassStats", "Inputs", "ParityResult", "Tolerance",
           "Verdict", "VerifyRow", "compare", "confusion_plot", "judge", "make_inputs", "reference_logits",
           "tolerance_for"]


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class MetaCheck:
    field: str
    model: object
    checkpoint: object  # what it was compared with (the checkpoint's value, or the command line's)
    status: str  # "ok", "FAIL", "absent", "not checked"
    why: str = ""  # for "not checked" (and a FAIL that is not a plain mismatch): in words
    against: str = "checkpoint"  # where the truth came from: "checkpoint" or "command line (--mean)"

    def line(self) -> str:
        if self.status == "ok":
            return f"{self.field}: ok"
        if self.status == "absent":
            return f"{self.field}: not in the model's metadata (the device would assume a default)"
        if self.status == "not checked":
            return f"{self.field}: not checked ({self.why}); the model says {_short(self.model)}"
        if self.why:
            return f"{self.field}: {self.why}"
        if self.field == "precision":
            return f"precision: metadata claims {self.model!r}, the graph computes {self.checkpoint}"
        return f"{self.field}: model says {_short(self.model)}, {self.against} says {_short(self.checkpoint)}"


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 120 else s[:100] + f"... ({len(s)} chars)"


def _json_field(meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except (ValueError, TypeError):
        return meta[key]


# Which checkpoint group holds each device field, and the option that states it.
_GROUP = {"class_names": ("labels", "--labels"), "mean": ("normalization", "--mean"),
          "std": ("normalization", "--std")}


@dataclass
class Truth:
    """What the device metadata must say, field by field: from the checkpoint, or stated on the command
    line where the checkpoint carries none; None where neither says (then it is not checked)."""

    values: dict  # field -> value or None
    sources: dict  # field -> "checkpoint" / "command line (--mean)" / ""

    def known(self, key: str) -> bool:
        return self.values.get(key) is not None


def truth_for(ckpt, stated: dict | None = None) -> Truth:
    """The checkpoint's class names / mean / std where it carries them, else what the user stated
    (``stated``: class_names, mean, std, each None when not given). A stated value that contradicts the
    checkpoint is bad input (exit 2): the checkpoint is the training run's own record."""
    stated = stated or {}
    assumed = set(getattr(ckpt, "assumed", ()))
    values, sources = {}, {}
    for key, (group, option) in _GROUP.items():
        own = list(getattr(ckpt, key))
        given = stated.get(key)
        if key == "class_names" and given is not None and len(given) != ckpt.num_classes:
            raise InvalidInputError(f"--labels gives {len(given)} names but the checkpoint's model has "
                                    f"{ckpt.num_classes} outputs")
        if group not in assumed:
            if given is not None and not _same(key, given, own):
                raise InvalidInputError(f"{option} {_short(list(given))} contradicts the checkpoint, which carries "
                                        f"{_short(own)}")
            values[key], sources[key] = own, "checkpoint"
        elif given is not None:
            values[key], sources[key] = list(given), f"command line ({option})"
        else:
            values[key], sources[key] = None, ""
    return Truth(values, sources)


def _same(key: str, a, b) -> bool:
    if key == "class_names":
        return isinstance(a, list) and [str(x) for x in a] == [str(x) for x in b]
    try:
        arr = np.asarray(a, np.float64)
        return arr.shape == (3,) and bool(np.isfinite(arr).all()) and bool(np.allclose(arr, b, rtol=1e-6, atol=0))
    except (TypeError, ValueError):
        return False


def check_metadata(art: ModelArtifact, ckpt, truth: Truth | None = None) -> list[MetaCheck]:
    """The metadata the device uses, field by field, against the truth (the checkpoint's values, or the
    command line's where it carries none); what neither states is "not checked", never a claimed match."""
    from edgecnn.runtimes.preprocess import check_class_names, check_norm

    truth = truth or truth_for(ckpt)
    meta = art.metadata
    out: list[MetaCheck] = []
    width = art.num_classes
    counts_differ = width is not None and width != ckpt.num_classes
    for key, (_, option) in _GROUP.items():
        if key not in meta:
            out.append(MetaCheck(key, None, truth.values.get(key), "absent"))
            continue
        got = _json_field(meta, key)
        try:  # well-formed, whatever it is compared with (the one validator)
            if key == "class_names":
                check_class_names(got, "class_names", width)
            else:
                check_norm(got, key, positive=key == "std")
        except InvalidInputError as e:
            out.append(MetaCheck(key, got, None, "FAIL", why=f"malformed: {e}"))
            continue
        if counts_differ and key == "class_names":
            out.append(MetaCheck(key, got, None, "not checked", why="the class counts differ"))
        elif not truth.known(key):
            out.append(MetaCheck(key, got, None, "not checked",
                                 why=f"the checkpoint carries none and no {option} was given"))
        else:
            want = truth.values[key]
            out.append(MetaCheck(key, got, want, "ok" if _same(key, got, want) else "FAIL",
                                 against=truth.sources[key]))
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
    if width is not None:
        out.append(MetaCheck("classes (graph output)", width, ckpt.num_classes, "ok" if not counts_differ else "FAIL",
                             why=f"the model outputs {width} classes, the checkpoint {ckpt.num_classes}: their "
                                 "logits cannot be compared" if counts_differ else ""))
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


def run_cell(art: ModelArtifact, cell: Cell, inputs: Inputs, refs: dict[str, np.ndarray], tol: Tolerance,
             feed: dict[str, np.ndarray] | None = None) -> VerifyRow:
    """One row: the model on ``cell``'s runtime, fed ``feed`` (what the device would feed it: the images
    normalized with the model's own mean/std; default ``inputs.batches``, or raw pixels when embedded)."""
    from edgecnn.runtimes import load_runtime

    with load_runtime(cell.runtime, art.path, precision=cell.run_precision, **dict(cell.options)) as rt:
        if feed is None:
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
    def not_checked(self) -> list[MetaCheck]:
        return [m for m in self.metadata if m.status == "not checked"]

    @property
    def passed(self) -> bool:
        return bool(self.ran) and not self.metadata_failures and all(r.status == "pass" for r in self.ran)

    def reason(self) -> str:
        """One line: why the verdict is not a pass ("" when it is)."""
        parts = [f"metadata {m.line()}" for m in self.metadata_failures]
        parts += [f"{r.runtime} {r.precision}: {r.note}" for r in self.ran if r.status == "FAIL"]
        if not self.ran and not parts:
            parts.append("no runtime ran " + self.name + ": " +
                         "; ".join(f"{r.runtime}: {r.note}" for r in self.rows))
        return "; ".join(parts)

    def raise_for_status(self, what: str = "") -> None:
        """ParityError (exit 1) on a failed check; RuntimeUnavailableError (exit 3) when no row ran."""
        if self.metadata_failures or (self.ran and not self.passed):
            raise ParityError(f"{self.name} does not match PyTorch: {self.reason()}{what}")
        if not self.ran:
            raise RuntimeUnavailableError(self.reason())

    def as_dict(self) -> dict:
        return {"model": self.name, "model_sha256": self.model.sha256,
                "graph_precision": self.model.precision, "precision_evidence": self.model.precision_evidence,
                "reference": self.reference, "inputs": self.inputs, "passed": self.passed,
                "reason": self.reason(), "notes": self.notes,
                "not_checked": [m.field for m in self.not_checked],
                "metadata": [asdict(m) for m in self.metadata],
                "reference_accuracy": self.reference_stats.acc_ref if self.reference_stats else None,
                "rows": [r.as_dict() for r in self.rows]}

    def text(self, per_class: bool = True) -> str:
        from .report import verdict_text

        return verdict_text(self, per_class)


def _device_norm(art: ModelArtifact, ckpt) -> tuple[list | None, list, list]:
    """The class names (None when absent), mean and std the device reads from the model's metadata
    (defaults where absent; the checkpoint's where malformed: the metadata check reports that)."""
    from edgecnn.runtimes.classifier import metadata_norm

    try:
        names, mean, std = metadata_norm(art.metadata)
    except InvalidModelError:
        return None, list(ckpt.mean), list(ckpt.std)
    return (list(names) if names is not None else None), list(mean), list(std)


def judge(model: str | os.PathLike | ModelArtifact, checkpoint, *, runtimes: list[str] | None = None,
          precision: str | None = None, rtol: float | None = None, atol: float | None = None,
          max_drop: float | None = None, data: str | os.PathLike | None = None, options: dict | None = None,
          per_runtime_options: dict[str, dict] | None = None,
          inputs: Inputs | None = None, name: str | None = None, stated: dict | None = None) -> Verdict:
    """Judge MODEL against ``checkpoint`` (a path or a loaded Checkpoint) on ``runtimes`` (None: every
    runtime that runs MODEL's format). ``stated``: class_names / mean / std given on the command line,
    the truth where the checkpoint carries none (a bare state_dict). Raises InvalidModelError (exit 2)
    when MODEL cannot be read by any runtime that tried; the verdict itself says pass / fail / nothing ran.

    The runtime rows are fed what the device would feed: the images normalized with the model's own
    metadata; PyTorch gets them normalized with the truth (the checkpoint's or the stated values; the
    model's own where neither says). A wrong mean in the metadata thus shows as a parity failure and an
    accuracy drop. Accuracy figures exist whenever the data set's classes are the truth's (or, where
    no truth is known, the model's metadata's) class names."""
    from edgecnn.runtimes import get_runtime_class
    from edgecnn.runtimes.preprocess import normalize

    from .checkpoint import load_checkpoint

    art = model if isinstance(model, ModelArtifact) else describe(model)
    ckpt = checkpoint if hasattr(checkpoint, "build_model") else load_checkpoint(checkpoint)
    if runtimes is not None:
        runtimes = [get_runtime_class(n).name for n in runtimes]  # unknown names fail here
    if precision is not None:
        tolerance_for(precision, rtol, atol)
    cells = cells_for(art, runtimes, precision, options, per_runtime_options)
    truth = truth_for(ckpt, stated)
    dev_names, dev_mean, dev_std = _device_norm(art, ckpt)
    counts_differ = art.num_classes is not None and art.num_classes != ckpt.num_classes
    ref_mean = truth.values["mean"] if truth.known("mean") else dev_mean
    ref_std = truth.values["std"] if truth.known("std") else dev_std
    # Metadata without mean/std (a foreign file): the graph is judged on the truth's normalization (a note says
    # a device would fall back to defaults); only a stated mean/std is what the device feeds.
    dev_mean = dev_mean if "mean" in art.metadata else ref_mean
    dev_std = dev_std if "std" in art.metadata else ref_std
    label_names = None if counts_differ else (truth.values["class_names"] if truth.known("class_names")
                                              else dev_names)
    inputs = inputs or make_inputs(ref_mean, ref_std, label_names, data=data)
    if counts_differ:
        inputs = replace(inputs, source=inputs.source.replace("its classes are not the model's: no accuracy figures",
                                                              "no accuracy figures: the class counts differ"))
    if art.embedded_preprocessing:
        inputs = inputs.pixels()
    refs = reference_logits(ckpt, inputs.batches)
    notes = []
    feed = None  # what the runtime rows get, when it is not what PyTorch gets
    if not art.embedded_preprocessing and inputs.raw is not None and (
            not np.allclose(dev_mean, inputs.mean) or not np.allclose(dev_std, inputs.std)):
        feed = {k: (normalize(inputs.raw[k], dev_mean, dev_std) if k != "random" else v)
                for k, v in inputs.batches.items()}
        notes.append(f"the runtimes get the images normalized with the model's metadata (mean {_short(dev_mean)}, "
                     f"std {_short(dev_std)}), as the device does; PyTorch with mean {_short(list(inputs.mean))}, "
                     f"std {_short(list(inputs.std))}")
    if art.embedded_softmax:
        from edgecnn.runtimes.preprocess import softmax

        refs = {k: softmax(v) for k, v in refs.items()}
        notes.append("the graph ends in Softmax: compared as probabilities with softmax(PyTorch logits)")
    if art.embedded_preprocessing:
        notes.append("preprocessing is inside the graph: it gets raw uint8 pixels, PyTorch the same images "
                     "through edgecnn.runtimes.preprocess with the checkpoint's mean/std")
    meta = check_metadata(art, ckpt, truth)
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
        if counts_differ:  # nothing to compare: no figures, the class-count line says why
            rows.append(VerifyRow(c.runtime, c.precision, "-", "not compared",
                                  note=f"the model outputs {art.num_classes} classes, the checkpoint "
                                       f"{ckpt.num_classes}", model=art.path.name, model_sha256=art.sha256))
            continue
        try:
            rows.append(run_cell(art, c, inputs, refs, tolerance_for(c.precision, rtol, atol, max_drop), feed))
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
