"""A user's own model and data (issue 11): the course Net with 7 classes, saved as people save it, through
export, verify, quantize from unlabeled images, package and the bundle's predict.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from course_net import CourseNet
from PIL import Image
from torch import nn

from edgecnn.checkpoint import load_checkpoint
from edgecnn.data import synthetic_dataset
from edgecnn.errors import InvalidModelError
from edgecnn.labels import format_list

LABELS = ["ring", "box", "tri", "plus", "zebra", "chess", "plain"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _seven_class_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The built-in six shapes plus a seventh class of plain noisy colour, uint8 (N,64,64,3)."""
    ds = synthetic_dataset(per_class, seed=seed)
    rng = np.random.default_rng(seed)
    plain = np.clip(rng.integers(0, 256, (per_class, 1, 1, 3)) + rng.normal(0, 6, (per_class, 64, 64, 3)), 0, 255)
    x = np.concatenate([ds.images, plain.astype(np.uint8)])
    y = np.concatenate([ds.labels, np.full(per_class, 6)])
    return x, y


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """What a course user has: a 7-class Net trained with their own code and saved as the PyTorch tutorial
    does (model_state_dict + optimizer + epoch) from a DataParallel-wrapped model, a labels file, and a
    folder of unlabeled images at several depths."""
    d = tmp_path_factory.mktemp("course")
    x, y = _seven_class_images(40, seed=5)
    xt = torch.from_numpy(((x / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2).astype(np.float32))
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    net = nn.DataParallel(CourseNet(7))  # keys get the module. prefix
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _epoch in range(3):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(k.startswith("module.") for k in net.state_dict())
    torch.save({"epoch": 3, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "loss": float(loss.detach())}, d / "course.pt")
    (d / "labels.txt").write_text("".join(n + "\n" for n in LABELS))
    xu, _ = _seven_class_images(24, seed=77)  # images calibration and the gate have never seen labelled
    for i, img in enumerate(xu):
        sub = d / "unlabeled" / ("a/b" if i % 3 == 0 else "c" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (d / "probe.png").write_bytes((d / "unlabeled" / "c" / "img001.png").read_bytes())
    return d


def test_course_user_walks_the_whole_pipeline(course, run_cli, tmp_path):
    onnx_path = tmp_path / "course.onnx"
    r = run_cli("export", course / "course.pt", "-o", onnx_path, "--labels", course / "labels.txt",
                "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)))
    assert r.exit_code == 0, r.output
    assert "note:" not in r.stderr  # nothing assumed
    from edgecnn.exporters.meta import onnx_metadata

    meta = onnx_metadata(onnx_path)
    assert json.loads(meta["class_names"]) == LABELS
    assert json.loads(meta["mean"]) == pytest.approx(MEAN) and json.loads(meta["std"]) == pytest.approx(STD)

    r = run_cli("verify", onnx_path, "--against", course / "course.pt")
    assert r.exit_code == 0, r.output

    r = run_cli("quantize", onnx_path, "--precision", "int8", "--calib", course / "unlabeled")
    assert r.exit_code == 0, r.output
    assert "no labels" in r.stdout and "verdict" in r.stdout
    int8 = tmp_path / "course.int8.onnx"
    assert int8.is_file()

    bundle = tmp_path / "bundle"
    r = run_cli("package", onnx_path, int8, "-o", bundle)
    assert r.exit_code == 0, r.output
    assert (bundle / "labels.txt").read_text().splitlines() == LABELS

    p = subprocess.run([sys.executable, str(bundle / "predict.py"), str(course / "probe.png"), "--model",
                        "course.int8.onnx", "--top-k", "2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    fields = p.stdout.strip().split("\t")
    assert fields[1] in LABELS and fields[3] in LABELS and "class_" not in p.stdout
    from edgecnn.runtimes import Classifier

    with Classifier(onnx_path) as clf:
        assert clf.classify([course / "probe.png"])[0][0][0] == fields[1]


# ------------------------------------------------------------------------------ 1. labels and normalization
def test_export_without_labels_says_what_it_assumed(course, run_cli, tmp_path):
    r = run_cli("export", course / "course.pt", "-o", tmp_path / "m.onnx", "--no-check")
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1
    assert "class_0" in notes[0] and "0.5" in notes[0] and "--labels" in notes[0] and "--mean" in notes[0]


def test_labels_from_a_comma_list_or_an_image_folder(course, run_cli, tmp_path):
    from edgecnn.exporters.meta import onnx_metadata

    r = run_cli("export", course / "course.pt", "-o", tmp_path / "a.onnx", "--no-check", "--labels", ",".join(LABELS))
    assert r.exit_code == 0 and json.loads(onnx_metadata(tmp_path / "a.onnx")["class_names"]) == LABELS
    folder = tmp_path / "imgs"
    for name in ["b7", "a1", "c3", "a2", "z9", "m5", "k4"]:
        (folder / name).mkdir(parents=True)
    (folder / ".hidden").mkdir()
    r = run_cli("export", course / "course.pt", "-o", tmp_path / "b.onnx", "--no-check", "--labels", folder)
    assert r.exit_code == 0, r.output
    assert json.loads(onnx_metadata(tmp_path / "b.onnx")["class_names"]) == ["a1", "a2", "b7", "c3", "k4", "m5", "z9"]
    r = run_cli("export", course / "course.pt", "-o", tmp_path / "c.onnx", "--labels", "a,b,c")
    assert r.exit_code == 2 and "3 names" in r.stderr and "7 outputs" in r.stderr
    assert not (tmp_path / "c.onnx").exists()
    r = run_cli("export", course / "course.pt", "-o", tmp_path / "c.onnx", "--mean", "0.5,0.5")
    assert r.exit_code == 2 and "three numbers" in r.stderr


def test_a_checkpoint_carrying_labels_and_normalization_uses_them(course, tmp_path):
    obj = torch.load(course / "course.pt", weights_only=True)
    obj.update({"classes": LABELS, "mean": MEAN, "std": STD})
    torch.save(obj, tmp_path / "full.pt")
    ck = load_checkpoint(tmp_path / "full.pt")
    assert ck.class_names == LABELS and ck.mean == MEAN and ck.std == STD and ck.assumed == []


def test_train_takes_mean_and_std(tmp_path, run_cli):
    data = _folder(tmp_path / "data", {"a": 3, "b": 3})
    r = run_cli("train", "--data", data, "--epochs", "1", "--no-progress", "--mean", "0.4,0.4,0.4",
                "--std", "0.2,0.3,0.2", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(tmp_path / "m.pt")
    assert ck.mean == [0.4, 0.4, 0.4] and ck.std == [0.2, 0.3, 0.2] and ck.class_names == ["a", "b"]


# ------------------------------------------------------------------------------ 2. checkpoint shapes
@pytest.mark.parametrize("shape", ["bare", "state_dict", "model_state_dict", "model", "net", "module",
                                   "orig_mod", "compiled_ddp"])
def test_every_common_checkpoint_shape_loads(tmp_path, shape):
    torch.manual_seed(1)
    net = CourseNet(5).eval()
    sd = net.state_dict()
    prefix = {"module": "module.", "orig_mod": "_orig_mod.", "compiled_ddp": "_orig_mod.module."}.get(shape, "")
    sd = {prefix + k: v for k, v in sd.items()}
    key = {"state_dict": "state_dict", "model_state_dict": "model_state_dict", "model": "model", "net": "net",
           "module": "model_state_dict"}.get(shape)
    obj = sd if key is None else {key: sd, "epoch": 7, "optimizer_state_dict": {"state": {}, "param_groups": []}}
    torch.save(obj, tmp_path / "c.pt")
    ck = load_checkpoint(tmp_path / "c.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ck.build_model()(x), net(x))


def test_loading_is_always_weights_only(tmp_path, monkeypatch):
    torch.save({"model_state_dict": CourseNet(3).state_dict()}, tmp_path / "c.pt")
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    load_checkpoint(tmp_path / "c.pt")
    assert seen == [True]


@pytest.mark.parametrize("kind", ["png", "jpeg", "text"])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, kind):
    p = tmp_path / "model.pt"
    if kind == "text":
        p.write_text("epoch,loss\n1,0.5\n")
    else:
        Image.new("RGB", (8, 8)).save(p, format=kind.upper())
    with pytest.raises(InvalidModelError, match="not a PyTorch checkpoint") as ei:
        load_checkpoint(p)
    assert "unsafe" not in str(ei.value) and "weights_only" not in str(ei.value)
    assert {"png": "PNG image", "jpeg": "JPEG image", "text": "text file"}[kind] in str(ei.value)


# ------------------------------------------------------------------------------ 3. calibration data
@pytest.fixture(scope="module")
def course_onnx(course, tmp_path_factory):
    from edgecnn.exporters.onnx import export

    d = tmp_path_factory.mktemp("course_onnx")
    return export(course / "course.pt", d / "course.onnx", class_names=LABELS, mean=MEAN, std=STD,
                  dynamic_batch=True, check=False).path


def test_builtin_calibration_on_a_non_demo_model_says_what_to_give(course_onnx, run_cli, tmp_path):
    for args in (["quantize", course_onnx], ["quantize", course_onnx, "--precision", "fp16"],
                 ["tune", course_onnx, "-o", tmp_path / "tuned"]):
        r = run_cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "--calib DIR" in r.stderr and "builtin" in r.stderr and "ring" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tuned").exists()
    assert sorted(p.name for p in course_onnx.parent.iterdir()) == ["course.onnx"]


def test_fp16_from_an_unlabeled_folder(course, course_onnx, run_cli, tmp_path):
    r = run_cli("quantize", course_onnx, "--precision", "fp16", "--calib", course / "unlabeled", "-o",
                tmp_path / "m.fp16.onnx")
    assert r.exit_code == 0, r.output
    assert "no labels" in r.stdout and (tmp_path / "m.fp16.onnx").is_file()


def test_labels_come_only_from_a_folder_of_the_models_classes(course, course_onnx):
    from edgecnn.exporters.meta import onnx_metadata

    from edgecnn.quant_report import labelled_folder, quant_data

    meta = onnx_metadata(course_onnx)
    x, y = _seven_class_images(6, seed=9)
    good, other = course / "labelled", course / "other_names"
    for root, names in ((good, LABELS), (other, [f"k{i}" for i in range(7)])):
        for i, (img, lab) in enumerate(zip(x, y, strict=True)):
            (root / names[lab]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / names[lab] / f"{i}.png")
    with_labels = quant_data(good, meta, 64)
    assert with_labels.labels is not None and len(with_labels.labels) == len(with_labels.heldout)
    two = course / "two_classes"
    for name, lab in (("plain", 6), ("ring", 0)):
        (two / name).mkdir(parents=True)
        for i, img in enumerate(x[y == lab]):
            Image.fromarray(img).save(two / name / f"{i}.png")
    ds, _ = labelled_folder(two, LABELS)  # by name, not by sorted position: plain is the model's 7th class
    assert sorted(set(ds.labels.tolist())) == [0, 6]
    without = quant_data(other, meta, 64)
    assert without.labels is None and any("used without labels" in n for n in without.notes)
    assert len(without.calib) + len(without.heldout) == len(x)


def test_lists_in_messages_are_never_cut_silently():
    names = [f"n{i}" for i in range(20)]
    s = format_list(names)
    assert s.startswith("n0, n1") and "…" in s and "n19" in s and "+12 more" in s and "20 in all" in s
    assert format_list(names[:5]) == "n0, n1, n2, n3, n4"


def test_class_mismatch_message_lists_both_in_full_or_with_a_count(course_onnx, tmp_path):
    from edgecnn.errors import InvalidInputError
    from edgecnn.quant_report import _check_classes

    many = [f"class{i}" for i in range(12)]
    with pytest.raises(InvalidInputError) as ei:
        _check_classes(many, LABELS, str(tmp_path))
    msg = str(ei.value)
    assert ", ".join(LABELS) in msg and "class11" in msg and "12 in all" in msg


# ------------------------------------------------------------------------------ 4. tiny training sets
def _folder(root: Path, counts: dict[str, int]) -> Path:
    ds = synthetic_dataset(max(counts.values()), seed=3)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(ds.images[ds.labels == c][:n]):
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_train_on_a_tiny_folder_for_one_epoch(tmp_path, run_cli):
    data = _folder(tmp_path / "small", {"circle": 5, "square": 5})  # 8 training images, batch 2: 4 steps
    r = run_cli("train", "--data", data, "--epochs", "1", "--batch-size", "2", "--no-progress", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "m.pt").class_names == ["circle", "square"]


def test_train_with_one_image_per_class(tmp_path, run_cli):
    data = _folder(tmp_path / "one", {"circle": 1, "square": 1, "triangle": 1})
    r = run_cli("train", "--data", data, "--epochs", "2", "--no-progress", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output
    assert "too few for a validation split" in r.stderr
    assert load_checkpoint(tmp_path / "m.pt").num_classes == 3


def test_tune_gate_without_labels_judges_agreement_with_fp32(tmp_path):
    from types import SimpleNamespace

    from edgecnn.tune import Candidate, _gate

    rng = np.random.default_rng(0)
    ref = {"data": rng.standard_normal((200, 7)).astype(np.float32) * 4}
    unlabeled = SimpleNamespace(labels=None)
    close = Candidate("ort-cpu", "int8", tmp_path / "m.onnx")
    _gate(close, ref, {"data": ref["data"] + 0.01}, unlabeled, LABELS, 1.0)
    assert close.gate == "pass" and close.accuracy is None and close.drop_points is None
    flipped = ref["data"].copy()
    flipped[:20] = -flipped[:20]  # 10% of the top-1 answers change
    far = Candidate("ort-cpu", "int8", tmp_path / "m.onnx")
    _gate(far, ref, {"data": flipped}, unlabeled, LABELS, 1.0)
    assert far.gate != "pass" and "agreement" in far.gate


def test_a_state_dict_with_extra_keys_is_named_with_a_count(tmp_path):
    sd = CourseNet(3).state_dict()
    sd.update({f"head{i}.weight": torch.zeros(2) for i in range(6)})
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(InvalidModelError, match=r"head0.weight, head1.weight, head2.weight, …, head5.weight "
                                                r"\(\+2 more, 6 in all\)"):
        load_checkpoint(tmp_path / "c.pt")
