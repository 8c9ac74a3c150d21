"""--fast-decode: JPEGs decoded at a reduced scale by simplejpeg (the fast-decode extra), Pillow's draft mode
without it, the exact path's own reasons for bad files either way, and the exact path untouched."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgecnn.runtimes import Classifier
from edgecnn.runtimes.pipeline import decode_many
from PIL import Image

from edgecnn.errors import InvalidInputError

pp = importlib.import_module("edgecnn.runtimes.preprocess")  # the package exports a function of that name too
simplejpeg = pytest.importorskip("simplejpeg")  # in the test extra: CI always has it

SIZE = 64


def _photo(seed: int) -> Image.Image:
    """A 640x480 crop of a real photo (matplotlib's grace_hopper.jpg, in the test extra)."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        src = Image.open(f).convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = src.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return src.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.BICUBIC)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("fast_decode")
    out = []
    for i in range(6):
        p = d / f"photo_{i}.jpg"
        _photo(i).save(p, quality=(60, 75, 85, 95)[i % 4])
        out.append(p)
    return out


@pytest.fixture()
def without_simplejpeg(monkeypatch):
    """simplejpeg not importable, as on a device that lacks the extra (and the module's cache forgotten)."""
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    monkeypatch.setattr(pp, "_SIMPLEJPEG", False)
    assert pp._simplejpeg() is None


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch):
    monkeypatch.setattr(pp, "_SIMPLEJPEG", False)  # every test looks simplejpeg up again


def _pillow_full(p) -> np.ndarray:
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))


def _pillow_draft(p) -> np.ndarray:
    with Image.open(p) as im:
        im.draft("RGB", (2 * SIZE, 2 * SIZE))
        return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))


def _simplejpeg_reduced(p) -> np.ndarray:
    a = simplejpeg.decode_jpeg(Path(p).read_bytes(), colorspace="RGB", min_width=2 * SIZE, min_height=2 * SIZE)
    return np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR))


def test_simplejpeg_is_used_when_installed_and_lands_close_to_the_exact_path(photos, trained):
    assert pp._simplejpeg() is simplejpeg
    # libjpeg-turbo's smallest n/8 scale that keeps both sides >= 2 x 64 for 640x480: 3/8, 240x180
    assert simplejpeg.decode_jpeg(photos[0].read_bytes(), colorspace="RGB", min_width=128,
                                  min_height=128).shape == (180, 240, 3)
    fast = np.stack([pp.to_rgb_uint8(p, SIZE, fast_jpeg=True) for p in photos])
    exact = np.stack([pp.to_rgb_uint8(p, SIZE) for p in photos])
    for p, f in zip(photos, fast, strict=True):
        assert np.array_equal(f, _simplejpeg_reduced(p))  # simplejpeg's pixels, then the same resize
        assert not np.array_equal(f, _pillow_draft(p))  # not Pillow's draft (1/2 scale)
    mad = np.abs(fast.astype(int) - exact).mean(axis=(1, 2, 3))
    assert mad.max() < 1.5, mad
    with Classifier(trained.onnx_dynamic) as clf:
        pe, pf = clf.probabilities_from_pixels(exact), clf.probabilities_from_pixels(fast)
    np.testing.assert_array_equal(pe.argmax(1), pf.argmax(1))
    assert np.abs(pe - pf).max() < 0.05


def test_without_simplejpeg_fast_decode_is_pillows_draft_mode(photos, without_simplejpeg):
    for p in photos[:3]:
        fast = pp.to_rgb_uint8(p, SIZE, fast_jpeg=True)
        assert np.array_equal(fast, _pillow_draft(p))
        assert np.abs(fast.astype(int) - _pillow_full(p)).mean() < 1.5


def test_the_exact_path_is_pillows_full_decode_bit_for_bit_with_or_without_simplejpeg(photos, trained, monkeypatch):
    with Classifier(trained.onnx_dynamic) as clf:
        probs = clf.probabilities([str(p) for p in photos])
        top = clf.classify([str(p) for p in photos], top_k=1)
        px = np.stack([pp.to_rgb_uint8(p, SIZE) for p in photos])
        for p, x in zip(photos, px, strict=True):
            assert np.array_equal(x, _pillow_full(p))
        np.testing.assert_array_equal(probs, clf.probabilities_from_pixels(px))
        assert [t[0][1] for t in top] == [float(v) for v in probs.max(1)]
        monkeypatch.setitem(sys.modules, "simplejpeg", None)
        monkeypatch.setattr(pp, "_SIMPLEJPEG", False)
        np.testing.assert_array_equal(px, np.stack([pp.to_rgb_uint8(p, SIZE) for p in photos]))
        np.testing.assert_array_equal(probs, clf.probabilities([str(p) for p in photos]))


def _bad_files(d: Path, good: Path) -> list[Path]:
    whole = good.read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("I am text, not a JPEG\n")
    (d / "soi_only.jpg").write_bytes(b"\xff\xd8\xff")  # starts like a JPEG, nothing after
    (d / "a_folder.jpg").mkdir()
    return [d / n for n in ("truncated.jpg", "empty.jpg", "text.jpg", "soi_only.jpg", "a_folder.jpg",
                            "missing.jpg")]


