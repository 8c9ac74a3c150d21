"""Classifier: raw images in, top-k labels out, on any registered runtime. Torch-free."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgecnn.errors import InvalidInputError, InvalidModelError

from .base import Runtime, load_runtime
from .preprocess import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    ImageLike,
    check_class_names,
    check_norm,
    normalize,
    softmax,
    to_batch_uint8,
)


@dataclass(frozen=True)
class ModelInfo:
    """What the device needs to know about a model, read from its metadata."""

    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int

    @classmethod
    def from_metadata(cls, meta: dict[str, str], num_classes: int, input_size: int) -> ModelInfo:
        names, mean, std = metadata_norm(meta, num_classes)
        return cls(names or tuple(f"class_{i}" for i in range(num_classes)), mean, std, input_size)


def metadata_norm(meta: dict[str, str], num_classes: int | None = None
                  ) -> tuple[tuple[str, ...] | None, tuple[float, ...], tuple[float, ...]]:
    """(class names or None, mean, std) from a model's metadata, through the one validator (defaults where
    absent); InvalidModelError naming the field when present but malformed."""
    try:
        names = json.loads(meta["class_names"]) if "class_names" in meta else None
        mean = json.loads(meta["mean"]) if "mean" in meta else DEFAULT_MEAN
        std = json.loads(meta["std"]) if "std" in meta else DEFAULT_STD
    except json.JSONDecodeError as e:
        raise InvalidModelError(f"model metadata is not valid JSON: {e}") from None
    if names is not None:
        names = check_class_names(names, "model metadata class_names", num_classes, InvalidModelError)
    return (names, check_norm(mean, "model metadata mean", error=InvalidModelError),
            check_norm(std, "model metadata std", positive=True, error=InvalidModelError))


def assumed_fields(meta: dict[str, str]) -> list[str]:
    """What the export assumed rather than knew ("labels", "normalization"), as its metadata records it."""
    return [k for k in ("labels", "normalization") if meta.get(f"{k}_source") == "assumed"]


class AssumedMetadataWarning(UserWarning):
    """The model's labels or normalization were assumed at export, not known."""


_WARNED: set[str] = set()


class Classifier:
    """A model on a runtime, with the model's own preprocessing and labels.

    >>> clf = Classifier("model.onnx", runtime="ort-cpu")
    >>> clf.classify(["cat.png"], top_k=3)   # [[("circle", 0.98), ...]]
    """

    def __init__(self, model_path: str | os.PathLike, runtime: str | None = None, **options):
        """``model_path``: a model file, a deploy.json from `edgecnn tune` or a bundle folder from `edgecnn
        package` (its runtime and settings apply; ``runtime`` and options given here override them, and
        ``override_notes`` says which). A plain model file runs on ort-cpu unless ``runtime`` says otherwise."""
        from .deploy import resolve

        self.deployable, self.override_notes = resolve(model_path).override(runtime, options)
        d = self.deployable
        self.runtime: Runtime = load_runtime(d.runtime, d.model, **d.load_kwargs())
        _, _, h, w = self.runtime.input_shape
        if h != w:
            raise InvalidModelError(f"{model_path}: expected a square input, got {h}x{w}")
        probe = self.runtime.run(self.runtime.dummy_input())
        num_classes = probe.shape[-1]
        meta = self.runtime.metadata()
        self.info = ModelInfo.from_metadata(meta, num_classes, h)
        # What the export assumed (a bare state_dict, no --labels/--mean/--std): said once per model file.
        self.assumed = assumed_fields(meta)
        if self.assumed and str(d.model) not in _WARNED:
            _WARNED.add(str(d.model))
            warnings.warn(self.assumption_note, AssumedMetadataWarning, stacklevel=2)
        # Models exported with --embed-preprocessing take uint8 RGB pixels (N, H, W, 3) and may end in Softmax.
        self.embedded_preprocessing = self.runtime.input_layout == "NHWC-uint8"
        self.embedded_softmax = meta.get("embedded_softmax") == "1"
        if self.embedded_softmax:
            self._check_probabilities(probe)

    @property
    def assumption_note(self) -> str:
        """One line naming what the export assumed ("" when nothing was)."""
        if not self.assumed:
            return ""
        parts = []
        if "labels" in self.assumed:
            parts.append(f"labels {', '.join(self.info.class_names[:4])}{', ...' if len(self.info.class_names) > 4 else ''}")
        if "normalization" in self.assumed:
            parts.append(f"mean {','.join(f'{v:g}' for v in self.info.mean)} std "
                         f"{','.join(f'{v:g}' for v in self.info.std)}")
        return (f"{self.runtime.model_path.name} was exported with assumed {' and '.join(parts)} (its checkpoint "
                "carried none): re-export with --labels/--mean/--std if those are not the training values")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images -> the model's input: float32 (N, 3, H, W) normalized, or uint8 (N, H, W, 3) when embedded."""
        return self.model_input(to_batch_uint8(images, self.info.input_size))

    def model_input(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) at the input size -> what the model takes (normalized, unless embedded)."""
        return rgb if self.embedded_preprocessing else normalize(rgb, self.info.mean, self.info.std)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W), already normalized -> logits (N, C) (uint8 (N, H, W, 3) if embedded)."""
        return self.runtime.run(batch)

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def probabilities(self, images: Sequence[ImageLike]) -> np.ndarray:
        return self.probabilities_from_pixels(to_batch_uint8(self._as_list(images), self.info.input_size))

    def probabilities_from_pixels(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) already at the model's input size (``to_rgb_uint8``) -> probabilities (N, C).

        The second half of ``probabilities``: the bulk pipeline decodes in parallel, then calls this.
        """
        out = self.run(self.model_input(rgb))
        if not self.embedded_softmax:
            return softmax(out)
        self._check_probabilities(out)
        return out

    def _check_probabilities(self, out: np.ndarray) -> None:
        """The metadata says the graph ends in Softmax: its outputs must be probabilities, or it is lying."""
        if out.min() < -1e-6 or out.max() > 1 + 1e-6 or np.abs(out.sum(axis=1) - 1).max() > 1e-3:
            raise InvalidModelError(f"{self.runtime.model_path}: its metadata says the graph ends in Softmax, "
                                    "but its outputs are not probabilities")

    def classify(self, images: Sequence[ImageLike] | ImageLike, top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Images (paths, PIL images, uint8 HWC arrays) -> per image, the top_k (label, probability)."""
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
        probs = self.probabilities(images)
        k = min(top_k, probs.shape[1])
        out = []
        for p in probs:
            idx = np.argsort(-p, kind="stable")[:k]
            out.append([(self.info.class_names[i], float(p[i])) for i in idx])
        return out

    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            return [images]
        if hasattr(images, "convert") and hasattr(images, "size"):  # a single PIL image
            return [images]
        return list(images)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
