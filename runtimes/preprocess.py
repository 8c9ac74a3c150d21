"""Image preprocessing shared by training data, the CLI and the device Classifier (numpy + Pillow only)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgecnn.errors import InvalidInputError

INPUT_SIZE = 64
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)
# Pillow refuses images above this many pixels (decompression-bomb guard); 8k x 8k is plenty.
MAX_PIXELS = 8192 * 8192

ImageLike = str | os.PathLike | Image.Image | np.ndarray
# mean/std are on the 0..1 pixel scale; values this large are the 0..255 scale (58.4 for 0.229).
_MAX_NORM = 2.0


def check_norm(value, what: str, positive: bool = False, error: type[Exception] = InvalidInputError
               ) -> tuple[float, float, float]:
    """The one validator of a mean or std (every reader uses it, the bundle's copy too): three finite
    numbers on the 0..1 scale, std > 0. ``what`` names the field in the one-line ``error``."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    vals = tuple(float(v) for v in value) if ok else ()
    shown = str(list(value) if isinstance(value, tuple) else value)[:80]
    if not ok:
        raise error(f"{what} must be three numbers R,G,B, got {shown}")
    if not all(np.isfinite(vals)):
        raise error(f"{what} must be finite, got {shown}")
    if positive and min(vals) <= 0:
        raise error(f"{what} must be > 0, got {shown}")
    if max(abs(v) for v in vals) > _MAX_NORM:
        raise error(f"{what} {shown} looks like the 0..255 scale: give it on the 0..1 pixel scale (divide by 255, "
                    "e.g. 0.229, not 58.4)")
    return vals


def check_class_names(names, what: str, num_classes: int | None = None,
                      error: type[Exception] = InvalidInputError) -> tuple[str, ...]:
    """The one validator of class names: a non-empty list of strings, as many as the model's outputs when
    ``num_classes`` is given (a name with a line break is kept: every printer escapes it; --labels refuses it)."""
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise error(f"{what} must be a non-empty list of strings, got {str(names)[:80]}")
    if num_classes is not None and len(names) != num_classes:
        raise error(f"{what} names {len(names)} classes but the model outputs {num_classes}")
    return tuple(names)


def _open(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    p = Path(path)
    try:
        exists = p.is_file()
    except OSError as e:  # ENAMETOOLONG, EACCES on a parent, ...
        raise InvalidInputError(f"{p!s:.120}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not exists:
        raise InvalidInputError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InvalidInputError(f"{p}: image too large ({im.width}x{im.height})")
            if im.format == "PNG":
                png = _png_rgb8(p)
                if png is not None:
                    return png
            if draft and im.format == "JPEG":
                # libjpeg scales by 1/2, 1/4 or 1/8 while decoding (DCT domain), never below draft x draft.
                im.draft("RGB", (draft, draft))
            im.load()
            return im.copy()
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"{p}: {unreadable_reason(p, e)}") from None


# imagecodecs' libspng (the optional ``fast-decode`` extra) for 8-bit RGB PNGs on every path; False until looked
# up, None if missing. Its decode releases the GIL, so decode threads run it side by side (pyspng's does not).
_SPNG: object = False


def _spng_decode():
    global _SPNG
    if _SPNG is False:
        try:
            from imagecodecs import spng_decode
        except ImportError:  # not installed: Pillow decodes every PNG
            spng_decode = None
        _SPNG = spng_decode
    return _SPNG


def _png_chunks_ok(data: bytes) -> bool:
    """Every chunk of a PNG inside the file with its CRC right, ending in IEND (libspng as imagecodecs calls it
    does not refuse every damaged file that Pillow refuses: such a file goes to Pillow, which says why)."""
    view, pos, end = memoryview(data), 8, len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos:pos + 4], "big")
        if pos + 12 + length > end:
            return False
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != int.from_bytes(view[pos + 8 + length:pos + 12 + length], "big"):
            return False
        if view[pos + 4:pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return False


def _png_rgb8(path: Path) -> Image.Image | None:
    """An 8-bit RGB, non-interlaced PNG decoded by libspng (imagecodecs): PNG is lossless, so its pixels are
    Pillow's bit for bit; the decode took 4.7 ms against Pillow's 10-12 ms for a 640x480 photo. None, and
    Pillow decodes, for any other PNG, a damaged one, or without imagecodecs."""
    decode = _spng_decode()
    if decode is None:
        return None
    data = path.read_bytes()
    # IHDR right after the signature: bit depth 8, colour type 2 (RGB), interlace 0
    if len(data) < 33 or data[12:16] != b"IHDR" or data[24] != 8 or data[25] != 2 or data[28] != 0:
        return None
    if not _png_chunks_ok(data):
        return None
    try:
        a = decode(data)
    except Exception:  # noqa: BLE001 - imagecodecs' own error types: Pillow's path says what is wrong
        return None
    if a.dtype != np.uint8 or a.shape != (int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"), 3):
        return None
    return Image.fromarray(a)  # uint8 HxWx3: RGB


# simplejpeg (the optional ``fast-decode`` extra) for --fast-decode; False until first looked up, None if missing.
_SIMPLEJPEG: object = False


def _simplejpeg():
    global _SIMPLEJPEG
    if _SIMPLEJPEG is False:
        try:
            import simplejpeg
        except ImportError:  # not installed (a bundle's device may lack it): Pillow's draft mode instead
            simplejpeg = None
        _SIMPLEJPEG = simplejpeg
    return _SIMPLEJPEG


def _open_fast(path: str | os.PathLike, size: int) -> Image.Image:
    """A JPEG file decoded at a reduced scale in the DCT: simplejpeg when installed (libjpeg-turbo picks the
    smallest n/8 scale that keeps both sides >= 2 * ``size``: 3/8 for 640x480), else Pillow's draft mode (1/2,
    1/4 or 1/8, never below 2 * ``size``). Anything simplejpeg does not take (not a JPEG, CMYK, too large,
    damaged, unreadable) goes through Pillow's path, so its reasons are the exact path's own words."""
    sj = _simplejpeg()
    if sj is not None:
        try:
            with open(path, "rb") as f:
                data = f.read(2)
                if data == b"\xff\xd8":  # a JPEG's start-of-image marker: only then the whole file
                    data += f.read()
            if data[:2] == b"\xff\xd8":
                h, w, colorspace, _ = sj.decode_jpeg_header(data)
                if w * h <= MAX_PIXELS and colorspace in ("YCbCr", "Gray"):
                    return Image.fromarray(sj.decode_jpeg(data, colorspace="RGB", min_width=2 * size,
                                                          min_height=2 * size))  # uint8 HxWx3: RGB
        except (OSError, ValueError):  # Pillow's path below says why, in the exact path's words
            pass
    return _open(path, 2 * size)


def unreadable_reason(path: str | os.PathLike | None, e: BaseException) -> str:
    """Why an image could not be read, in words (never a bare exception name)."""
    msg = str(e)
    try:
        size = os.path.getsize(path) if path is not None else None
    except OSError:
        size = None
    if size == 0:
        return "empty file (0 bytes)"
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (decompression-bomb guard)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image file Pillow can read (unknown or damaged format)"
    if "truncated" in msg.lower() or "premature end" in msg.lower():
        fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") if path is not None else ""
        return f"truncated {fmt or 'image'} file (it ends before the image data does)"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot read it ({e.strerror})"
    first = msg.splitlines()[0][:120] if msg else ""
    return f"damaged image data ({first})" if first else "damaged image data"


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or 0 in a.shape:
        raise InvalidInputError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise InvalidInputError(f"image array must be uint8 (0-255), got {a.dtype}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(a[:, :, :3]), mode="RGB")


def to_rgb_uint8(image: ImageLike, size: int = INPUT_SIZE, fast_jpeg: bool = False) -> np.ndarray:
    """Any supported image (path, PIL image, uint8 array) -> uint8 array (size, size, 3), RGB.

    Mode conversions: grayscale is replicated, alpha is dropped (composited on black by Pillow's
    RGB conversion), palette and 16-bit images are converted by Pillow. Resizing is bilinear.
    ``fast_jpeg``: a JPEG file is decoded at a reduced scale in the DCT, never below twice ``size`` (simplejpeg
    when installed, else Pillow's draft mode; see ``_open_fast``) before the same resize: 2-3x faster, close to
    but not bit-identical with the exact path. Without it the path is Pillow's full decode, always.
    """
    if isinstance(image, np.ndarray):
        im = _from_array(image)
    elif isinstance(image, Image.Image):
        im = image
    elif isinstance(image, (str, os.PathLike)):
        # Twice the input size: at 1x (1/4 scale for 640x480) top-1 agreement with the exact path was 97-98% on
        # real photos, at 2x (3/8 or 1/2 scale) >= 99%, still 2-3x faster than a full decode
        # (benchmarks/bulk_predict.py's decoder survey).
        im = _open_fast(image, size) if fast_jpeg else _open(image)
    else:
        raise InvalidInputError(f"unsupported image type {type(image).__name__}")
    if im.width == 0 or im.height == 0:
        raise InvalidInputError("empty image (0 pixels)")
    if im.mode == "F" and not np.isfinite(np.asarray(im, dtype=np.float32)).all():
        raise InvalidInputError("the image has NaN or Inf pixel values")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] then (x - mean) / std."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(
    images: Sequence[ImageLike],
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    size: int = INPUT_SIZE,
) -> np.ndarray:
    """A list of images -> float32 batch (N, 3, size, size) ready for a runtime."""
    return normalize(to_batch_uint8(images, size), mean, std)


def to_batch_uint8(images: Sequence[ImageLike], size: int = INPUT_SIZE) -> np.ndarray:
    """A list of images -> uint8 batch (N, size, size, 3), RGB: the input of a model with embedded preprocessing."""
    if len(images) == 0:
        raise InvalidInputError("no images given")
    return np.stack([to_rgb_uint8(im, size) for im in images])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
