"""Preprocessing inside the graph: uint8 RGB HWC in, same numbers as the Python preprocessing path."""

from __future__ import annotations

import numpy as np
import pytest
from edgecnn.runtimes import Classifier, get_runtime_class
from edgecnn.runtimes.preprocess import preprocess, to_batch_uint8
from PIL import Image

from edgecnn.errors import InvalidInputError

RTOL, ATOL = 1e-3, 1e-5  # the fp32 tolerance


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    from edgecnn.exporters.onnx import export

    folder = tmp_path_factory.mktemp("embed")
    logits = export(trained.pt, folder / "emb.onnx", embed_preprocessing=True)
    probs = export(trained.pt, folder / "emb_softmax.onnx", embed_preprocessing=True, embed_softmax=True)
    dyn = export(trained.pt, folder / "emb_dyn.onnx", embed_preprocessing=True, dynamic_batch=True)
    assert all(r.parity[0].status == "pass" for r in (logits, probs, dyn))
    return logits.path, probs.path, dyn.path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real PNG files from the built-in set: 64x64, a 97x53 one, a grayscale one and an RGBA one."""
    from edgecnn.data import synthetic_dataset

    folder = tmp_path_factory.mktemp("images")
    ds = synthetic_dataset(per_class=2, seed=77)
    paths = []
    for i, img in enumerate(ds.images):
        p = folder / f"img{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    big = Image.fromarray(ds.images[0]).resize((97, 53), Image.BICUBIC)
    big.save(folder / "wide_97x53.png")
    Image.fromarray(ds.images[1]).convert("L").resize((120, 120)).save(folder / "gray_120.png")
    Image.fromarray(ds.images[2]).convert("RGBA").save(folder / "rgba.png")
    return paths + [folder / "wide_97x53.png", folder / "gray_120.png", folder / "rgba.png"]


def test_graph_uses_standard_ops_and_records_metadata(embedded):
    import onnx

    m = onnx.load(str(embedded[1]))
    inp = m.graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.shape.dim] == [1, 64, 64, 3]
    assert [n.op_type for n in m.graph.node[:5]] == ["Cast", "Div", "Sub", "Div", "Transpose"]
    assert m.graph.node[-1].op_type == "Softmax"
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)  # no custom ops
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["input_layout"] == "NHWC-uint8"
    assert meta["embedded_preprocessing"] == "1" and meta["embedded_softmax"] == "1"


def test_logits_match_python_preprocessing_on_real_images(trained, embedded, image_files):
    with Classifier(trained.onnx) as plain, Classifier(embedded[0]) as emb:
        assert emb.runtime.input_layout == "NHWC-uint8" and plain.runtime.input_layout == "NCHW"
        ref = plain.run(preprocess(image_files, plain.info.mean, plain.info.std))
        out = emb.run(to_batch_uint8(image_files))
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("which", [0, 1, 2], ids=["logits", "softmax", "dynamic"])
def test_classifier_probabilities_agree(trained, embedded, image_files, which):
    with Classifier(trained.onnx) as plain, Classifier(embedded[which]) as emb:
        ref = plain.probabilities(image_files)
        got = emb.probabilities(image_files)
        assert plain.classify(image_files, top_k=2)[0][0][0] == emb.classify(image_files, top_k=2)[0][0][0]
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_dynamic_batch_runs_a_whole_batch_at_once(embedded, image_files):
    with Classifier(embedded[2]) as emb:
        assert emb.runtime.input_shape[0] is None
        assert emb.run(to_batch_uint8(image_files)).shape == (len(image_files), 6)


def test_embedded_model_refuses_float_and_wrong_layout(embedded):
    with Classifier(embedded[0]) as emb:
        with pytest.raises(InvalidInputError, match="uint8"):
            emb.run(np.zeros((1, 64, 64, 3), np.float32))
        with pytest.raises(InvalidInputError, match="shape"):
            emb.run(np.zeros((1, 3, 64, 64), np.uint8))


def test_openvino_matches_too(trained, embedded, image_files):
    ok, why = get_runtime_class("openvino").available()  # CI installs it: unusable is a failure
    assert ok, why
    with Classifier(trained.onnx) as plain:
        ref_probs = plain.probabilities(image_files)
        ref_logits = plain.run(plain.preprocess(image_files))
    with Classifier(embedded[0], runtime="openvino") as emb:
        logits = emb.run(to_batch_uint8(image_files))
    with Classifier(embedded[1], runtime="openvino") as emb:
        probs = emb.probabilities(image_files)
    np.testing.assert_allclose(logits, ref_logits, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(probs, ref_probs, rtol=RTOL, atol=ATOL)
    assert (probs.argmax(1) == ref_probs.argmax(1)).all()


def test_cli_export_embed(trained, run_cli, tmp_path):
    r = run_cli("export", trained.pt, "-o", tmp_path / "e.onnx", "--embed-preprocessing", "--embed-softmax")
    assert r.exit_code == 0, r.output
    assert "uint8 [1,64,64,3]" in r.output and "pass" in r.output
    r = run_cli("predict", tmp_path / "e.onnx", trained.folder / "nope.png")
    assert r.exit_code == 2
    r = run_cli("export", trained.pt, "-o", tmp_path / "f.onnx", "--embed-softmax")
    assert r.exit_code == 2 and "--embed-preprocessing" in r.output
    assert not (tmp_path / "f.onnx").exists()


def test_verify_and_bench_feed_raw_pixels(trained, embedded, run_cli):
    r = run_cli("verify", embedded[1], "--against", trained.pt, "--runtime", "ort-cpu,openvino")
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.output.splitlines() if ln.startswith(("ort-cpu", "openvino"))]
    assert [(row[0], row[1], row[8]) for row in rows] == [("ort-cpu", "fp32", "pass"), ("openvino", "fp32", "pass")]
    assert "preprocessing is inside the graph" in r.output
    r = run_cli("bench", embedded[0], "--batch", "1,2", "--min-time", "0.05", "--warmup", "1")
    assert r.exit_code == 0, r.output
