"""Hostile and broken inputs: external data escapes, newer IR/opset, odd images, crashes mid-write,
threads, and isolation of native crashes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from edgecnn.runtimes import Classifier, load_runtime, preprocess
from edgecnn.runtimes.onnx_guard import external_data_locations
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from edgecnn.data import synthetic_dataset
from edgecnn.errors import InvalidInputError, InvalidModelError


# ------------------------------------------------------------------------------ external data
@pytest.fixture()
def external_model(trained, tmp_path):
    """The trained model saved with its weights in model.data beside it (a legitimate layout)."""
    d = tmp_path / "m"
    d.mkdir()
    m = onnx.load(str(trained.onnx_dynamic))
    onnx.save(m, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.data", size_threshold=0)
    return d / "model.onnx"


def _set_location(model_path, location):
    m = onnx.load(str(model_path), load_external_data=False)
    for init in m.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(model_path))


def test_legit_external_data_loads_and_matches(trained, external_model):
    assert set(external_data_locations(external_model)) == {"model.data"}
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with load_runtime("ort-cpu", external_model) as a, load_runtime("ort-cpu", trained.onnx_dynamic) as b:
        np.testing.assert_array_equal(a.run(x), b.run(x))


def test_external_data_escapes_are_refused(external_model, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes((external_model.parent / "model.data").read_bytes())
    cases = {
        "../secret.bin": "leaves the model's folder",
        str(secret): "absolute path",
        "sub/../../secret.bin": "leaves the model's folder",
    }
    for loc, match in cases.items():
        _set_location(external_model, loc)
        with pytest.raises(InvalidModelError, match=match):
            load_runtime("ort-cpu", external_model)
    # a symlink inside the folder that points outside
    os.symlink(secret, external_model.parent / "link.data")
    _set_location(external_model, "link.data")
    with pytest.raises(InvalidModelError, match="symlink"):
        load_runtime("ort-cpu", external_model)
    # a hardlink to a file elsewhere
    os.link(secret, external_model.parent / "hard.data")
    _set_location(external_model, "hard.data")
    with pytest.raises(InvalidModelError, match="hardlink"):
        load_runtime("ort-cpu", external_model)


def test_external_data_refusal_from_the_cli(external_model, tmp_path):
    _set_location(external_model, "../../../../etc/passwd")
    r = subprocess.run([sys.executable, "-m", "edgecnn", "predict", str(external_model), "x.png"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "leaves the model's folder" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ newer IR / opset, odd inputs
def _edited(trained, tmp_path, edit, name="edited.onnx"):
    m = onnx.load(str(trained.onnx))
    edit(m)
    p = tmp_path / name
    p.write_bytes(m.SerializeToString())
    return p


def test_newer_ir_and_opset_are_refused_in_one_line(trained, tmp_path):
    def ir(m):
        m.ir_version = 99

    def opset(m):
        m.opset_import[0].version = 99

    for edit in (ir, opset):
        with pytest.raises(InvalidModelError) as ei:
            load_runtime("ort-cpu", _edited(trained, tmp_path, edit))
        assert "\n" not in str(ei.value) and "cannot load" in str(ei.value)


def test_wrong_input_dtype_and_rank_are_refused(trained, tmp_path):
    def to_double(m):
        m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE

    with pytest.raises(InvalidModelError):
        load_runtime("ort-cpu", _edited(trained, tmp_path, to_double))


def test_other_input_name_is_handled(trained, tmp_path):
    def rename(m):
        old = m.graph.input[0].name
        m.graph.input[0].name = "images"
        for n in m.graph.node:
            n.input[:] = ["images" if i == old else i for i in n.input]

    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with load_runtime("ort-cpu", _edited(trained, tmp_path, rename)) as a, load_runtime("ort-cpu", trained.onnx) as b:
        np.testing.assert_array_equal(a.run(x), b.run(x))


# ------------------------------------------------------------------------------ images
def test_image_modes_are_converted(tmp_path):
    rgb = synthetic_dataset(1, seed=0).images[0]
    im = Image.fromarray(rgb)
    im.save(tmp_path / "rgb.png")
    im.convert("RGBA").save(tmp_path / "rgba.png")
    im.convert("P").save(tmp_path / "pal.png")
    im.convert("L").save(tmp_path / "gray.png")
    g16 = (np.asarray(im.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "gray16.png")
    x = preprocess([tmp_path / n for n in ("rgb.png", "rgba.png", "pal.png", "gray.png", "gray16.png")])
    assert x.shape == (5, 3, 64, 64) and np.isfinite(x).all()
    np.testing.assert_array_equal(x[0], x[1])  # opaque RGBA == RGB
    np.testing.assert_allclose(x[3], x[4], atol=0.05)  # 16-bit gray scaled down like 8-bit gray


def test_bad_images_are_refused(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    for n in ("zero.png", "text.jpg", "trunc.png", "missing.png"):
        with pytest.raises(InvalidInputError, match=n):
            preprocess([tmp_path / n])
    with pytest.raises(InvalidInputError):
        preprocess([tmp_path])  # a directory


def test_huge_image_is_refused(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")
    with pytest.raises(InvalidInputError, match="too large"):
        preprocess([tmp_path / "huge.png"])


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 90), st.integers(1, 90), st.sampled_from([1, 3, 4]))))
def test_preprocess_properties(img):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = preprocess([img], mean, std)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32 and np.isfinite(x).all()
    lo = (0 - np.asarray(mean)) / np.asarray(std)
    hi = (1 - np.asarray(mean)) / np.asarray(std)
    for c in range(3):
        assert lo[c] - 1e-5 <= x[0, c].min() and x[0, c].max() <= hi[c] + 1e-5
    np.testing.assert_array_equal(x, preprocess([img.copy()], mean, std))  # deterministic


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 255), st.integers(1, 80), st.integers(1, 80))
def test_constant_images_stay_constant(v, h, w):
    x = preprocess([np.full((h, w, 3), v, np.uint8)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    np.testing.assert_allclose(x, (v / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.just(3), st.just(64), st.just(64)),
              elements=st.floats(-1e6, 1e6, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])))
def test_run_never_passes_non_finite_inputs(trained_runtime, x):
    if np.isfinite(x).all():
        assert trained_runtime.run(x).shape == (len(x), 6)  # finite inputs of any size are accepted
    else:
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            trained_runtime.run(x)


@pytest.fixture(scope="module")
def trained_runtime(trained):
    rt = load_runtime("ort-cpu", trained.onnx_dynamic)
    yield rt
    rt.close()


# ------------------------------------------------------------------------------ crash mid-write
KILL_MID_WRITE = textwrap.dedent("""
    import io, os, signal, sys
    import onnx, torch
    target_dir = os.path.abspath(sys.argv[1])
    real = {"onnx.save": onnx.save, "onnx.save_model": onnx.save_model, "torch.save": torch.save}

    def half_then_die(data: bytes, f):
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def beside_target(f):
        return isinstance(f, (str, os.PathLike)) and os.path.dirname(os.path.abspath(f)) == target_dir

    def onnx_writer(name):
        def w(m, f, *a, **k):
            if beside_target(f):
                half_then_die(m.SerializeToString(), f)
            return real[name](m, f, *a, **k)
        return w

    def tsave(obj, f, *a, **k):
        if beside_target(f):
            buf = io.BytesIO(); real["torch.save"](obj, buf); half_then_die(buf.getvalue(), f)
        return real["torch.save"](obj, f, *a, **k)

    onnx.save, onnx.save_model, torch.save = onnx_writer("onnx.save"), onnx_writer("onnx.save_model"), tsave
    from edgecnn.cli import main
    sys.argv = ["edgecnn", *sys.argv[2:]]
    main()
