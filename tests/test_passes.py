"""Exact graph passes: the optimized graph gives bit-identical logits on ORT CPU (np.array_equal)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from edgecnn.exporters.onnx import export
from edgecnn.exporters.passes import optimize, swap_elu_maxpool


@pytest.fixture(scope="module")
def pair(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("passes")
    opt = export(trained.pt, folder / "opt.onnx", dynamic_batch=True, check=False)
    plain = export(trained.pt, folder / "plain.onnx", dynamic_batch=True, check=False, optimize=False)
    return opt, plain


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _session(path, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_export_applies_and_reports_the_swap(pair):
    opt, plain = pair
    assert [name for name, _ in opt.passes] == ["elu-maxpool-swap"]
    assert "2 x" in opt.passes[0][1]
    assert plain.passes == []
    assert _ops(opt.path)[:6] == ["Conv", "MaxPool", "Elu", "Conv", "MaxPool", "Elu"]
    assert _ops(plain.path)[:6] == ["Conv", "Elu", "MaxPool", "Conv", "Elu", "MaxPool"]
    onnx.checker.check_model(str(opt.path), full_check=True)


@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_logits_bit_identical(pair, level):
    import onnxruntime as ort
    from edgecnn.runtimes.preprocess import normalize

    from edgecnn.data import synthetic_dataset

    opt, plain = pair
    lvl = getattr(ort.GraphOptimizationLevel, level)
    a, b = _session(opt.path, lvl), _session(plain.path, lvl)
    rng = np.random.default_rng(7)
    ds = synthetic_dataset(per_class=8, seed=11)
    meta = dict(a.get_modelmeta().custom_metadata_map)
    import json

    inputs = [
        rng.standard_normal((32, 3, 64, 64)).astype(np.float32),
        (rng.standard_normal((32, 3, 64, 64)) * 20).astype(np.float32),  # big values: both ELU branches
        normalize(ds.images, json.loads(meta["mean"]), json.loads(meta["std"])),
    ]
    for x in inputs:
        ya = a.run(None, {"input": x})[0]
        yb = b.run(None, {"input": x})[0]
        assert np.array_equal(ya, yb)


def test_pass_skips_what_it_must_not_touch():
    from onnx import TensorProto, helper

    def graph(alpha: float, elu_is_output: bool):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
        e = helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 1, 4, 4])
        nodes = [helper.make_node("Elu", ["x"], ["e"], alpha=alpha),
                 helper.make_node("MaxPool", ["e"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
        outs = [y, e] if elu_is_output else [y]
        return helper.make_model(helper.make_graph(nodes, "g", [x], outs))

    assert swap_elu_maxpool(graph(-0.5, False)).count == 0  # negative alpha: not monotonic
    assert swap_elu_maxpool(graph(1.0, True)).count == 0  # the Elu output is also a graph output
    m = graph(1.0, False)
    assert [r.count for r in optimize(m)] == [1]
    assert [n.op_type for n in m.graph.node] == ["MaxPool", "Elu"]
    onnx.checker.check_model(m, full_check=True)


def test_cli_no_optimize(trained, tmp_path, run_cli):
    res = run_cli("export", trained.pt, "-o", tmp_path / "m.onnx", "--no-optimize", "--no-check")
    assert res.exit_code == 0, res.output
    assert "graph passes: off" in res.output
    assert _ops(tmp_path / "m.onnx")[1] == "Elu"
    res = run_cli("export", trained.pt, "-o", tmp_path / "o.onnx", "--no-check")
    assert res.exit_code == 0, res.output
    assert "graph pass elu-maxpool-swap" in res.output
    assert _ops(tmp_path / "o.onnx")[1] == "MaxPool"
