"""Export (shape, names, metadata, checker, parity gate) and verify (passes, and fails on altered weights)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from edgecnn.exporters.onnx import export

from edgecnn.checkpoint import load_checkpoint


def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_fixed_export_shape_names_metadata_and_checker(trained):
    m = onnx.load(str(trained.onnx))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert _dims(m.graph.input[0]) == [1, 3, 64, 64]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in m.metadata_props}
    ck = load_checkpoint(trained.pt)
    assert json.loads(meta["class_names"]) == ck.class_names
    assert json.loads(meta["mean"]) == ck.mean and json.loads(meta["std"]) == ck.std
    assert meta["input_layout"] == "NCHW" and meta["source_sha256"] == ck.sha256
    assert meta["edgecnn_version"]


def test_dynamic_batch_and_opset(trained, tmp_path):
    m = onnx.load(str(trained.onnx_dynamic))
    assert isinstance(_dims(m.graph.input[0])[0], str)
    res = export(trained.pt, tmp_path / "op13.onnx", opset=13)
    assert {o.domain: o.version for o in onnx.load(str(res.path)).opset_import}[""] == 13
    assert res.parity[0].status == "pass"


def test_export_parity_failure_leaves_no_file(trained, tmp_path, run_cli):
    target = tmp_path / "strict.onnx"
    r = run_cli("export", trained.pt, "-o", target, "--atol", "0", "--rtol", "0")
    assert r.exit_code == 1, r.output
    assert "does not match PyTorch" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_export_default_path_and_bare_state_dict(tmp_path, run_cli):
    from edgecnn.model import Net

    torch.manual_seed(0)
    torch.save(Net(3).state_dict(), tmp_path / "course.pt")
    r = run_cli("export", tmp_path / "course.pt")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "course.onnx").is_file()
    assert "pass" in r.output and "max abs" in r.output
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "course.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == ["class_0", "class_1", "class_2"]


def test_verify_passes_on_the_real_export(trained, run_cli, tmp_path):
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "ort-cpu",
                "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r.output + r.stderr
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["passed"] and verdict["graph_precision"] == "fp32"
    assert all(m["status"] == "ok" for m in verdict["metadata"])
    rows = verdict["rows"]
    assert [x["runtime"] for x in rows] == ["ort-cpu"]  # the reference is not a row
    ort = rows[0]
    assert ort["model_sha256"] == verdict["model_sha256"]
    assert ort["status"] == "pass" and 0 < ort["max_abs"] < 1e-3 and ort["agreement"] == 1.0


def _altered(src, dst, scale):
    m = onnx.load(str(src))
    init = next(i for i in m.graph.initializer if i.name.endswith("weight") and len(i.dims) == 4)
    w = onnx.numpy_helper.to_array(init) * np.float32(scale)
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(m, str(dst))


@pytest.mark.parametrize("scale", [1.01, 0.0])
def test_verify_fails_on_altered_weights(trained, tmp_path, run_cli, scale):
    bad = tmp_path / "altered.onnx"
    _altered(trained.onnx, bad, scale)
    r = run_cli("verify", bad, "--against", trained.pt)
    assert r.exit_code == 1
    assert "FAIL" in r.output and "does not match PyTorch" in r.stderr


def test_verify_tolerance_override(trained, run_cli, tmp_path):
    bad = tmp_path / "altered.onnx"
    _altered(trained.onnx, bad, 1.01)
    # A tolerance loose enough to accept a 1% weight change turns the verdict into a pass.
    r = run_cli("verify", bad, "--against", trained.pt, "--rtol", "0.5", "--atol", "1.0")
    assert r.exit_code == 0, r.output
    assert "pass" in r.output