def _reason(p, fast: bool) -> str:
    with pytest.raises(InvalidInputError) as e:
        pp.to_rgb_uint8(p, SIZE, fast_jpeg=fast)
    return str(e.value)


@pytest.mark.parametrize("hide", [False, True], ids=["simplejpeg", "no simplejpeg"])
def test_damaged_files_give_the_exact_paths_reasons(tmp_path, photos, monkeypatch, hide):
    if hide:
        monkeypatch.setitem(sys.modules, "simplejpeg", None)
    bad = _bad_files(tmp_path, photos[0])
    reasons = {p.name: _reason(p, False) for p in bad}
    assert reasons["truncated.jpg"].endswith("truncated JPEG file (it ends before the image data does)")
    assert reasons["empty.jpg"].endswith("empty file (0 bytes)")
    assert reasons["missing.jpg"].endswith("no such image file")
    assert {p.name: _reason(p, True) for p in bad} == reasons
    # and through the pipeline's decoder, as `edgecnn predict --fast-decode` writes them in the error column
    paths = [str(photos[1]), *map(str, bad)]
    px_e, err_e = decode_many(paths, SIZE, False)
    px_f, err_f = decode_many(paths, SIZE, True)
    assert err_e == err_f and err_e[0] is None and all(err_e[1:])
    assert np.abs(px_f[0].astype(int) - px_e[0]).mean() < 1.5


def test_too_large_keeps_the_same_guard_and_words(photos, monkeypatch):
    monkeypatch.setattr(pp, "MAX_PIXELS", 640 * 480 - 1)
    assert _reason(photos[0], True) == _reason(photos[0], False) == f"{photos[0]}: image too large (640x480)"


def test_a_png_and_a_grayscale_and_a_cmyk_jpeg_through_fast_decode(tmp_path, photos):
    im = _photo(3)
    im.save(tmp_path / "photo.png")
    png = tmp_path / "photo.png"
    assert np.array_equal(pp.to_rgb_uint8(png, SIZE, fast_jpeg=True), pp.to_rgb_uint8(png, SIZE))
    (tmp_path / "jpeg_named.png").write_bytes(photos[0].read_bytes())  # a JPEG whatever its name says
    assert np.array_equal(pp.to_rgb_uint8(tmp_path / "jpeg_named.png", SIZE, fast_jpeg=True),
                          pp.to_rgb_uint8(photos[0], SIZE, fast_jpeg=True))

    gray = tmp_path / "gray.jpg"
    im.convert("L").save(gray, quality=85)
    assert simplejpeg.decode_jpeg_header(gray.read_bytes())[2] == "Gray"
    g = pp.to_rgb_uint8(gray, SIZE, fast_jpeg=True)
    assert g.shape == (SIZE, SIZE, 3) and g.dtype == np.uint8
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])  # replicated
    assert np.array_equal(g, _simplejpeg_reduced(gray))
    assert np.abs(g.astype(int) - pp.to_rgb_uint8(gray, SIZE)).mean() < 1.5

    cmyk = tmp_path / "cmyk.jpg"  # simplejpeg's CMYK -> RGB is not Pillow's: Pillow's draft path instead
    im.convert("CMYK").save(cmyk, quality=90)
    assert simplejpeg.decode_jpeg_header(cmyk.read_bytes())[2] == "CMYK"
    c = pp.to_rgb_uint8(cmyk, SIZE, fast_jpeg=True)
    assert np.array_equal(c, _pillow_draft(cmyk))
    assert np.abs(c.astype(int) - pp.to_rgb_uint8(cmyk, SIZE)).mean() < 2.0


def test_the_bundles_copy_works_without_simplejpeg(tmp_path, photos):
    """edgecnn package copies this module into bundles; a device without simplejpeg gets Pillow's draft mode."""
    from edgecnn.package import PREPROCESS_FILE, preprocess_source

    (tmp_path / PREPROCESS_FILE).write_text(preprocess_source(), encoding="utf-8")
    np.save(tmp_path / "want.npy", _pillow_draft(photos[0]))
    code = (f"import sys; sys.modules['simplejpeg'] = None; sys.path.insert(0, {str(tmp_path)!r})\n"
            "import numpy as np, edgecnn_preprocess as pp\n"
            f"a = pp.to_rgb_uint8({str(photos[0])!r}, 64, fast_jpeg=True)\n"
            f"assert pp._simplejpeg() is None and np.array_equal(a, np.load({str(tmp_path / 'want.npy')!r}))\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_fast_decode_of_jpeg_bytes_in_memory_is_not_changed(photos):
    """A PIL image or an array given directly is already decoded: fast_jpeg changes nothing for it."""
    im = Image.open(io.BytesIO(photos[0].read_bytes()))
    assert np.array_equal(pp.to_rgb_uint8(im, SIZE, fast_jpeg=True), pp.to_rgb_uint8(im, SIZE))
    a = np.asarray(Image.open(photos[0]).convert("RGB"))
    assert np.array_equal(pp.to_rgb_uint8(a, SIZE, fast_jpeg=True), pp.to_rgb_uint8(a, SIZE))
