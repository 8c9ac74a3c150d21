"""Device bundles: contents, one shared preprocessing, hash checks, atomic writes, predict.py in a fresh venv."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgecnn.runtimes import Classifier
from PIL import Image

from edgecnn.checkpoint import sha256_file
from edgecnn.errors import IntegrityError, InvalidInputError
from edgecnn.package import (
    MANIFEST,
    PIPELINE_FILES,
    PREPROCESS_FILE,
    build_bundle,
    check_bundle,
    preprocess_source,
)

RTOL, ATOL = 1e-3, 1e-5  # fp32 tolerance
FILES = {"model.onnx", "model_dynamic.onnx", "emb.onnx", "model.int8.onnx", "labels.txt", "requirements.txt", "predict.py",
         PREPROCESS_FILE, MANIFEST, *PIPELINE_FILES.values()}


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    from edgecnn.exporters.onnx import export
    from edgecnn.exporters.quantize import quantize

    folder = tmp_path_factory.mktemp("bundle")
    emb = export(trained.pt, folder / "emb.onnx", embed_preprocessing=True, embed_softmax=True).path
    int8 = quantize(trained.onnx, folder / "model.int8.onnx", precision="int8", calib_samples=128).path
    out = folder / "out" / "bundle"
    out.parent.mkdir()
    build_bundle([trained.onnx, trained.onnx_dynamic, emb, int8], out, against=trained.pt)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Real image files: PNGs from the built-in set, a 150x90 JPEG, a grayscale PNG."""
    from edgecnn.data import synthetic_dataset

    folder = tmp_path_factory.mktemp("imgs")
    ds = synthetic_dataset(per_class=1, seed=42)
    paths = []
    for i, img in enumerate(ds.images):
        paths.append(folder / f"{ds.class_names[ds.labels[i]]}_{i}.png")
        Image.fromarray(img).save(paths[-1])
    paths.append(folder / "wide.jpg")
    Image.fromarray(ds.images[0]).resize((150, 90)).save(paths[-1], quality=92)
    paths.append(folder / "gray.png")
    Image.fromarray(ds.images[3]).convert("L").save(paths[-1])
    return paths


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bundle_contents_and_manifest(bundle, trained):
    assert {p.name for p in bundle.iterdir()} == FILES
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    m = json.loads((bundle / MANIFEST).read_text())
    assert m["format"] == "edgecnn-bundle/1" and m["default_model"] == "model.onnx"
    assert set(m["files"]) == FILES - {MANIFEST}
    assert all(sha256_file(bundle / f) == h for f, h in m["files"].items())
    assert {k for k, v in m["versions"].items() if v} >= {"edgecnn", "onnx", "onnxruntime", "numpy", "pillow"}
    reqs = [ln.split(">=")[0] for ln in (bundle / "requirements.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert sorted(reqs) == ["numpy", "onnxruntime", "pillow"]
    by = {e["file"]: e for e in m["models"]}
    assert by["model.onnx"]["input"] == {"name": "input", "dtype": "float32", "shape": [1, 3, 64, 64], "layout": "NCHW"}
    assert by["model_dynamic.onnx"]["input"]["shape"][0] == "batch"
    assert by["emb.onnx"]["input"]["dtype"] == "uint8" and by["emb.onnx"]["input"]["layout"] == "NHWC-uint8"
    assert by["emb.onnx"]["embedded_softmax"] is True
    assert [e["precision"] for e in m["models"]] == ["fp32", "fp32", "fp32", "int8"]
    assert all(e["opset"] >= 13 for e in m["models"])
    assert [r["model"] for r in m["verify"]] == ["model.onnx", "model_dynamic.onnx", "emb.onnx", "model.int8.onnx"]
    assert all(r["status"] == "pass" for r in m["verify"])
    assert all(r["max_abs"] < 1e-3 for r in m["verify"] if r["model"] != "model.int8.onnx")
    labels = (bundle / "labels.txt").read_text().splitlines()
    assert labels == m["class_names"] == list(Classifier(trained.onnx).class_names)
    assert check_bundle(bundle)["files"] == m["files"]


def test_one_preprocessing_definition(bundle, images):
    pkg = importlib.import_module("edgecnn.runtimes.preprocess")
    text = (bundle / PREPROCESS_FILE).read_text()
    assert text == preprocess_source()
    src = Path(pkg.__file__).read_text()
    body = "".join(text.splitlines(keepends=True)[2:])  # without the two generated-by comment lines
    body = body.replace(body[body.index("class InvalidInputError"):body.index("\n\nINPUT_SIZE")],
                        "from edgecnn.errors import InvalidInputError")
    assert body == src  # the package's code, line for line
    copy = _load_module(bundle / PREPROCESS_FILE, "bundle_pre_copy")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    assert np.array_equal(copy.preprocess(images, mean, std), pkg.preprocess(images, mean, std))
    assert np.array_equal(copy.to_batch_uint8(images), pkg.to_batch_uint8(images))
    with pytest.raises(copy.InvalidInputError, match="no such image file"):
        copy.preprocess([bundle / "missing.png"])


@pytest.mark.parametrize("model", ["model.onnx", "model_dynamic.onnx", "emb.onnx", "model.int8.onnx"])
def test_bundle_model_matches_classifier(bundle, images, model):
    pred = _load_module(bundle / "predict.py", "bundle_predict_copy")
    got = pred.BundleModel(bundle, model).probabilities(images)
    with Classifier(bundle / model) as clf:
        ref = clf.probabilities(images)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def _device_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def device_python(tmp_path_factory, bundle) -> Path:
    """A fresh venv (no system site packages) with only the bundle's requirements.txt installed."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(bundle / "requirements.txt")],
                       capture_output=True, text=True, timeout=600, env=_device_env())
    if r.returncode != 0:
        # Only a network that cannot be reached skips; "No matching distribution" is a broken requirements.txt
        # (a pin no index has), and fails.
        net = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")
        if any(s in r.stderr for s in net) and "No matching distribution" not in r.stderr:
            pytest.skip(f"PyPI is not reachable for the fresh-venv test: {r.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"pip install -r requirements.txt failed:\n{r.stderr}")
    return py


def _parse(stdout: str) -> dict[str, list]:
    out = {}
    for line in stdout.strip().splitlines():
        fields = line.split("\t")
        out[fields[0]] = [(fields[i], float(fields[i + 1])) for i in range(1, len(fields), 2)]
    return out


@pytest.mark.parametrize("model", [None, "emb.onnx", "model.int8.onnx"])
def test_predict_py_in_fresh_venv_matches_classifier(bundle, images, device_python, model):
    for mod in ("torch", "onnx", "edgecnn"):  # the device has the runtime packages and nothing else
        r = subprocess.run([str(device_python), "-c", f"import {mod}"], cwd=bundle, capture_output=True,
                           env=_device_env())
        assert r.returncode != 0, f"{mod} is importable in the device venv"
    args = [str(device_python), "predict.py", *map(str, images), "--top-k", "3"]
    if model:
        args += ["--model", model]
    r = subprocess.run(args, cwd=bundle, capture_output=True, text=True, timeout=120, env=_device_env())
    assert r.returncode == 0, r.stderr
    got = _parse(r.stdout)
    assert list(got) == [str(p) for p in images]
    with Classifier(bundle / (model or "model.onnx")) as clf:
        ref = clf.classify(images, top_k=3)
        probs = clf.probabilities(images)
    for p, row, ref_row, pr in zip(images, got.values(), ref, probs, strict=True):
        assert row[0][0] == ref_row[0][0], p  # top-1 label
        np.testing.assert_allclose([v for _, v in row], [v for _, v in ref_row], rtol=RTOL, atol=1e-6)
        assert abs(row[0][1] - pr.max()) <= 1e-6
    assert not (bundle / "__pycache__").exists()  # predict.py leaves the bundle as its manifest lists it
    check_bundle(bundle)


def test_predict_py_reports_bad_image_and_continues(bundle, images, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"hello")
    r = subprocess.run([sys.executable, str(bundle / "predict.py"), str(images[0]), str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout.startswith(str(images[0]) + "\t") and len(r.stdout.splitlines()) == 1
    assert "not_an_image.png" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["model", "labels", "preprocess", "extra", "missing", "manifest"])
def test_check_names_the_altered_file(bundle, run_cli, tmp_path, damage):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    assert run_cli("package", "--check", b).exit_code == 0
    if damage == "model":
        data = bytearray((b / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 1
        (b / "model.onnx").write_bytes(bytes(data))
        name = "model.onnx"
    elif damage == "labels":
        (b / "labels.txt").write_text((b / "labels.txt").read_text().replace("circle", "dog"))
        name = "labels.txt"
    elif damage == "preprocess":
        with open(b / PREPROCESS_FILE, "a") as f:
            f.write("\nDEFAULT_MEAN = (0.0, 0.0, 0.0)\n")
        name = PREPROCESS_FILE
    elif damage == "extra":
        (b / "onnxruntime.py").write_text("raise SystemExit('shadowed')\n")
        name = "onnxruntime.py"
    elif damage == "missing":
        (b / "model_dynamic.onnx").unlink()
        name = "model_dynamic.onnx"
    else:
        (b / MANIFEST).unlink()
        name = MANIFEST
    r = run_cli("package", "--check", b)
    assert r.exit_code == 1, r.output
    assert name in r.output and "Traceback" not in r.output
    if damage in ("model", "labels", "preprocess"):  # predict.py refuses to use an altered file too
        r = subprocess.run([sys.executable, str(b / "predict.py"), str(b / "labels.txt")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and name in r.stderr and "refused" in r.stderr  # exit 2: refused, never run


def test_write_is_atomic_and_refuses_to_overwrite(trained, tmp_path, run_cli):
    out = tmp_path / "b"
    r = run_cli("package", trained.onnx, "-o", out)
    assert r.exit_code == 0, r.output
    first = json.loads((out / MANIFEST).read_text())
    r = run_cli("package", trained.onnx_dynamic, "-o", out)
    assert r.exit_code == 2 and "--force" in r.output
    assert json.loads((out / MANIFEST).read_text()) == first
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not onnx")
    r = run_cli("package", trained.onnx, bad, "-o", tmp_path / "c")
    assert r.exit_code == 2 and "broken.onnx" in r.output
    r = run_cli("package", trained.onnx, trained.pt, "-o", tmp_path / "c")
    assert r.exit_code == 2 and ".onnx" in r.output
    assert not (tmp_path / "c").exists()
    r = run_cli("package", trained.onnx_dynamic, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((out / MANIFEST).read_text())["default_model"] == "model_dynamic.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "broken.onnx"]  # no temp or old folders left
    with pytest.raises(IntegrityError):
        (out / "labels.txt").write_text("x\n")
        check_bundle(out)
    with pytest.raises(InvalidInputError):
        build_bundle([], tmp_path / "d")
