"""edgecnn.runtimes: the torch-free Classifier, input validation, batching, the registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from edgecnn.runtimes import Classifier, load_runtime, preprocess, runtime_names
from PIL import Image

from edgecnn.checkpoint import load_checkpoint
from edgecnn.data import synthetic_dataset
from edgecnn.errors import InvalidInputError, InvalidModelError, RuntimeUnavailableError


def test_classifier_runs_where_torch_cannot_be_imported(trained, tmp_path):
    ds = synthetic_dataset(2, seed=9)
    Image.fromarray(ds.images[0]).save(tmp_path / "a.png")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.modules["onnx"] = None   # the device needs no onnx package either
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch still importable")
        import numpy as np
        from PIL import Image
        from edgecnn.runtimes import Classifier
        clf = Classifier({str(trained.onnx)!r}, runtime="ort-cpu")
        batch = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
        assert clf.run(batch).shape == (3, 6)
        img = Image.open({str(tmp_path / 'a.png')!r})
        out = clf.classify([{str(tmp_path / 'a.png')!r}, img, np.asarray(img)], top_k=3)
        assert len(out) == 3 and all(len(r) == 3 for r in out)
        assert out[0] == out[1] == out[2]
        assert [m for m in sys.modules if m == "torch" or m.startswith("torch.")] == ["torch"]
        print("OK", out[0][0][0])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK")


def test_picture_gives_the_same_logits_through_classifier_and_training_path(trained, tmp_path):
    """The device path (file -> Classifier) and the training path (Dataset.tensors -> torch) agree."""
    ds = synthetic_dataset(2, seed=21)
    paths = []
    for i, img in enumerate(ds.images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    ck = load_checkpoint(trained.pt)
    with torch.inference_mode():
        ref = ck.build_model()(torch.from_numpy(ds.tensors(ck.mean, ck.std))).numpy()
    with Classifier(trained.onnx) as clf:
        got = clf.run(clf.preprocess(paths))
        probs = clf.probabilities(paths)
        top = clf.classify(paths, top_k=2)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    assert [t[0][0] for t in top] == [ck.class_names[i] for i in ref.argmax(1)]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert all(t[0][1] >= t[1][1] for t in top)


def test_fixed_batch_model_splits_batches_like_the_dynamic_one(trained):
    x = np.random.default_rng(1).standard_normal((5, 3, 64, 64)).astype(np.float32)
    with load_runtime("ort-cpu", trained.onnx) as fixed, load_runtime("ort-cpu", trained.onnx_dynamic) as dyn:
        assert fixed.input_shape[0] == 1 and dyn.input_shape[0] is None
        np.testing.assert_allclose(fixed.run(x), dyn.run(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((1, 3, 32, 32), np.float32), "shape"),
    (np.zeros((3, 64, 64), np.float32), "shape"),
    (np.zeros((0, 3, 64, 64), np.float32), "empty batch"),
    (np.zeros((1, 3, 64, 64), np.uint8), "float32"),
    (np.full((1, 3, 64, 64), np.nan, np.float32), "NaN"),
    (np.full((1, 3, 64, 64), np.inf, np.float32), "Inf"),
    ([[0.0]], "numpy array"),
])
def test_run_validates_its_input(trained, bad, match):
    with load_runtime("ort-cpu", trained.onnx_dynamic) as rt, pytest.raises(InvalidInputError, match=match):
        rt.run(bad)


def test_float64_input_is_accepted_as_float32(trained):
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64))
    with load_runtime("ort-cpu", trained.onnx_dynamic) as rt:
        np.testing.assert_array_equal(rt.run(x), rt.run(x.astype(np.float32)))


def test_unknown_runtime_suggests_a_close_name(trained):
    with pytest.raises(RuntimeUnavailableError, match="did you mean 'ort-cpu'"):
        load_runtime("ort-cp", trained.onnx)
    assert {"ort-cpu", "torch"} <= set(runtime_names())


def test_bad_model_files(tmp_path, trained):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x01garbage" * 50)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("garbage.onnx", "empty.onnx", "missing.onnx"):
        with pytest.raises(InvalidModelError):
            load_runtime("ort-cpu", tmp_path / name)
    with pytest.raises(InvalidModelError, match="directory"):
        load_runtime("ort-cpu", tmp_path)
    with pytest.raises(InvalidModelError, match="reads .onnx"):
        load_runtime("ort-cpu", trained.pt)


def test_preprocess_modes_and_sizes():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 255, np.uint8)], axis=2)
    gray = rgb[:, :, 0]
    x = preprocess([rgb, rgba, gray, Image.fromarray(gray)])
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[1])  # opaque alpha is dropped
    np.testing.assert_array_equal(x[2], x[3])  # array and PIL grayscale agree
    np.testing.assert_array_equal(x[2][0], x[2][1])  # gray is replicated to 3 channels
    with pytest.raises(InvalidInputError):
        preprocess([])
    with pytest.raises(InvalidInputError, match="uint8"):
        preprocess([rgb.astype(np.float32)])
