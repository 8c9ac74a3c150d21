"""ort-cuda / ort-trt: precise reasons and exit code 3 without a GPU, the build-conflict message, GPU parity."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from edgecnn.runtimes import _deps, get_runtime_class, load_runtime

from edgecnn.checkpoint import load_checkpoint
from edgecnn.errors import RuntimeUnavailableError
from edgecnn.verify import TOLERANCES, compare, make_inputs, reference_logits

GPU_RUNTIMES = ("ort-cuda", "ort-trt")


def _usable(name: str) -> bool:
    return get_runtime_class(name).available()[0]


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name", GPU_RUNTIMES)
def test_without_a_gpu_they_say_what_is_missing_and_refuse(name, trained):
    if _usable(name):
        pytest.skip(f"{name} is usable here")
    ok, why = get_runtime_class(name).available()
    assert not ok and why and "\n" not in why
    assert any(k in why for k in ("onnxruntime-gpu", "both installed", "driver", "CUDA", "cuDNN", "TensorRT"))
    with pytest.raises(RuntimeUnavailableError, match=name):
        load_runtime(name, trained.onnx)


@pytest.mark.parametrize("name", GPU_RUNTIMES)
def test_cli_exit_code_3_with_one_line(name, trained, run_cli):
    if _usable(name):
        pytest.skip(f"{name} is usable here")
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", name)
    assert r.exit_code == 3, r.output
    assert "skipped" in r.stdout and "pass" not in r.stdout.split("\n", 2)[-1]
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("edgecnn: error:")
    r = run_cli("predict", trained.onnx, trained.pt, "--runtime", name)  # the image is never read
    assert r.exit_code == 3
    assert r.stderr.strip().count("\n") == 0 and name in r.stderr


def test_cpu_onnxruntime_is_named_as_the_missing_gpu_build(monkeypatch):
    if "onnxruntime-gpu" in _deps.ort_distributions() or _deps.dist_version("onnxruntime") is None:
        pytest.skip("needs the CPU onnxruntime alone")
    why = get_runtime_class("ort-cuda").available()[1]
    assert "onnxruntime-gpu is not installed" in why and "pip uninstall -y onnxruntime" in why


def test_both_builds_installed_is_a_conflict(monkeypatch, trained, run_cli):
    real = _deps.dist_version
    fake = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}
    monkeypatch.setattr(_deps, "dist_version", lambda n: fake[n] if n in fake else real(n))
    assert _deps.ort_distributions()[:2] == ["onnxruntime", "onnxruntime-gpu"]
    for name in ("ort-cpu", *GPU_RUNTIMES):
        ok, why = get_runtime_class(name).available()
        assert not ok
        assert "onnxruntime and onnxruntime-gpu are both installed" in why
        assert "pip uninstall -y onnxruntime onnxruntime-gpu" in why
    r = run_cli("verify", trained.onnx, "--against", trained.pt, "--runtime", "ort-cuda")
    assert r.exit_code == 3 and "both installed" in r.stdout


def test_a_build_shadowing_another_on_the_path_is_not_a_conflict(monkeypatch):
    # pip --target + PYTHONPATH (the device recipe) leaves the site-packages build in place but unused:
    # only distributions owning the imported onnxruntime package count.
    real = _deps.dist_version
    monkeypatch.setattr(_deps, "dist_version", lambda n: "1.32.0" if n == "onnxruntime-gpu" else real(n))
    monkeypatch.setattr(_deps, "_provides_imported_ort", lambda n: n == "onnxruntime")
    assert _deps.ort_distributions() == ["onnxruntime"]
    assert _deps.ort_conflict() is None


@pytest.mark.skipif(_has_driver(), reason="an NVIDIA driver is present")
def test_library_probe_names_the_missing_driver():
    import onnxruntime as ort
    from edgecnn.runtimes import gpu_libs

    assert "libcuda.so.1" in gpu_libs.missing(ort)


# ------------------------------------------------------------------------------------ on a GPU only
def _ref(trained):
    ckpt = load_checkpoint(trained.pt)
    batches = make_inputs(ckpt.mean, ckpt.std, n_random=8, n_data=48).batches
    return np.concatenate(list(batches.values())), np.concatenate(list(reference_logits(ckpt, batches).values()))


def _require(name: str) -> None:
    """A test selected with -m gpu fails, never skips, when its GPU runtime is missing: a run asked to check
    the GPU paths must not come back green without having run them."""
    if not _usable(name):
        pytest.fail(f"-m gpu: {name} is not usable here: {get_runtime_class(name).available()[1]}")


@pytest.mark.gpu
@pytest.mark.parametrize("name,precision", [("ort-cuda", "fp32"), ("ort-cuda", "fp16"),
                                            ("ort-trt", "fp32"), ("ort-trt", "fp16")])
def test_gpu_parity(name, precision, trained, tmp_path):
    _require(name)
    x, logits = _ref(trained)
    opts = {"cache_dir": str(tmp_path / "trt")} if name == "ort-trt" else {}
    with load_runtime(name, trained.onnx_dynamic, precision=precision, **opts) as rt:
        assert rt.device.startswith("CUDA" if name == "ort-cuda" else "TensorRT")
        res = compare(logits, rt.run(x), TOLERANCES[precision])
    assert res.passed, res.reason


@pytest.mark.gpu
def test_gpu_io_binding_and_cuda_graphs_match_the_plain_session(trained):
    _require("ort-cuda")
    x, _ = _ref(trained)
    with load_runtime("ort-cuda", trained.onnx) as plain, \
            load_runtime("ort-cuda", trained.onnx, io_binding=True) as bound, \
            load_runtime("ort-cuda", trained.onnx, cuda_graph=True) as graph:
        want = plain.run(x)
        np.testing.assert_allclose(bound.run(x), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(graph.run(x), want, rtol=1e-5, atol=1e-6)


def test_cuda_fp16_conversion_keeps_io_and_metadata(trained):
    # ort-cuda fp16 converts the fp32 file on load; the conversion itself runs anywhere (CPU EP here).
    import onnx
    import onnxruntime as ort
    from edgecnn.runtimes.ort_gpu import OrtCuda

    rt = OrtCuda.__new__(OrtCuda)  # no GPU needed to build the converted model
    rt.precision, rt.model_path = "fp16", trained.onnx_dynamic
    data = rt._model_source()
    model = onnx.load_from_string(data)
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)"
    assert "class_names" in sess.get_modelmeta().custom_metadata_map
    x, logits = _ref(trained)
    res = compare(logits, sess.run(None, {sess.get_inputs()[0].name: x})[0], TOLERANCES["fp16"])
    assert res.passed, res.reason
