"""`edgecnn verify --runtime all`: every runtime x precision, skipped rows never pass, FAIL exits 1."""

from __future__ import annotations

import json

from edgecnn.runtimes import get_runtime_class, runtime_names

MODEL_RUNTIMES = [n for n in runtime_names() if n != "torch"]  # torch runs the reference, never a row


def test_all_runs_every_runtime_and_precision(trained, run_cli, tmp_path):
    out = tmp_path / "matrix.json"
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "all", "--json", out)
    verdict = json.loads(out.read_text())
    rows = verdict["rows"]
    assert r.exit_code == (1 if any(x["status"] == "FAIL" for x in rows) else 0), r.output
    want = {(n, p) for n in MODEL_RUNTIMES for p in get_runtime_class(n).precisions}
    asked = {(x["runtime"], x["precision"]) for x in rows}
    assert asked == want and len(rows) == len(want)
    for x in rows:
        usable, why = get_runtime_class(x["runtime"]).available()
        if not usable:
            assert x["status"] == "skipped" and x["note"] == why
        if x["status"] == "skipped":
            assert x["note"] and "max_abs" not in x
        else:
            assert x["status"] in ("pass", "FAIL") and x["n"] > 0 and x["model_sha256"] == verdict["model_sha256"]
    by = {(x["runtime"], x["precision"]): x for x in rows}
    assert by[("ort-cpu", "fp32")]["status"] == "pass" and by[("ort-cpu", "fp32")]["max_abs"] < 1e-4
    assert by[("openvino", "fp32")]["status"] == "pass" and by[("openvino", "fp32")]["max_abs"] < 1e-4
    assert "reference  PyTorch eager fp32 on model.pt" in r.stdout
    # The printed matrix has the same rows, in the same order.
    printed = [ln.split()[:2] for ln in r.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in MODEL_RUNTIMES]
    assert printed == [[x["runtime"], x["precision"]] for x in rows]


def test_precision_narrows_the_matrix(trained, run_cli, tmp_path):
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "all", "--precision", "fp32",
                "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    assert {x["precision"] for x in rows} == {"fp32"} and len(rows) == len(MODEL_RUNTIMES)


def test_a_real_failure_exits_1(trained, run_cli):
    # A tolerance tighter than the measured fp32 difference makes a real FAIL.
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "ort-cpu", "--rtol", "0", "--atol", "0")
    assert r.exit_code == 1
    assert "FAIL" in r.stdout


def test_a_file_no_runtime_can_open_is_bad_input(trained, run_cli, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(trained.onnx.read_bytes()[:300])
    r = run_cli("verify", bad, "--against", trained.pt, "--runtime", "all")
    assert r.exit_code == 2
    assert r.stderr.startswith("edgecnn: error:") and r.stderr.strip().count("\n") == 0


def test_runtimes_and_doctor_report_every_runtime(run_cli, tmp_path):
    out = tmp_path / "doctor.json"
    r = run_cli("runtimes", "--json", out)
    assert r.exit_code == 0
    rows = json.loads(out.read_text())
    assert [x["runtime"] for x in rows] == runtime_names()
    for x in rows:
        usable, why = get_runtime_class(x["runtime"]).available()
        assert x["usable"] == usable and x["why_not"] == why
        assert x["packages"]  # the versions it was built from
    ort_cpu = next(x for x in rows if x["runtime"] == "ort-cpu")
    assert "CPU" in ort_cpu["devices"]
    assert run_cli("doctor").stdout == r.stdout
