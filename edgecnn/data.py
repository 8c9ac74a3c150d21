"""Data sets: a built-in synthetic one (deterministic, no download) and image folders root/<class>/<image>."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgecnn.runtimes.preprocess import INPUT_SIZE, normalize, to_rgb_uint8

from .errors import InvalidInputError
from .labels import folder_classes

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "cross", "stripes", "checker")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, 64, 64, 3), RGB
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.images[idx], self.labels[idx], self.class_names)

    def tensors(self, mean, std) -> np.ndarray:
        """float32 (N, 3, 64, 64) through the same normalization the device uses."""
        return normalize(self.images, mean, std)

    def mean_std(self) -> tuple[list[float], list[float]]:
        x = self.images.reshape(-1, 3).astype(np.float64) / 255.0
        std = np.maximum(x.std(axis=0), 1e-3)
        return [round(float(v), 4) for v in x.mean(axis=0)], [round(float(v), 4) for v in std]


def _color(rng: np.random.Generator, far_from: np.ndarray | None = None) -> tuple[int, int, int]:
    for _ in range(50):
        c = rng.integers(0, 256, size=3)
        if far_from is None or np.abs(c - far_from).sum() > 240:
            break
    return tuple(int(v) for v in c)


def _rotated(points, cx, cy, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def _draw_sample(cls: str, rng: np.random.Generator, size: int = INPUT_SIZE) -> np.ndarray:
    s = size * 2  # draw at 2x, then downsample: smooth edges
    bg = np.array(_color(rng))
    fg = _color(rng, far_from=bg)
    im = Image.new("RGB", (s, s), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.36) * s
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12, size=2) * s
    ang = rng.uniform(0, 2 * math.pi)
    if cls == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif cls == "square":
        d.polygon(_rotated([(-r, -r), (r, -r), (r, r), (-r, r)], cx, cy, ang), fill=fg)
    elif cls == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        d.polygon(_rotated(pts, cx, cy, ang), fill=fg)
    elif cls == "cross":
        w = r * rng.uniform(0.25, 0.4)
        for pts in ([(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]):
            d.polygon(_rotated(pts, cx, cy, ang), fill=fg)
    elif cls in ("stripes", "checker"):
        period = rng.uniform(0.1, 0.22) * s
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
        u = xx * math.cos(ang) + yy * math.sin(ang)
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        on = (np.floor(u / period) % 2).astype(bool)
        if cls == "checker":
            on ^= (np.floor(v / period) % 2).astype(bool)
        arr = np.where(on[..., None], np.array(fg), bg).astype(np.uint8)
        im = Image.fromarray(arr, "RGB")
    else:  # pragma: no cover - guarded by SYNTHETIC_CLASSES
        raise ValueError(cls)
    arr = np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32)
    arr += rng.normal(0, rng.uniform(2, 12), size=arr.shape)  # sensor noise
    arr += np.linspace(0, rng.uniform(-30, 30), size)[None, :, None]  # lighting gradient
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def synthetic_dataset(per_class: int = 300, seed: int = 0) -> Dataset:
    """The built-in set: len(SYNTHETIC_CLASSES) classes of 64x64 RGB shapes/textures, from ``seed``."""
    if per_class < 1:
        raise InvalidInputError("per_class must be >= 1")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(per_class):
        for c, name in enumerate(SYNTHETIC_CLASSES):
            images.append(_draw_sample(name, rng))
            labels.append(c)
    return Dataset(np.stack(images), np.asarray(labels, np.int64), list(SYNTHETIC_CLASSES))


def image_folder(root: str | os.PathLike, size: int = INPUT_SIZE) -> Dataset:
    """root/<class>/<image>: every readable image, resized to size x size RGB; classes sorted by name."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder root/<class>/<image>" if root.exists() else "no such file or folder"
        raise InvalidInputError(f"{root}: {what}")
    classes = folder_classes(root)
    if len(classes) < 2:
        raise InvalidInputError(f"{root}: expected at least 2 class folders (root/<class>/<image>), found {len(classes)}")
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InvalidInputError(f"{root / name}: no images (png/jpeg) in this class folder")
        for f in files:
            images.append(to_rgb_uint8(f, size))
            labels.append(c)
    return Dataset(np.stack(images), np.asarray(labels, np.int64), classes)


def load_dataset(data: str | os.PathLike | None, per_class: int = 300, seed: int = 0) -> Dataset:
    return synthetic_dataset(per_class, seed) if data is None else image_folder(data)


def split(ds: Dataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified train/validation split, reproducible from ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInputError("val_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed + 1)
    train_idx, val_idx = [], []
    for c in range(len(ds.class_names)):
        idx = np.flatnonzero(ds.labels == c)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return ds.subset(np.sort(np.asarray(train_idx))), ds.subset(np.sort(np.asarray(val_idx, dtype=np.int64)))
