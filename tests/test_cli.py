"""The CLI as a user runs it: one-line errors with documented exit codes, predict, bench output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from edgecnn.data import synthetic_dataset


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgecnn", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def assert_one_line_error(r, code):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgecnn: error:"), r.stderr


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip" * 20)
    (d / "corrupt.onnx").write_bytes(b"\x12\x34 not a protobuf" * 20)
    (d / "empty.onnx").write_bytes(b"")
    (d / "notimage.png").write_text("hello, I am text")
    (d / "empty.png").write_bytes(b"")
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)).state_dict(), d / "other.pt")
    return d


def test_export_errors(bad_files, tmp_path):
    for name in ("missing.pt", "corrupt.pt", "other.pt"):
        out = tmp_path / f"{name}.onnx"
        r = cli("export", bad_files / name, "-o", out)
        assert_one_line_error(r, 2)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_predict_and_verify_errors(bad_files, trained):
    ds = synthetic_dataset(1, seed=0)
    good = bad_files / "good.png"
    Image.fromarray(ds.images[0]).save(good)
    assert_one_line_error(cli("predict", bad_files / "corrupt.onnx", good), 2)
    assert_one_line_error(cli("predict", bad_files / "empty.onnx", good), 2)
    assert_one_line_error(cli("predict", bad_files / "missing.onnx", good), 2)
    assert_one_line_error(cli("predict", trained.onnx, bad_files / "notimage.png"), 2)
    assert_one_line_error(cli("predict", trained.onnx, bad_files / "empty.png"), 2)
    assert_one_line_error(cli("predict", trained.onnx, bad_files / "missing.png"), 2)
    assert_one_line_error(cli("verify", trained.onnx, "--against", bad_files / "other.pt"), 2)
    assert_one_line_error(cli("verify", bad_files / "corrupt.onnx", "--against", trained.pt), 2)
    assert_one_line_error(cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "nope"), 2)  # bad option


def test_train_rejects_bad_data_and_writes_nothing(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(tmp_path / "data" / "a" / "x.png")
    (tmp_path / "data" / "b" / "y.png").write_text("no")
    r = cli("train", "--data", tmp_path / "data", "--epochs", "1", "-o", tmp_path / "m.pt", "--no-progress")
    assert_one_line_error(r, 2)
    assert "y.png" in r.stderr and not (tmp_path / "m.pt").exists()


def test_train_on_image_folder_then_predict(tmp_path):
    ds = synthetic_dataset(12, seed=3)
    for i, (img, lab) in enumerate(zip(ds.images, ds.labels, strict=True)):
        if lab > 2:
            continue
        (tmp_path / "data" / ds.class_names[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((80, 80)).save(tmp_path / "data" / ds.class_names[lab] / f"{i}.jpg")
    r = cli("train", "--data", tmp_path / "data", "--epochs", "2", "-o", tmp_path / "m.pt", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "val accuracy" in r.stderr and "epoch 2/2" in r.stderr
    assert cli("export", tmp_path / "m.pt").returncode == 0
    img = next((tmp_path / "data" / "circle").iterdir())
    r = cli("predict", tmp_path / "m.onnx", img, img, "--top-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    labels = [part.rsplit(" ", 1)[0] for part in lines[0].split(": ", 1)[1].split(", ")]
    assert sorted(labels) == ["circle", "square", "triangle"]


def test_bench_numbers_are_sane_and_json_parses(trained, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", trained.onnx, "--runtime", "ort-cpu,torch", "--batch", "1,4", "--min-time", "0.2",
            "--json", out)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(x["runtime"], x["batch"]) for x in rows} == {("ort-cpu", 1), ("ort-cpu", 4), ("torch", 1), ("torch", 4)}
    for x in rows:
        assert 0 < x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"]
        assert x["iterations"] >= 10 and x["device"] == "CPU"
        # throughput is consistent with the mean latency and the batch size
        assert x["throughput"] == pytest.approx(x["batch"] * 1000.0 / x["mean_ms"], rel=1e-6)


def test_bench_without_a_model_uses_a_fresh_default_net(tmp_path):
    r = cli("bench", "--batch", "2", "--min-time", "0.1", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["model"].startswith("default Net") and doc["rows"][0]["batch"] == 2


def test_bad_options_exit_2(trained):
    r = cli("bench", trained.onnx, "--batch", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("export", trained.pt, "--opset", "3", "-o", "/tmp/never.onnx")
    assert_one_line_error(r, 2)


def test_runtimes_command_lists_backends():
    r = cli("runtimes")
    assert r.returncode == 0
    assert "ort-cpu" in r.stdout and "torch" in r.stdout
    assert "yes" in r.stdout


def test_command_needing_a_missing_extra_names_it(trained, tmp_path):
    """On the torch-free device install, `export` says which extra to install (exit 3), no traceback."""
    code = ("import sys; sys.modules['torch'] = None; from edgecnn.cli import main; "
            f"sys.argv = ['edgecnn', 'export', {str(trained.pt)!r}, '-o', {str(tmp_path / 'm.onnx')!r}]; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, 3)
    assert "torch is not installed" in r.stderr and "edgecnn[cpu]" in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_device_side_commands_need_neither_torch_nor_onnx(trained, tmp_path):
    """predict, bench and package --check run on the torch-free device install."""
    bundle = tmp_path / "bundle"
    assert cli("package", trained.onnx, "-o", bundle).returncode == 0
    img = tmp_path / "a.png"
    Image.fromarray(synthetic_dataset(1, seed=5).images[0]).save(img)
    blocked = "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; from edgecnn.cli import main; "
    for args in (["package", "--check", str(bundle)], ["predict", str(trained.onnx), str(img)],
                 ["bench", str(trained.onnx), "--batch", "1", "--min-time", "0.1", "--no-roofline"]):
        code = blocked + f"sys.argv = ['edgecnn', *{args!r}]; main()"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stderr[-500:])


def test_runtime_options_from_the_command_line(trained, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(synthetic_dataset(1, seed=6).images[0]).save(img)
    plain = cli("predict", trained.onnx, img, "--runtime", "openvino")
    hinted = cli("predict", trained.onnx, img, "--runtime", "openvino", "-O", "hint=throughput", "-O", "threads=1")
    assert plain.returncode == hinted.returncode == 0 and plain.stdout == hinted.stdout
    # a device OpenVINO does not see is refused, never run on the CPU instead
    assert_one_line_error(cli("predict", trained.onnx, img, "--runtime", "openvino", "-O", "device=GPU"), 3)
    assert_one_line_error(cli("predict", trained.onnx, img, "-O", "bogus=1"), 2)
    r = cli("predict", trained.onnx, img, "-O", "novalue")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "Traceback" not in r.stderr
    r = cli("bench", trained.onnx, "--runtime", "openvino", "--batch", "1", "--min-time", "0.1", "--no-roofline",
            "-O", "hint=throughput", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["options"] == {"hint": "throughput"} and "hint=throughput" in row["note"]
