"""The judge (edgecnn.verify) cannot be fooled: files built by tampering an honest export, each refused with
one line naming why; the honest export passes; quantize, verify and package agree on the same file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from edgecnn.exporters.onnx import add_metadata
from onnx import numpy_helper

from edgecnn.verify import TOLERANCES, compare, judge


def cli(*args, pre: str = ""):
    code = f"import sys; {pre}from edgecnn.cli import main; sys.argv = ['edgecnn', *{list(map(str, args))!r}]; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def one_line(r, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("edgecnn: error:"), r.stderr
    return lines[0]


def _set_meta(m, **kv) -> None:
    add_metadata(m, kv)  # the exporter's own writer: a tampered file is written the way an honest one is


def _tampered(src, dst, *, scale_shift=None, **meta):
    m = onnx.load(str(src))
    if scale_shift is not None:  # logits -> a * logits + b after the last node: every argmax is kept
        a, b = scale_shift
        out = m.graph.output[0].name
        for n in m.graph.node:
            n.output[:] = [x + "_raw" if x == out else x for x in n.output]
        m.graph.initializer.extend([numpy_helper.from_array(np.array(a, np.float32), "tamper_a"),
                                    numpy_helper.from_array(np.array(b, np.float32), "tamper_b")])
        m.graph.node.extend([onnx.helper.make_node("Mul", [out + "_raw", "tamper_a"], ["tamper_scaled"]),
                             onnx.helper.make_node("Add", ["tamper_scaled", "tamper_b"], [out])])
    _set_meta(m, **meta)
    onnx.save(m, str(dst))
    return dst


def test_scaled_and_shifted_logits_labelled_int8_fail(trained, tmp_path):
    bad = _tampered(trained.onnx, tmp_path / "scaled.onnx", scale_shift=(100.0, 37.0), precision="int8")
    v = judge(bad, trained.pt, runtimes=["ort-cpu"])
    assert v.model.precision == "fp32" and v.rows[0].precision == "fp32"  # judged by the graph, not the label
    assert not v.passed and "metadata precision: metadata claims 'int8', the graph computes fp32" in v.reason()
    assert "relative logit error" in v.rows[0].note and v.rows[0].result.agreement == 1.0  # argmax kept
    line = one_line(cli("verify", bad, "--against", trained.pt), 1)
    assert "precision" in line and "|diff|" in line
    # The same distortion in a real int8 graph still fails: int8 rows bound the logit error.
    res = compare({"data": np.ones((4, 6))}, {"data": np.ones((4, 6)) * 100 + 37}, TOLERANCES["int8"])
    assert not res.passed and "relative logit error" in res.reason


@pytest.mark.parametrize("field,value,expect", [
    ("mean", "[0.0, 0.0, 0.0]", "mean: model says [0.0, 0.0, 0.0]"),
    ("class_names", None, "class_names: model says"),
    ("std", "[1e309, 1, 1]", "std: malformed: std must be finite"),  # the one validator names the problem
    ("mean", "5", "mean: malformed: mean must be three numbers"),
    ("input_size", "32", "input_size: model says '32'"),
])
def test_device_metadata_must_equal_the_checkpoint(trained, tmp_path, field, value, expect):
    if value is None:  # reversed class names
        names = json.loads({p.key: p.value for p in onnx.load(str(trained.onnx)).metadata_props}["class_names"])
        value = json.dumps(names[::-1])
    bad = _tampered(trained.onnx, tmp_path / "meta.onnx", **{field: value})
    line = one_line(cli("verify", bad, "--against", trained.pt), 1)
    assert expect in line and ("checkpoint says" in line or "malformed" in expect), line


def test_garbage_bytes_with_runtime_torch(trained, tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    line = one_line(cli("verify", bad, "--against", trained.pt, "--runtime", "torch"), 2)
    assert "not a valid ONNX file" in line
    # An honest file with --runtime torch: torch runs the reference, it is no row for MODEL.
    line = one_line(cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "torch"), 2)
    assert "reference" in line and "ort-cpu" in line


BLOCK = "sys.modules['onnxruntime'] = None; sys.modules['openvino'] = None; "


def test_runtime_all_where_only_torch_is_usable(trained, tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x08\x07" + np.random.default_rng(1).bytes(3000))
    line = one_line(cli("verify", bad, "--against", trained.pt, "--runtime", "all", pre=BLOCK), 2)
    assert "garbage.onnx" in line
    # The honest export: nothing ran it, so no verdict can be a pass (exit 3, naming what is missing).
    line = one_line(cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "all", pre=BLOCK), 3)
    assert "no runtime ran model.onnx" in line and "onnxruntime" in line


def test_untouched_export_passes_and_reference_is_not_a_row(trained):
    v = judge(trained.onnx, trained.pt)  # every runtime that runs .onnx
    assert v.passed, v.reason()
    assert "torch" not in {r.runtime for r in v.rows}
    assert v.reference.startswith("PyTorch eager fp32 on model.pt")
    assert all(m.status == "ok" for m in v.metadata)


def test_a_model_without_metadata_verifies_with_a_note(trained, tmp_path):
    m = onnx.load(str(trained.onnx))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "plain.onnx"))
    v = judge(tmp_path / "plain.onnx", trained.pt, runtimes=["ort-cpu"])
    assert v.passed, v.reason()
    assert any("no edgecnn metadata" in n for n in v.notes)


def test_per_class_report_and_confusion_picture(trained, tmp_path):
    r = cli("verify", trained.onnx, "--against", trained.pt, "--confusion", tmp_path / "cm.png")
    assert r.returncode == 0, r.stderr
    assert "per class (precision/recall" in r.stdout and "circle" in r.stdout
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worst_class_recall_drop_is_bounded():
    """A 1-point average drop can hide one class losing six: the int8 gate catches it."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 100)
    ref = rng.normal(0, 1, (600, 6))
    ref[np.arange(600), labels] += 6.0  # the reference is right on every image
    out = ref.copy()
    lost = np.where(labels == 2)[0][:6]  # class 2 loses 6 of its 100 images to class 3
    out[lost, 3] = out[lost, 2] + 0.5
    names = [f"c{i}" for i in range(6)]
    res = compare({"data": ref}, {"data": out}, TOLERANCES["int8"], labels, names)
    assert (res.acc_ref - res.acc_out) * 100 == pytest.approx(1.0)  # within the 1-point average bound
    assert res.agreement == pytest.approx(0.99) and res.rel_l2 < TOLERANCES["int8"].max_rel_l2
    assert not res.passed and "recall of class 'c2' drops 6.0 points" in res.reason
    assert res.per_class[2].recall_out == pytest.approx(0.94) and res.per_class[3].precision_out < 1


