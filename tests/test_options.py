"""Runtime options: declared once per runtime, typed, validated before any session, scoped with
RUNTIME.KEY, routed to the runtimes that take them; the help and the runtimes report come from the
declarations; a sweep keeps its measured rows when a configuration fails."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from edgecnn.runtimes import Classifier, get_runtime_class, load_runtime, runtime_names
from edgecnn.runtimes.cpu import current_defaults
from edgecnn.runtimes.options import declared, parse_cli, route, route_registered

from edgecnn.errors import InvalidInputError


def _one_line(r, code):
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("edgecnn: error:") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_each_runtime_declares_its_options_and_help_and_report_are_generated(run_cli):
    flat = " ".join(run_cli("bench", "--help").stdout.split())
    report = run_cli("runtimes").stdout
    for name in runtime_names():
        for o in declared(get_runtime_class(name)):
            assert o.name and o.help and o.type in (bool, int, str, dict) and "\n" not in o.help
            assert f"{o.name}=" in flat  # the -O help of every command lists it
            assert any(line.split()[:2] == [name, o.name] and o.help[:30] in line for line in report.splitlines())
    assert "spinning=true|false" in flat and "hint=latency|throughput" in flat
    assert "[RUNTIME.]KEY=VALUE" in flat


def test_unknown_or_ill_typed_options_fail_before_any_session(trained, monkeypatch):
    import onnxruntime
    from edgecnn.runtimes.openvino import OpenVino

    def never(*a, **k):
        raise AssertionError("a session was built")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    monkeypatch.setattr(OpenVino, "_load", never)  # the options are checked before the backend loads
    with pytest.raises(InvalidInputError, match=r"ort-cpu: unknown option bogus \(ort-cpu takes spinning\)"):
        load_runtime("ort-cpu", trained.onnx, bogus=1)
    with pytest.raises(InvalidInputError, match="ort-cpu: option spinning='maybe': expected true or false"):
        load_runtime("ort-cpu", trained.onnx, spinning="maybe")
    with pytest.raises(InvalidInputError, match=r"openvino: option hint='fastest': allowed: latency\|throughput"):
        load_runtime("openvino", trained.onnx, hint="fastest")
    with pytest.raises(InvalidInputError, match="openvino: option device='TPU'"):
        load_runtime("openvino", trained.onnx, device="TPU")
    with pytest.raises(InvalidInputError, match="openvino: unknown option colour.*takes device, hint"):
        load_runtime("openvino", trained.onnx, colour="blue")
    with pytest.raises(InvalidInputError, match="threads"):
        load_runtime("ort-cpu", trained.onnx, threads=0)


def test_cli_option_errors_are_one_line_with_exit_2(trained, run_cli):
    img = trained.pt  # never read: the options fail first
    r = run_cli("predict", trained.onnx, img, "-O", "bogus=1")
    _one_line(r, 2)
    assert "ort-cpu takes spinning" in r.stderr
    _one_line(run_cli("predict", trained.onnx, img, "-O", "spinning=maybe"), 2)
    r = run_cli("predict", trained.onnx, img, "-O", "openvino.hint=throughput")
    _one_line(r, 2)
    assert "openvino is not in this command" in r.stderr
    r = run_cli("predict", trained.onnx, img, "-O", "nosuch.spinning=false")
    _one_line(r, 2)
    assert "'nosuch' is not a runtime" in r.stderr
    r = run_cli("bench", trained.onnx, "--runtime", "ort-cpu,torch", "-O", "hint=throughput")
    _one_line(r, 2)
    assert "no runtime of this command takes hint" in r.stderr and "ort-cpu takes spinning" in r.stderr


def test_unscoped_keys_go_to_the_runtimes_that_declare_them():
    names = ["openvino", "ort-cpu", "ort-cuda"]
    got = route_registered(parse_cli(["hint=throughput", "spinning=false", "ort-cuda.device_id=1",
                                      "threads=2"], runtime_names()), names)
    assert got == {"openvino": {"hint": "throughput", "threads": 2},
                   "ort-cpu": {"spinning": False, "threads": 2},
                   "ort-cuda": {"spinning": False, "device_id": 1, "threads": 2}}
    with pytest.raises(InvalidInputError, match="ort-cpu: unknown option hint"):
        route_registered(parse_cli(["ort-cpu.hint=latency"], runtime_names()), names)
    with pytest.raises(InvalidInputError, match="ort-cuda: option device_id='-1': must be >= 0"):
        route_registered(parse_cli(["device_id=-1"], runtime_names()), names)
    assert route([], ["ort-cpu"], lambda n: ()) == {"ort-cpu": {}}


def test_rt_options_are_what_was_applied(trained):
    with load_runtime("openvino", trained.onnx, hint="throughput") as rt:
        assert rt.options == {"device": "CPU", "hint": "throughput",  # nothing popped; unset ones as applied
                              "hyper_threading": current_defaults().openvino_hyper_threading}
    with Classifier(trained.onnx, spinning="false") as clf:  # strings are typed by the declaration
        assert clf.runtime.options == {"spinning": False}
    with load_runtime("ort-cpu", trained.onnx) as rt:  # unset: this machine's per-kind default, as applied
        assert rt.options == {"spinning": current_defaults().spinning}
    with load_runtime("openvino", trained.onnx) as rt:
        assert rt.options == {"device": "CPU", "hint": current_defaults().openvino_hint,
                              "hyper_threading": current_defaults().openvino_hyper_threading}


@pytest.mark.parametrize("name", ["ort-cpu", "openvino"])
def test_run_after_close_is_a_clear_error(trained, name):
    rt = load_runtime(name, trained.onnx)
    x = np.zeros((1, 3, 64, 64), np.float32)
    assert rt.run(x).shape == (1, 6)
    rt.close()
    with pytest.raises(InvalidInputError, match=f"runtime {name} was closed"):
        rt.run(x)


def test_bench_routes_options_per_runtime_in_one_sweep(trained, tmp_path):
    j = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "edgecnn", "bench", str(trained.onnx), "--runtime", "openvino,ort-cpu",
                        "-O", "hint=throughput", "-O", "ort-cpu.spinning=false", "--batch", "1", "--min-time", "0.05",
                        "--no-roofline", "--json", str(j)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    opts = {x["runtime"]: x["options"] for x in json.loads(j.read_text())["rows"]}
    assert opts == {"openvino": {"hint": "throughput"}, "ort-cpu": {"spinning": False}}


def test_a_failing_configuration_is_a_row_and_the_others_are_measured_and_written(trained, tmp_path, run_cli,
                                                                                  monkeypatch):
    import edgecnn.sweep as sw

    real = sw.run_config

    def run_config(cfg, *a, **k):
        if cfg.runtime == "openvino":
            raise InvalidInputError("openvino fp32: the benchmark process failed: RuntimeError: boom")
        return real(cfg, *a, **k)

    monkeypatch.setattr(sw, "run_config", run_config)
    j, c, p = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    r = run_cli("bench", trained.onnx, "--runtime", "openvino,ort-cpu", "--batch", "1,2", "--min-time", "0.05",
                "--no-roofline", "--json", j, "--csv", c, "--plot", p)
    assert r.exit_code == 1
    assert "FAILED: openvino fp32" in r.stdout and "boom" in r.stdout
    assert "configuration(s) failed" in r.stderr
    doc = json.loads(j.read_text())
    assert {(x["runtime"], x["batch"]) for x in doc["rows"]} == {("ort-cpu", 1), ("ort-cpu", 2)}
    assert [(f["runtime"], f["precision"]) for f in doc["failed"]] == [("openvino", "fp32")]
    assert "boom" in doc["failed"][0]["error"]
    rows = list(csv.DictReader(c.open()))
    assert [(x["runtime"], bool(x["error"])) for x in rows] == [("ort-cpu", False), ("ort-cpu", False),
                                                                ("openvino", True)]
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_verify_routes_options_per_runtime(trained, run_cli, monkeypatch):
    import edgecnn.runtimes as rts

    seen, real = [], rts.load_runtime

    def spy(name, path, **kw):
        seen.append((name, {k: v for k, v in kw.items() if k != "precision"}))
        return real(name, path, **kw)

    monkeypatch.setattr(rts, "load_runtime", spy)
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "ort-cpu,openvino",
                "-O", "hint=throughput", "-O", "ort-cpu.spinning=false")
    assert r.exit_code == 0, r.output
    assert dict(seen) == {"ort-cpu": {"spinning": False}, "openvino": {"hint": "throughput"}}