""")


@pytest.mark.parametrize("which", ["export", "train", "quantize"])
def test_kill_mid_write_leaves_the_target_intact(trained, tmp_path, which):
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("model.pt" if which == "train" else "model.onnx")
    old = b"previous good version"
    target.write_bytes(old)
    args = {"export": ["export", str(trained.pt), "-o", str(target)],
            "train": ["train", "--per-class", "5", "--epochs", "1", "--no-progress", "-o", str(target)],
            "quantize": ["quantize", str(trained.onnx_dynamic), "-o", str(target)]}[which]
    r = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(out), *args], capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr.decode()[-2000:]  # really killed mid-write
    assert target.read_bytes() == old  # the target was never touched
    leftovers = [p for p in out.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".") and ".tmp" in p.name for p in leftovers)  # only hidden temps


# ------------------------------------------------------------------------------ threads
def test_one_classifier_shared_by_8_threads_matches_serial(trained, run_threads):
    ds = synthetic_dataset(8, seed=4)
    batches = [ds.images[i : i + 6] for i in range(0, len(ds.images), 6)]
    with Classifier(trained.onnx) as clf:
        serial = [clf.probabilities(list(b)) for b in batches]
        results: dict[int, list] = {}

        def work(tid):
            results[tid] = [clf.probabilities(list(b)) for b in batches for _ in range(3)][::3]

        errors = run_threads(8, work)
    assert not errors
    for tid in range(8):
        for got, want in zip(results[tid], serial, strict=True):
            np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ isolation
def test_native_crash_in_child_becomes_an_error_message(capfd):
    from edgecnn.isolate import run_child

    code = run_child([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], "checking crash.onnx")
    assert code == 2
    err = capfd.readouterr().err
    assert "crashed (SIGSEGV)" in err and "checking crash.onnx" in err


def test_verify_isolate_runs_the_real_check(trained):
    r = subprocess.run([sys.executable, "-m", "edgecnn", "verify", str(trained.onnx), "--against", str(trained.pt),
                        "--runtime", "ort-cpu", "--isolate"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ort-cpu" in r.stdout and "pass" in r.stdout
