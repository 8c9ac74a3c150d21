"""8-bit RGB PNGs decoded by libspng (imagecodecs) give Pillow's pixels bit for bit; every other PNG, and every
damaged one, is Pillow's, with Pillow's reasons. No torch."""

from __future__ import annotations

import importlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pp = importlib.import_module("edgecnn.runtimes.preprocess")
spng_decode = pytest.importorskip("imagecodecs").spng_decode
from edgecnn.errors import InvalidInputError  # noqa: E402


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(path, a: np.ndarray, depth: int) -> None:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): filter 0 rows, one IDAT."""
    h, w, _ = a.shape
    rows = a.astype(">u2" if depth == 16 else np.uint8).tobytes()
    stride = len(rows) // h
    raw = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def _variants(tmp_path) -> dict:
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:120, 0:160]
    smooth = np.stack([xx * 255 // 159, yy * 255 // 119, (xx + yy) % 256], -1).astype(np.uint8)
    out = {}

    def save(name, im, **kw):
        out[name] = tmp_path / f"{name}.png"
        im.save(out[name], "PNG", **kw)

    save("rgb8 noise", Image.fromarray(noise))
    save("rgb8 smooth, optimized", Image.fromarray(smooth), optimize=True)
    save("rgb8 stored", Image.fromarray(smooth), compress_level=0)
    save("rgb8 with tRNS", Image.fromarray(noise), transparency=(1, 2, 3))
    save("rgba", Image.fromarray(np.dstack([noise, noise[:, :, :1]])))
    save("gray", Image.fromarray(noise[:, :, 0]))
    save("palette", Image.fromarray(smooth).convert("P", palette=Image.Palette.ADAPTIVE))
    save("gray 16-bit", Image.fromarray(rng.integers(0, 65536, (40, 50), dtype=np.uint16)))
    out["rgb 16-bit"] = tmp_path / "rgb16.png"
    _raw_png(out["rgb 16-bit"], rng.integers(0, 65536, (30, 20, 3)), 16)
    out["rgb8 by hand"] = tmp_path / "rgb8hand.png"
    _raw_png(out["rgb8 by hand"], noise, 8)
    return out


def _both(path, monkeypatch):
    """to_rgb_uint8(path) with libspng, then without: each a (kind, value) pair."""
    got = []
    for decode in (spng_decode, None):
        monkeypatch.setattr(pp, "_SPNG", decode)
        try:
            got.append(("ok", pp.to_rgb_uint8(path)))
        except InvalidInputError as e:
            got.append(("error", str(e)))
    return got


def test_pngs_decode_to_pillows_pixels_and_only_8_bit_rgb_takes_libspng(tmp_path, monkeypatch):
    for name, path in _variants(tmp_path).items():
        (k1, a), (k2, b) = _both(path, monkeypatch)
        assert k1 == k2 == "ok", name
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (64, 64, 3), name
        assert np.array_equal(a, b), name
        monkeypatch.setattr(pp, "_SPNG", spng_decode)
        took = pp._png_rgb8(path)
        assert (took is not None) == name.startswith("rgb8"), name
        if took is not None:  # the full-size pixels too, before the resize
            with Image.open(path) as im:
                assert np.array_equal(np.asarray(took), np.asarray(im.convert("RGB"))), name


@pytest.mark.parametrize("damage", ["a flipped IDAT byte", "truncated", "no IEND", "bad IHDR CRC"])
def test_a_damaged_png_gets_pillows_answer_with_or_without_libspng(tmp_path, monkeypatch, damage):
    path = _variants(tmp_path)["rgb8 noise"]
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    if damage == "a flipped IDAT byte":
        data[idat + 40] ^= 0xFF
    elif damage == "truncated":
        data = data[: idat + 200]
    elif damage == "no IEND":
        data = data[: data.index(b"IEND") - 4]
    else:
        data[29] ^= 0xFF  # IHDR's CRC
    path.write_bytes(bytes(data))
    monkeypatch.setattr(pp, "_SPNG", spng_decode)
    assert pp._png_rgb8(path) is None  # never libspng's reading of a damaged file
    (k1, a), (k2, b) = _both(path, monkeypatch)
    assert k1 == k2
    if k1 == "ok":
        assert np.array_equal(a, b)
    else:
        assert a == b
