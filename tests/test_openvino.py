"""The openvino runtime: fp32 pinned, bf16 under its own tolerance, IR, metadata, threads, no fallback."""

from __future__ import annotations

import numpy as np

# CI installs openvino: a broken import or an unusable runtime is a failure here, never a skip.
import openvino as ov  # noqa: E402
import pytest
from edgecnn.runtimes import Classifier, get_runtime_class, load_runtime

from edgecnn.checkpoint import load_checkpoint
from edgecnn.errors import InvalidInputError, InvalidModelError, RuntimeUnavailableError
from edgecnn.verify import TOLERANCES, compare, make_inputs, reference_logits


def test_openvino_is_usable_here():
    ok, why = get_runtime_class("openvino").available()
    assert ok, why


def _caps() -> list[str]:
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


@pytest.fixture(scope="module")
def ref(trained):
    ckpt = load_checkpoint(trained.pt)
    batches = make_inputs(ckpt.mean, ckpt.std, n_random=8, n_data=48).batches
    x = np.concatenate(list(batches.values()))
    return x, np.concatenate(list(reference_logits(ckpt, batches).values()))


def test_fp32_is_pinned_and_matches_pytorch_tightly(trained, ref):
    x, logits = ref
    with load_runtime("openvino", trained.onnx_dynamic, precision="fp32") as rt:
        assert rt.actual_precision == "fp32"
        assert rt.device == "CPU"
        out = rt.run(x)
    res = compare(logits, out, TOLERANCES["fp32"])
    assert res.passed, res.reason
    assert res.max_abs < 1e-4


@pytest.mark.skipif("BF16" not in _caps(), reason="this CPU has no BF16 capability")
def test_bf16_runs_bf16_and_passes_its_own_tolerance(trained, ref):
    x, logits = ref
    with load_runtime("openvino", trained.onnx_dynamic, precision="bf16") as rt:
        assert rt.actual_precision == "bf16"
        out = rt.run(x)
    res = compare(logits, out, TOLERANCES["bf16"])
    assert res.passed, res.reason
    assert res.agreement >= 0.99
    # The difference from fp32 is real: bf16 ran, so pinning f32 for fp32 is what keeps fp32 tight.
    assert res.max_abs > 1e-4


@pytest.mark.skipif("FP16" in _caps(), reason="this CPU can run fp16")
def test_fp16_on_a_cpu_without_it_refuses_instead_of_running_bf16(trained):
    # Asking OpenVINO CPU for f16 here silently gives bf16; the runtime must refuse, not relabel.
    with pytest.raises(RuntimeUnavailableError, match="fp16"):
        load_runtime("openvino", trained.onnx, precision="fp16")


def test_a_device_that_is_not_there_raises_and_never_falls_back(trained):
    missing = next(d for d in ("GPU", "NPU") if d not in ov.Core().available_devices)
    with pytest.raises(RuntimeUnavailableError, match=missing):
        load_runtime("openvino", trained.onnx, device=missing)


def test_options_are_checked(trained):
    with pytest.raises(InvalidInputError):
        load_runtime("openvino", trained.onnx, device="TPU")
    with pytest.raises(InvalidInputError):
        load_runtime("openvino", trained.onnx, hint="fastest")
    with pytest.raises(InvalidInputError):
        load_runtime("openvino", trained.onnx, colour="blue")
    with load_runtime("openvino", trained.onnx, hint="throughput", threads=1) as rt:
        assert rt.run(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 6)


def test_classifier_reads_metadata_through_openvino(trained, ref):
    x, _ = ref
    with Classifier(trained.onnx, runtime="openvino") as clf, Classifier(trained.onnx, runtime="ort-cpu") as base:
        assert clf.info == base.info
        assert clf.class_names == tuple(load_checkpoint(trained.pt).class_names)
        np.testing.assert_allclose(clf.run(x[:4]), base.run(x[:4]), rtol=1e-3, atol=1e-4)


def test_ir_xml_bin_keeps_metadata_and_results(trained, tmp_path, ref):
    x, _ = ref
    core = ov.Core()
    ov.save_model(core.read_model(str(trained.onnx_dynamic)), str(tmp_path / "model.xml"), compress_to_fp16=False)
    with load_runtime("openvino", tmp_path / "model.xml") as ir, load_runtime("openvino", trained.onnx_dynamic) as onnx:
        assert ir.metadata() == onnx.metadata()
        assert "class_names" in ir.metadata()
        np.testing.assert_array_equal(ir.run(x), onnx.run(x))


def test_eight_threads_give_the_serial_results(trained, run_threads):
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((5, 3, 64, 64)).astype(np.float32) for _ in range(8)]
    with load_runtime("openvino", trained.onnx_dynamic) as rt:
        serial = [rt.run(x) for x in inputs]
        got: list = [None] * 8

        def work(i: int) -> None:
            for _ in range(5):
                got[i] = rt.run(inputs[i])

        errors = run_threads(8, work)
    assert not errors
    for a, b in zip(serial, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unreadable_or_foreign_models_are_invalid(tmp_path, trained):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    with pytest.raises(InvalidModelError):
        load_runtime("openvino", bad)
    with pytest.raises(InvalidModelError):
        load_runtime("openvino", trained.pt)  # a checkpoint is not an OpenVINO model
    xml = tmp_path / "lonely.xml"
    xml.write_text("<net name='x'></net>")
    with pytest.raises(InvalidModelError):
        load_runtime("openvino", xml)


def test_cli_verify_and_predict_on_openvino(trained, run_cli, tmp_path):
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "openvino")
    assert r.exit_code == 0, r.output
    assert "openvino" in r.stdout and "pass" in r.stdout
    from PIL import Image

    from edgecnn.data import synthetic_dataset

    Image.fromarray(synthetic_dataset(1, seed=5).images[0]).save(tmp_path / "a.png")
    r = run_cli("predict", trained.onnx, tmp_path / "a.png", "--runtime", "openvino")
    assert r.exit_code == 0, r.output
