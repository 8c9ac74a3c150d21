"""The course student's walk: the verbatim Net trained in plain PyTorch, a bare state_dict, export with the
labels and normalization they used, and a judge that reports only what it checked."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from course_net import CourseNet
from PIL import Image
from test_judge import _tampered, cli

from edgecnn.data import image_folder, synthetic_dataset

MEAN, STD = "0.45,0.42,0.40", "0.21,0.22,0.23"  # the student's own, not edgecnn's defaults (0.5 / 0.25)
PER_CLASS = 20


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """An ImageFolder of 6 classes, the Net trained a little on it in plain PyTorch, its state_dict saved,
    and the export the student makes with --labels/--mean/--std."""
    root = tmp_path_factory.mktemp("student")
    ds = synthetic_dataset(PER_CLASS, seed=3)
    data = root / "digits"
    for i, (img, y) in enumerate(zip(ds.images, ds.labels, strict=True)):
        (data / ds.class_names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data / ds.class_names[y] / f"{i:04d}.png")
    folder = image_folder(data)  # what the student's own loader gives: sorted class folders, 64x64 RGB
    mean = np.array([float(v) for v in MEAN.split(",")], np.float32)
    std = np.array([float(v) for v in STD.split(",")], np.float32)
    x = torch.from_numpy(((folder.images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(folder.labels)
    torch.manual_seed(0)
    net = CourseNet(len(folder.class_names))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):  # "a little": far from perfect, so a wrong mean visibly changes the accuracy
        for i in range(0, len(x), 16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    net.eval()
    with torch.inference_mode():
        acc = float((net(x).argmax(1) == y).float().mean())
    torch.save(net.state_dict(), root / "net.pt")
    r = cli("export", root / "net.pt", "--labels", data, "--mean", MEAN, "--std", STD, "-o", root / "course.onnx")
    assert r.returncode == 0, r.stderr
    return {"root": root, "data": data, "pt": root / "net.pt", "onnx": root / "course.onnx", "acc": acc,
            "names": folder.class_names, "n": len(folder.images)}


def _stated(s) -> list[str]:
    return ["--labels", str(s["data"]), "--mean", MEAN, "--std", STD]


def test_verify_with_the_stated_values_reports_the_models_own_accuracy(student, tmp_path):
    s = student
    r = cli("verify", s["onnx"], "--against", s["pt"], *_stated(s), "--data", s["data"], "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "no accuracy figures" not in out and "per class (precision/recall %" in out
    for name in s["names"]:
        assert re.search(rf"^{re.escape(name)}\s+{PER_CLASS}\s", out, re.M), out
    # The printed top-1 accuracy is the model's own on that folder, computed above in plain PyTorch.
    m = re.search(r"^top-1 accuracy\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%", out, re.M)
    assert m and int(m.group(1)) == s["n"], out
    assert float(m.group(2)) == pytest.approx(s["acc"] * 100, abs=0.01)
    assert float(m.group(3)) == pytest.approx(s["acc"] * 100, abs=0.01)  # ort-cpu, fp32: the same
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["reference_accuracy"] == pytest.approx(s["acc"]) and doc["not_checked"] == []
    meta = {m["field"]: m for m in doc["metadata"]}
    assert meta["mean"]["status"] == "ok" and meta["mean"]["against"] == "command line (--mean)"
    assert meta["class_names"]["status"] == "ok"
    assert re.search(r"^verdict\s+PASS$", out, re.M), out


def test_verify_without_stated_values_uses_the_models_labels_and_says_what_it_did_not_check(student):
    s = student
    r = cli("verify", s["onnx"], "--against", s["pt"], "--data", s["data"])
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "match the checkpoint" not in out and "class names, mean/std" not in out  # no claim of a match
    for field in ("class_names", "mean", "std"):
        assert re.search(rf"{field}: not checked \(the checkpoint carries none and no --", out), out
    assert re.search(r"^verdict\s+PASS \(not checked: class_names, mean, std;", out, re.M), out
    # Accuracy still: the data set's classes are the model's own (its metadata), normalized as the device does.
    m = re.search(r"^top-1 accuracy\s+\d+\s+([\d.]+)%", out, re.M)
    assert m and float(m.group(1)) == pytest.approx(s["acc"] * 100, abs=0.01), out


@pytest.mark.parametrize("field", ["mean", "class_names"])
def test_tampered_after_export_fails_with_the_stated_values_and_is_not_claimed_without(student, tmp_path, field):
    s = student
    meta = json.loads(json.dumps({"mean": [0.0, 0.0, 0.0], "class_names": s["names"][::-1]}[field]))
    bad = _tampered(s["onnx"], tmp_path / "bad.onnx", **{field: json.dumps(meta)})
    r = cli("verify", bad, "--against", s["pt"], *_stated(s), "--data", s["data"])
    assert r.returncode == 1, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("edgecnn: error:") and f"metadata {field}: model says" in err[0]
    assert "Traceback" not in r.stderr
    if field == "mean":  # the device normalizes with the zeroed mean: the rows fail and the accuracy drops
        assert "ort-cpu fp32:" in err[0]
    r = cli("verify", bad, "--against", s["pt"], "--data", s["data"])
    out = r.stdout
    assert f"{field}: not checked" in out and "not checked:" in out.splitlines()[-1]
    assert f"{field}: ok" not in out and "match the checkpoint" not in out


def test_a_checkpoint_with_another_class_count_is_one_reason_and_no_figures(student, tmp_path):
    s = student
    torch.save(CourseNet(5).state_dict(), tmp_path / "five.pt")
    r = cli("verify", s["onnx"], "--against", tmp_path / "five.pt", "--data", s["data"])
    assert r.returncode == 1, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert err[0].count(";") == 0 and "outputs 6 classes, the checkpoint 5" in err[0], err[0]
    table = r.stdout
    assert "inf" not in table and "0.00%" not in table and "not compared" in table, table
    assert "no accuracy figures: the class counts differ" in table
    assert "must be well-formed" not in table + err[0]


def test_an_export_that_assumed_its_labels_and_normalization_says_so_once(student, tmp_path):
    """Export records where each value came from; the device side says once when it runs on assumed ones."""
    import warnings

    from edgecnn.runtimes import Classifier
    from edgecnn.runtimes.classifier import AssumedMetadataWarning

    s = student
    r = cli("export", s["pt"], "-o", tmp_path / "assumed.onnx")
    assert r.returncode == 0, r.stderr
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Classifier(tmp_path / "assumed.onnx") as a, Classifier(tmp_path / "assumed.onnx") as b:
            assert a.assumed == ["labels", "normalization"] and b.assumed == a.assumed
        with Classifier(s["onnx"]) as stated:  # --labels/--mean/--std given: nothing assumed, nothing said
            assert stated.assumed == []
    said = [w for w in seen if issubclass(w.category, AssumedMetadataWarning)]
    assert len(said) == 1 and "assumed labels class_0" in str(said[0].message), [str(w.message) for w in seen]
    img = next(s["data"].rglob("*.png"))
    r = cli("predict", tmp_path / "assumed.onnx", img, img)
    assert r.returncode == 0 and r.stderr.count("was exported with assumed labels") == 1, r.stderr
    r = cli("predict", s["onnx"], img)
    assert r.returncode == 0 and "assumed" not in r.stderr, r.stderr
