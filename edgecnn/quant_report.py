"""Quantization data and the accuracy report: calibration / held-out splits, fp32 vs quantized on held-out images."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

# Built-in set: calibration images come from their own generator seed; the held-out images are the
# judge's default data-set images (edgecnn.verify: seed 1234, 300 images), so `quantize` judges a file
# on exactly the images `verify` and `package` judge it on. Neither is `train`'s default seed (0).
CALIB_SEED = 1001
HELDOUT_FRACTION = 0.3  # of a user's image folder


@dataclass
class QuantData:
    calib: np.ndarray  # float32 (N, 3, 64, 64), normalized
    heldout: np.ndarray  # float32 (M, 3, 64, 64), normalized: the judge's "data" batch
    labels: np.ndarray | None  # int64 (M,), or None without labels of the model's classes
    source: str  # "built-in set (seeds ...)" or the folder
    inputs: object = None  # edgecnn.verify.Inputs: the judge's random + held-out batches


def model_classes_and_norm(meta: dict[str, str]) -> tuple[list[str] | None, list[float], list[float]]:
    def get(key, default):
        try:
            return json.loads(meta[key])
        except (KeyError, ValueError):
            return default

    return get("class_names", None), get("mean", [0.5, 0.5, 0.5]), get("std", [0.25, 0.25, 0.25])


def _check_classes(names, found: list[str], where: str) -> None:
    if names is not None and list(names) != list(found):
        raise InvalidInputError(
            f"{where}: classes ({', '.join(found[:6])}) do not match the model's ({', '.join(names[:6])}); "
            "give a folder DIR/<class>/<image> of the model's own classes")


def _loose_images(folder: str | os.PathLike) -> np.ndarray:
    """Every image under ``folder`` (any layout), uint8 (N, 64, 64, 3): calibration needs no labels."""
    from edgecnn.runtimes.preprocess import to_rgb_uint8

    from .data import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"{root}: calibration folder does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"{root}: no images for calibration")
    return np.stack([to_rgb_uint8(f, 64) for f in files])


def quant_data(calib: str | os.PathLike, meta: dict[str, str], samples: int,
               heldout: str | os.PathLike | None = None) -> QuantData:
    """Calibration images and a disjoint held-out labelled set, normalized with the model's mean/std.

    ``heldout`` None: the built-in set's held-out seed when calibrating on it, else a stratified split of
    the calibration folder kept apart from calibration. Given ("builtin" or a folder): calibration uses
    every image under ``calib`` (labels not needed) and the held-out set comes from ``heldout``.
    """
    from edgecnn.runtimes.preprocess import normalize

    from .data import SYNTHETIC_CLASSES, image_folder, split, synthetic_dataset
    from .verify import N_DATA, SEED, make_inputs

    if samples < 1:
        raise InvalidInputError("--calib-samples must be >= 1")
    names, mean, std = model_classes_and_norm(meta)
    if heldout is None:
        heldout = "builtin" if str(calib) == "builtin" else None
    if heldout is None:
        ds = image_folder(calib)
        _check_classes(names, ds.class_names, str(calib))
        rest, held = split(ds, HELDOUT_FRACTION, seed=0)
        if len(held) < 10 or len(rest) < 1:
            raise InvalidInputError(f"{calib}: {len(ds)} images are too few for calibration plus a held-out split")
        idx = np.random.default_rng(0).permutation(len(rest))[:samples]
        cal = rest.subset(np.sort(idx)).images
        source = f"{calib} (held-out split of {len(held)} images, disjoint from calibration)"
    else:
        if str(calib) == "builtin":
            n = -(-samples // len(SYNTHETIC_CLASSES))
            cal = synthetic_dataset(per_class=n, seed=CALIB_SEED).images[:samples]
        else:
            cal = _loose_images(calib)[:samples]
        if str(heldout) == "builtin":
            _check_classes(names, list(SYNTHETIC_CLASSES), "the built-in set")
            held = synthetic_dataset(per_class=-(-N_DATA // len(SYNTHETIC_CLASSES)), seed=SEED)
            source = f"built-in set, seed {SEED} (the images verify judges on)"
        else:
            held = image_folder(heldout)
            _check_classes(names, held.class_names, str(heldout))
            source = str(heldout)
    inputs = make_inputs(mean, std, names, dataset=held, n_data=len(held))
    inputs.source = source
    return QuantData(normalize(cal, mean, std), inputs.batches["data"], inputs.labels, source, inputs)


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
            ["top-1 accuracy fp32", f"{self.acc_fp32 * 100:.2f}%"],
            [f"top-1 accuracy {self.precision} ({self.runtime})", f"{self.acc_quant * 100:.2f}%"],
            ["accuracy drop", f"{self.drop_points:+.2f} points (max allowed {self.max_drop:g})"],
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


def logits(runtime: str, path: str | os.PathLike, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Run ``path`` on ``runtime`` (fp32 compute setting; the file carries its own precision)."""
    from edgecnn.runtimes import load_runtime

    with load_runtime(runtime, path) as rt:
        if rt.input_shape[0] is not None:
            batch = rt.input_shape[0]
        return np.concatenate([rt.run(x[i:i + batch]) for i in range(0, len(x), batch)])


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