def test_quantize_verify_and_package_agree(trained, tmp_path):
    q = tmp_path / "m.int8.onnx"
    r = cli("quantize", trained.onnx_dynamic, "-o", q)
    assert r.returncode == 0, r.stderr
    r = cli("verify", q, "--against", trained.pt, "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stdout + r.stderr
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["graph_precision"] == "int8" and verdict["passed"]
    r = cli("package", q, "--against", trained.pt, "-o", tmp_path / "bundle")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert [x["model_sha256"] for x in manifest["verify"]] == [verdict["model_sha256"]]
    # The same tampered int8 file: verify and package refuse it with the same reason.
    bad = _tampered(q, tmp_path / "bad.int8.onnx", scale_shift=(100.0, 37.0))
    v_line = one_line(cli("verify", bad, "--against", trained.pt), 1)
    p_line = one_line(cli("package", bad, "--against", trained.pt, "-o", tmp_path / "b2"), 1)
    reason = v_line.split("does not match PyTorch: ")[1]
    assert "relative logit error" in reason and reason in p_line
    assert not (tmp_path / "b2").exists()


def test_manifest_rows_must_name_a_bundled_file(trained, tmp_path):
    from edgecnn.errors import IntegrityError
    from edgecnn.package import build_bundle, check_bundle

    r = cli("verify", trained.onnx_dynamic, "--against", trained.pt, "--json", tmp_path / "other.json")
    assert r.returncode == 0, r.stderr
    with pytest.raises(IntegrityError, match="not in the bundle"):  # rows of another file
        build_bundle([trained.onnx], tmp_path / "b1", verify_json=tmp_path / "other.json")
    out = tmp_path / "b2"
    build_bundle([trained.onnx], out, against=trained.pt)
    check_bundle(out)
    man = json.loads((out / "manifest.json").read_text())
    man["verify"][0]["model_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(man))
    line = one_line(cli("package", "--check", out), 1)
    assert "judged a file that is not in the bundle" in line
