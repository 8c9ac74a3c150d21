"""CLI behaviour a user of their own model runs into: exit codes for every bad option, progress bars and
error lines, bench --runtime all, GPU runtimes without a GPU, predict hints, package of a tuned deploy.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from edgecnn.data import synthetic_dataset
from edgecnn.errors import InvalidInputError


def _one_line(r, code):
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgecnn: error:"), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------ 5. exit codes, bars, bench all
@pytest.mark.parametrize("args", [
    ["verify", "m.onnx"],  # missing required option
    ["export"],  # missing argument
    ["predict", "--top-k", "x", "m.onnx", "a.png"],  # bad value
    ["bench", "--no-such-option"],
    ["no-such-command"],
])
def test_click_usage_errors_are_one_line_exit_2(run_cli, args):
    line = _one_line(run_cli(*args), 2)
    assert "Usage:" not in line


def test_an_unknown_runtime_is_a_bad_option(trained, run_cli):
    for args in (["bench", trained.onnx, "--runtime", "ort-cpux"],
                 ["verify", trained.onnx, "--against", trained.pt, "--runtime", "nope"],
                 ["predict", trained.onnx, trained.pt, "--runtime", "nope"]):
        line = _one_line(run_cli(*args), 2)
        assert "unknown runtime" in line


def test_the_progress_bar_is_cleared_before_the_error_line(trained, run_cli, monkeypatch):
    from edgecnn import sweep

    def boom(*a, **k):
        raise InvalidInputError("ort-cpu fp32: the benchmark process failed: simulated")

    monkeypatch.setattr(sweep, "run_config", boom)
    r = run_cli("bench", trained.onnx, "--batch", "1", "--no-roofline")
    assert r.exit_code == 1  # a failing configuration is a row of its own; the sweep says so and exits 1
    before, sep, _ = r.stderr.partition("edgecnn: error:")
    assert sep and "bench" in before  # the bar was drawn on stderr ...
    assert before.endswith(("\r", "\n"))  # ... and cleared: the error starts its own line
    assert "edgecnn: error:" not in r.stdout


def test_bench_runtime_all_runs_the_usable_ones_and_lists_the_rest(trained, run_cli, tmp_path):
    from edgecnn.runtimes import get_runtime_class, runtime_names

    r = run_cli("bench", trained.onnx, "--runtime", "all", "--batch", "1", "--min-time", "0.05", "--warmup", "1",
                "--no-roofline", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    ran = {row["runtime"] for row in res["rows"]}
    skipped = {s["runtime"]: s["reason"] for s in res["skipped"]}
    assert ran | set(skipped) == set(runtime_names()) and "ort-cpu" in ran
    for name in runtime_names():
        if not get_runtime_class(name).available()[0]:
            assert skipped[name] and f"skipped: {name}" in r.stdout


# ------------------------------------------------------------------------------ 9. GPU runtimes without a GPU
@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt"])
def test_a_gpu_runtime_without_a_gpu_fails_at_once(trained, run_cli, monkeypatch, name):
    from edgecnn.runtimes import _deps

    from edgecnn import bench, machine

    monkeypatch.setattr(_deps, "nvidia_gpu_visible", lambda: (False, "no /proc/driver/nvidia/gpus (test)"))

    def measured(*a, **k):
        raise AssertionError("measured something before refusing")

    monkeypatch.setattr(machine, "measure_peak", measured)
    monkeypatch.setattr(bench, "default_model", measured)
    for args in (["bench", "--runtime", name], ["bench", trained.onnx, "--runtime", name]):
        line = _one_line(run_cli(*args), 3)
        assert "no NVIDIA GPU visible" in line and name in line


# ------------------------------------------------------------------------------ 7. predict hints, package deploy.json
def test_predict_points_an_ir_to_openvino_and_reads_a_folder(trained, run_cli, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(synthetic_dataset(1, seed=0).images[0]).save(img)
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    line = _one_line(run_cli("predict", xml, img), 2)
    assert "--runtime openvino" in line
    r = run_cli("predict", trained.onnx, tmp_path)  # a folder is read (bulk prediction), not "no such image"
    assert r.exit_code == 0, r.output
    assert "a.png" in r.stdout and "no such image" not in r.output


@pytest.fixture(scope="module")
def tuned_ir(trained, tmp_path_factory):
    """What `edgecnn tune` leaves when OpenVINO wins: an IR beside a deploy.json naming its settings."""
    import openvino as ov  # CI installs it: a broken import must fail, not skip
    d = tmp_path_factory.mktemp("tuned")
    ov.save_model(ov.Core().read_model(str(trained.onnx_dynamic)), str(d / "model.ov.xml"), compress_to_fp16=False)
    (d / "deploy.json").write_text(json.dumps({
        "format": "edgecnn-deploy/1", "runtime": "openvino", "precision": "fp32", "label_precision": "fp32",
        "model": "model.ov.xml", "threads": 1, "options": {"hint": "latency"}}))
    return d


def test_package_ships_the_tuned_openvino_winner(tuned_ir, trained, run_cli, tmp_path):
    from edgecnn.runtimes import Classifier

    bundle = tmp_path / "bundle"
    r = run_cli("package", tuned_ir / "deploy.json", "--against", trained.pt, "-o", bundle)
    assert r.exit_code == 0, r.output
    assert {"model.ov.xml", "model.ov.bin", "labels.txt", "predict.py"} <= {p.name for p in bundle.iterdir()}
    reqs = (bundle / "requirements.txt").read_text()
    assert "openvino>=" in reqs and "onnxruntime" not in reqs
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["runtime"] == "openvino" and m["deploy"]["threads"] == 1 and m["deploy"]["options"] == {"hint": "latency"}
    assert m["verify"][0]["runtime"] == "openvino" and m["verify"][0]["status"] == "pass"
    imgs = []
    for i, arr in enumerate(synthetic_dataset(1, seed=11).images):
        imgs.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(imgs[-1])
    p = subprocess.run([sys.executable, str(bundle / "predict.py"), *map(str, imgs)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = [ln.split("\t")[1] for ln in p.stdout.strip().splitlines()]
    with Classifier(tuned_ir / "deploy.json") as clf:
        assert got == [preds[0][0] for preds in clf.classify(imgs)]
    r = run_cli("package", "--check", bundle)
    assert r.exit_code == 0, r.output
