"""Quantization data and the accuracy report: calibration / held-out splits, fp32 vs quantized on held-out images."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import SYNTHETIC_CLASSES, split, synthetic_dataset
from .errors import InvalidInputError

# Built-in set: calibration images come from their own generator seed; the held-out images are the
# judge's default data-set images (edgecnn.verify: seed 1234, 300 images), so `quantize` judges a file
# on exactly the images `verify` and `package` judge it on. Neither is `train`'s default seed (0).
CALIB_SEED = 1001
HELDOUT_FRACTION = 0.3  # of a user's image folder


MIN_HELDOUT = 10


@dataclass
class QuantData:
    calib: np.ndarray  # float32 (N, 3, 64, 64), normalized
    heldout: np.ndarray  # float32 (M, 3, 64, 64), normalized: the judge's "data" batch
    labels: np.ndarray | None  # int64 (M,), or None without labels of the model's classes
    source: str  # "built-in set (seeds ...)" or the folder
    inputs: object = None  # edgecnn.verify.Inputs: the judge's random + held-out batches
    notes: list = field(default_factory=list)  # how a folder was read (labels used, or why not)


def model_classes_and_norm(meta: dict[str, str]) -> tuple[list[str] | None, list[float], list[float]]:
    """The model's class names (None when absent) and mean/std, through the one validator."""
    from edgecnn.runtimes.classifier import metadata_norm

    names, mean, std = metadata_norm(meta)
    return (list(names) if names is not None else None), list(mean), list(std)


def _check_classes(names, found: list[str], where: str) -> None:
    from .labels import format_list

    if names is not None and list(names) != list(found):
        raise InvalidInputError(
            f"{where}: classes ({format_list(found)}) do not match the model's ({format_list(names)}); "
            "give a folder DIR/<class>/<image> of the model's own classes")


def _placeholder(names) -> bool:
    return names is not None and list(names) == [f"class_{i}" for i in range(len(names))]


def _builtin_refused(names, option: str) -> InvalidInputError:
    from .labels import format_list

    return InvalidInputError(
        f"{option} builtin is the demo's built-in set ({format_list(SYNTHETIC_CLASSES)}), but this model's classes "
        f"are {format_list(names)}: give {option} DIR, a folder of your own images (any layout, no labels needed; "
        f"class folders named like the model's classes also give the accuracy drop)")


def labelled_folder(root: str | os.PathLike, names: list[str] | None) -> tuple[object | None, str]:
    """An ImageFolder whose class folders are the model's classes -> (Dataset labelled with the model's
    class indices and names, note); else (None, why its images are used without labels).

    Folders match by name (all or some of the model's classes, any order); when the model's names
    are the class_0.. placeholders, by count, in sorted order (as torchvision numbers them)."""
    from .data import Dataset, image_folder
    from .labels import folder_classes, format_list

    root = Path(root)
    try:
        found = folder_classes(root)
    except OSError:
        return None, ""
    if len(found) < 2:
        return None, f"{root}: no class folders: its images are used without labels"
    by_name = names is not None and set(found) <= set(names)
    by_count = names is not None and _placeholder(names) and len(found) == len(names)
    if not (by_name or by_count):
        return None, (f"{root}: class folders ({format_list(found)}) are not the model's classes "
                      f"({format_list(names or [])}): its images are used without labels")
    try:
        ds = image_folder(root)
    except InvalidInputError as e:
        return None, f"{e}: its images are used without labels"
    if by_name:
        index = np.array([list(names).index(n) for n in ds.class_names], dtype=np.int64)
        return (Dataset(ds.images, index[ds.labels], list(names)),
                f"{root}: labels from its class folders ({format_list(found)})")
    return (Dataset(ds.images, ds.labels, list(names)),
            f"{root}: labels from its class folders ({format_list(found)}), numbered in sorted order as the "
            f"model's {format_list(names)}")


def _unlabeled(images: np.ndarray):
    from .data import Dataset

    return Dataset(images, np.zeros(len(images), np.int64), ["(unlabeled)"])  # the judge keeps no labels


