"""Real JPEG photos for the bulk-prediction benchmark, made from images that installed packages ship.

scikit-learn's sample images (china.jpg, flower.jpg) and matplotlib's grace_hopper.jpg, cropped at random,
flipped, resized to 640x480 and re-encoded at several JPEG qualities, plus some PNGs. Nothing is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

QUALITIES = (60, 75, 85, 95)


def source_photos() -> list[Image.Image]:
    out = []
    try:
        from sklearn.datasets import load_sample_images

        out += [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            out.append(Image.open(f).convert("RGB"))
    except (ImportError, OSError):
        pass
    if not out:
        raise SystemExit("needs scikit-learn or matplotlib for real photos: pip install scikit-learn matplotlib")
    return out


def make_photos(folder: str | Path, n: int, seed: int = 0, png_every: int = 10) -> list[Path]:
    """n files in folder: 640x480 JPEGs (qualities 60-95) and every png_every-th a PNG."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    srcs = source_photos()
    paths = []
    for i in range(n):
        src = srcs[i % len(srcs)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = src.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if png_every and i % png_every == png_every - 1:
            p = folder / f"photo_{i:05d}.png"
            im.save(p)
        else:
            p = folder / f"photo_{i:05d}.jpg"
            im.save(p, quality=int(QUALITIES[i % len(QUALITIES)]))
        paths.append(p)
    return paths
