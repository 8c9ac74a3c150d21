"""bench sweeps (sane numbers, parseable outputs, nothing labelled that did not run) and tune."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from edgecnn.data import synthetic_dataset


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgecnn", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_sweep_numbers_are_sane_and_outputs_parse(trained, tmp_path):
    j, c, p = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    r = cli("bench", trained.onnx, "--runtime", "ort-cpu,openvino", "--precision", "fp32,bf16", "--threads", "1",
            "--batch", "1,4", "--min-time", "0.1", "--json", j, "--csv", c, "--plot", p)
    assert r.returncode == 0, r.stderr
    assert "machine:" in r.stdout and "roofline:" in r.stdout
    doc = json.loads(j.read_text())
    cells = {(x["runtime"], x["precision"], x["batch"]) for x in doc["rows"]}
    import openvino as ov

    # OpenVINO bf16 runs only on a CPU that lists BF16; elsewhere it is a skipped row with the reason.
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    ov_bf16 = {("openvino", "bf16", 1), ("openvino", "bf16", 4)}
    assert cells == {("ort-cpu", "fp32", 1), ("ort-cpu", "fp32", 4), ("openvino", "fp32", 1),
                     ("openvino", "fp32", 4)} | (ov_bf16 if bf16 else set())
    skipped = [(s["runtime"], s["precision"], s.get("batch")) for s in doc["skipped"]]
    assert skipped == [("ort-cpu", "bf16", None)] + ([] if bf16 else [("openvino", "bf16", 1), ("openvino", "bf16", 4)])
    assert doc["failed"] == []
    assert doc["peak_gflops"] > 0 and doc["floor_img_s"] == pytest.approx(doc["peak_gflops"] * 1e9 / doc["flops_per_image"])
    for x in doc["rows"]:
        assert 0 < x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"]
        assert x["throughput"] == pytest.approx(x["batch"] * 1000.0 / x["mean_ms"], rel=1e-6)
        assert x["threads"] == 1 and x["peak_rss_mb"] > 10 and x["load_s"] > 0
        assert x["file_bytes"] == trained.onnx.stat().st_size
        assert x["device"] == "CPU"
        if x["precision"] == "fp32":
            assert x["floor_pct"] == pytest.approx(100 * x["throughput"] / x["floor_img_s"])
            assert x["floor_img_s"] == pytest.approx(doc["peaks"]["1"] * 1e9 / doc["flops_per_image"])
        else:
            assert "floor_pct" not in x
    rows = list(csv.DictReader(c.open()))
    assert len(rows) == len(cells) and float(rows[0]["throughput"]) > 0
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_never_reports_a_runtime_it_did_not_run(trained, tmp_path):
    r = cli("bench", trained.onnx, "--runtime", "ort-cuda", "--batch", "1", "--min-time", "0.1", "--no-roofline")
    assert r.returncode == 3
    assert "ort-cuda is not usable here" in r.stderr and "Traceback" not in r.stderr
    r = cli("bench", trained.onnx, "--runtime", "ort-cpu,ort-cuda", "--batch", "1", "--min-time", "0.1",
            "--no-roofline", "--json", tmp_path / "b.json")
    assert r.returncode == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert {x["runtime"] for x in doc["rows"]} == {"ort-cpu"}
    assert doc["skipped"][0]["runtime"] == "ort-cuda"


def test_tune_writes_a_deploy_config_that_classifier_and_bench_load(trained, tmp_path):
    from edgecnn.runtimes import Classifier

    out = tmp_path / "tuned"
    r = cli("tune", trained.onnx, "--runtime", "ort-cpu", "--threads", "1", "--min-time", "0.05", "--batch", "8",
            "-o", out)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "deploy.json").read_text())
    assert cfg["format"] == "edgecnn-deploy/1" and cfg["runtime"] == "ort-cpu"
    chosen = [c for c in cfg["candidates"] if c["gate"] == "pass"]
    # The winner is picked on the screening figures, and the figure recorded is its re-timing alone in a
    # fresh process (a best-of-noisy-runs figure is not what a user gets).
    assert chosen and cfg["measured"]["screening"]["throughput"] == max(c["throughput"] for c in chosen)
    assert "fresh process" in cfg["measured"]["how"] and cfg["measured"]["throughput"] > 0
    assert cfg["measured"]["p50_ms_batch1"] > 0
    assert {c["precision"] for c in cfg["candidates"]} == {"fp32", "int8"}
    images = list(synthetic_dataset(10, seed=77).images)
    with Classifier(out / "deploy.json") as tuned, Classifier(trained.onnx) as plain:
        a = np.array([t[0][0] for t in tuned.classify(images)])
        b = np.array([t[0][0] for t in plain.classify(images)])
    assert (a == b).mean() >= 0.97
    r = cli("bench", out / "deploy.json", "--batch", "1", "--min-time", "0.1", "--no-roofline")
    assert r.returncode == 0, r.stderr
    assert cfg["label_precision"] in r.stdout


def test_deploy_config_cannot_point_outside_its_folder(tmp_path, trained):
    from edgecnn.runtimes import Classifier

    from edgecnn.errors import InvalidInputError

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "deploy.json").write_text(json.dumps(
        {"format": "edgecnn-deploy/1", "runtime": "ort-cpu", "model": str(trained.onnx)}))
    with pytest.raises(InvalidInputError, match="leaves the folder"):
        Classifier(tmp_path / "d" / "deploy.json")


def _tune_in_process(trained, out, monkeypatch, fail_batch=None):
    """`edgecnn tune` in this process (so the fresh-process re-timing can be faked); returns the result."""
    from click.testing import CliRunner

    import edgecnn.sweep as sweep
    from edgecnn.cli import cli as edgecnn_cli

    real = sweep.run_config

    def run_config(cfg, batches, *a, **kw):  # the real child, but batch ``fail_batch`` comes back failed
        rows = real(cfg, batches, *a, **kw)
        return [{"failed": True, "batch": r["batch"], "error": "fake: out of memory"}
                if r["batch"] == fail_batch else r for r in rows]

    monkeypatch.setattr(sweep, "run_config", run_config)
    return CliRunner().invoke(edgecnn_cli, ["tune", str(trained.onnx), "--runtime", "ort-cpu", "--threads", "1",
                                            "--min-time", "0.05", "--batch", "8", "-o", str(out)])


def _winner_row(stdout: str) -> list[str]:
    rows = [ln.split() for ln in stdout.splitlines() if ln.startswith("*  ")]
    assert len(rows) == 1, stdout
    return rows[0]


def test_tune_prints_what_deploy_json_records(trained, tmp_path, monkeypatch):
    r = _tune_in_process(trained, tmp_path / "t", monkeypatch)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "t" / "deploy.json").read_text())
    m = cfg["measured"]
    assert m["sources"] == {"throughput": "re-timed in a fresh process", "p50_ms_batch1": "re-timed in a fresh process"}
    label = cfg["label_precision"] + ("" if cfg["precision"] in ("fp32", cfg["label_precision"]) else f"+{cfg['precision']}")
    row = _winner_row(r.stdout)
    # * runtime precision threads [options] gate accuracy img/s re-timed-img/s p50 re-timed-p50
    assert row[1:3] == [cfg["runtime"], label]
    assert row[-4] == f"{m['screening']['throughput']:,.0f}" and row[-3] == f"{m['throughput']:,.0f}"
    assert row[-1] == f"{m['p50_ms_batch1']:.3f}"
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"fastest passing (throughput): {cfg['runtime']} {label} threads=1")
    assert f"{m['throughput']:,.0f} img/s @b8 (re-timed in a fresh process)" in last
    assert "{" not in last and "}" not in last


def test_tune_keeps_the_winner_when_its_retiming_fails_on_one_batch(trained, tmp_path, monkeypatch):
    r = _tune_in_process(trained, tmp_path / "t", monkeypatch, fail_batch=8)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "t" / "deploy.json").read_text())
    m = cfg["measured"]
    passing = [c for c in cfg["candidates"] if c["gate"] == "pass"]
    best = max(passing, key=lambda c: c["throughput"])
    assert [c for c in cfg["candidates"] if c["winner"]] == [best]
    assert (cfg["runtime"], cfg["label_precision"]) == (best["runtime"], best["precision"])
    assert "fake: out of memory" in m["retime_error"] and "fake: out of memory" in best["retime_error"]
    assert m["throughput"] == best["throughput"] and m["sources"]["throughput"] == "screening"
    assert "re-timing failed" in m["how"]
    assert m["sources"]["p50_ms_batch1"] == "re-timed in a fresh process" and m["p50_ms_batch1"] > 0
    row = _winner_row(r.stdout)
    assert row[-3] == "failed" and row[-4] == f"{m['throughput']:,.0f}"
    last = r.stdout.strip().splitlines()[-1]
    assert f"{m['throughput']:,.0f} img/s @b8 (screening)" in last
    assert "(re-timed in a fresh process)" in last  # the p50, which was re-timed