def _loose_images(folder: str | os.PathLike) -> np.ndarray:
    """Every image under ``folder`` (any layout, any depth), uint8 (N, 64, 64, 3): calibration needs no labels."""
    from edgecnn.runtimes.preprocess import to_rgb_uint8

    from .data import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        what = "is a file, not a folder of images" if root.exists() else "folder does not exist"
        raise InvalidInputError(f"{root}: {what}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise InvalidInputError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) at any depth")
    return np.stack([to_rgb_uint8(f, 64) for f in files])


def quant_data(calib: str | os.PathLike, meta: dict[str, str], samples: int,
               heldout: str | os.PathLike | None = None) -> QuantData:
    """Calibration images and disjoint held-out images, normalized with the model's mean/std.

    ``calib``: "builtin" (the demo's six classes only: refused for another model) or a folder of images
    at any depth. Labels come only from an ImageFolder whose class folders are the model's classes;
    otherwise the images are unlabeled and ``labels`` is None (the judge then has no accuracy figures).
    ``heldout`` None: the judge's built-in images when calibrating on the built-in set, else a split of
    the calibration folder kept apart from calibration (stratified when labelled). Given ("builtin" or
    a folder): calibration uses every image under ``calib`` and the held-out set comes from ``heldout``.
    """
    from edgecnn.runtimes.preprocess import normalize

    from .verify import N_DATA, SEED, make_inputs

    if samples < 1:
        raise InvalidInputError("--calib-samples must be >= 1")
    names, mean, std = model_classes_and_norm(meta)
    demo = names is None or list(names) == list(SYNTHETIC_CLASSES)
    if str(calib) == "builtin" and not demo:
        raise _builtin_refused(names, "--calib")
    if heldout is None:
        heldout = "builtin" if str(calib) == "builtin" else None
    notes: list[str] = []
    if heldout is None:
        ds, note = labelled_folder(calib, names)
        notes += [note] if note else []
        if ds is not None:
            rest, held = split(ds, HELDOUT_FRACTION, seed=0)
            if len(held) < MIN_HELDOUT or len(rest) < 1:
                raise InvalidInputError(f"{calib}: {len(ds)} images are too few for calibration plus a held-out "
                                        f"split (at least {MIN_HELDOUT} held-out images)")
            idx = np.random.default_rng(0).permutation(len(rest))[:samples]
            cal = rest.subset(np.sort(idx)).images
            source = f"{calib} (held-out split of {len(held)} images, disjoint from calibration)"
        else:
            imgs = _loose_images(calib)
            perm = np.random.default_rng(0).permutation(len(imgs))
            n_held = round(len(imgs) * HELDOUT_FRACTION)
            if n_held < MIN_HELDOUT or len(imgs) - n_held < 1:
                raise InvalidInputError(f"{calib}: {len(imgs)} images are too few for calibration plus a held-out "
                                        f"split (give at least {int(np.ceil(MIN_HELDOUT / HELDOUT_FRACTION))})")
            cal = imgs[np.sort(perm[n_held:])][:samples]
            held = _unlabeled(imgs[np.sort(perm[:n_held])])
            source = f"{calib} (held-out split of {n_held} unlabeled images, disjoint from calibration)"
    else:
        if str(calib) == "builtin":
            n = -(-samples // len(SYNTHETIC_CLASSES))
            cal = synthetic_dataset(per_class=n, seed=CALIB_SEED).images[:samples]
        else:
            cal = _loose_images(calib)[:samples]
        if str(heldout) == "builtin":
            if not demo:
                raise _builtin_refused(names, "--heldout")
            held = synthetic_dataset(per_class=-(-N_DATA // len(SYNTHETIC_CLASSES)), seed=SEED)
            source = f"built-in set, seed {SEED} (the images verify judges on)"
        else:
            held, note = labelled_folder(heldout, names)
            notes += [note] if note else []
            if held is None:
                held = _unlabeled(_loose_images(heldout))
            source = str(heldout) + ("" if held.class_names == list(names or []) else " (unlabeled)")
    inputs = make_inputs(mean, std, names, dataset=held, n_data=len(held))
    inputs.source = source
    return QuantData(normalize(cal, mean, std), inputs.batches["data"], inputs.labels, source, inputs, notes)


@dataclass
class AccuracyReport:
    backend: str
    precision: str
    runtime: str  # runtime the quantized model was evaluated on
    n_heldout: int
    acc_fp32: float
    acc_quant: float
    drop_points: float  # (acc_fp32 - acc_quant) * 100
    agreement: float  # top-1 agreement quantized vs fp32
    max_abs_diff: float  # max |logit difference|
    finite: bool
    size_fp32: int
    size_quant: int
    max_drop: float
    passed: bool
    data: str = ""
    calibration: str = ""
    rel_l2: float = 0.0  # relative L2 error of the logits (the judge's bound)
    cosine: float = 1.0
    worst_class_drop: float | None = None  # points
    reason: str = ""  # the judge's reasons when it fails
    graph_precision: str = ""  # what the judge read from the written file's graph

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        from .report import table

        rows = [
            ["held-out images", f"{self.n_heldout} ({self.data})"],
            ["calibration", self.calibration],
        ]
        if self.acc_fp32 is None or self.acc_fp32 != self.acc_fp32:  # no labels: the judge has no accuracy
            rows.append(["labels", "none given: no accuracy drop; judged by agreement with fp32 and the "
                                   "logit-error bounds"])
        else:
            rows += [
                ["top-1 accuracy fp32", f"{self.acc_fp32 * 100:.2f}%"],
                [f"top-1 accuracy {self.precision} ({self.runtime})", f"{self.acc_quant * 100:.2f}%"],
                ["accuracy drop", f"{self.drop_points:+.2f} points (max allowed {self.max_drop:g})"],
            ]
        rows += [
            ["top-1 agreement", f"{self.agreement * 100:.2f}%"],
            ["worst per-class recall drop", "-" if self.worst_class_drop is None else f"{self.worst_class_drop:+.1f} points"],
            ["max abs logit diff", f"{self.max_abs_diff:.4g}" + ("" if self.finite else " (NON-FINITE outputs)")],
            ["logit rel L2 / cosine", f"{self.rel_l2:.4g} / {self.cosine:.6f}"],
            ["file size fp32", _size(self.size_fp32)],
            [f"file size {self.precision}", f"{_size(self.size_quant)} ({self.size_quant / self.size_fp32:.2f}x)"],
            ["verdict", "pass" if self.passed else f"FAIL: {self.reason}"],
        ]
        return table(["accuracy report", ""], rows)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file; an IR .xml counts its .bin too."""
    p = Path(path)
    n = p.stat().st_size
    if p.suffix.lower() == ".xml" and p.with_suffix(".bin").is_file():
        n += p.with_suffix(".bin").stat().st_size
    return n


def logits(runtime: str, path: str | os.PathLike, batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``path`` on ``runtime`` over every named batch, loaded once (fp32 compute setting; the file
    carries its own precision)."""
    from edgecnn.runtimes import load_runtime

    from .verify import _run_all

    with load_runtime(runtime, path) as rt:
        return _run_all(rt, batches)


def accuracy_report(fp32_logits: dict[str, np.ndarray], q_logits: dict[str, np.ndarray], data: QuantData, *,
                    backend: str, precision: str, runtime: str, size_fp32: int, size_quant: int, max_drop: float,
                    calibration: str = "", class_names=None) -> AccuracyReport:
    """The judge (edgecnn.verify.compare) on the quantized model's logits against fp32's, under the
    tolerance of ``precision`` as read from the written file's graph, with ``max_drop`` as its drop bound."""
    from .verify import compare, tolerance_for

    res = compare(fp32_logits, q_logits, tolerance_for(precision, max_drop=max_drop), data.labels, class_names)
    acc32 = res.acc_ref if res.acc_ref is not None else float("nan")
    accq = res.acc_out if res.acc_out is not None else float("nan")
    return AccuracyReport(backend, precision, runtime, len(data.heldout), acc32, accq, (acc32 - accq) * 100,
                          res.agreement, res.max_abs, res.finite, size_fp32, size_quant, max_drop, res.passed,
                          data.source, calibration, res.rel_l2, res.cosine, res.worst_class_drop,
                          "" if res.passed else res.reason, precision)
