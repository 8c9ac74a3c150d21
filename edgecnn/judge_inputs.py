"""The judge's inputs and its reference: random and data-set images, normalized as told, and PyTorch's logits."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import numpy as np

# Default inputs, the same for every command: random normal inputs (outside the data distribution:
# they catch what data-set images do not exercise) and data-set images (the task-level figures).
N_RANDOM = 16
N_DATA = 300  # 50 per class of the built-in set: one image is 0.33 points of accuracy
SEED = 1234


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
