"""benchmarks/gpu_check.py --require, compare_peers' naive ORT baseline, and the torch-free NVIDIA extra."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from edgecnn.verify import VerifyRow

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def gpu_check(trained, monkeypatch):
    gc = _script("gpu_check")
    monkeypatch.setattr(gc, "_model", lambda args, work: (trained.pt, trained.onnx, trained.onnx_dynamic))
    return gc


def test_require_fails_when_no_gpu_row_ran(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "_gpu_visible", lambda: None)
    assert gpu_check.main(["--require", "cuda", "--results", str(tmp_path)]) == 3
    assert "no GPU visible here, so ort-cuda did not run" in capsys.readouterr().out
    assert gpu_check.main(["--results", str(tmp_path)]) == 0  # without --require a CPU run is fine
    with pytest.raises(SystemExit):
        gpu_check.main(["--require", "tpu"])


def test_require_fails_when_a_visible_gpu_did_not_run_the_runtime(gpu_check, tmp_path, capsys, monkeypatch):
    # CUDA faked as visible; this machine's onnxruntime has no CUDA provider, so ort-cuda is skipped.
    monkeypatch.setattr(gpu_check, "_gpu_visible", lambda: "Fake H200")
    monkeypatch.setattr(gpu_check, "_torch_cuda_row", lambda *a: VerifyRow("torch-cuda", "fp32", "cuda:0", "pass"))
    bench = [["torch eager fp32 (on device)", 1, "0.100", "0.200", "10,000", 50, ""],
             ["ort-cuda fp32 (host in/out)", 1, "-", "-", "-", 0, "skipped: no CUDA provider"]]
    monkeypatch.setattr(gpu_check, "_bench", lambda *a: bench)
    rc = gpu_check.main(["--require", "cuda,trt", "--results", str(tmp_path), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 3
    assert "a GPU is visible (Fake H200) but ort-cuda did not run" in out
    assert "a GPU is visible (Fake H200) but ort-trt did not run" in out
    assert (tmp_path / "gpu_fake_h200.md").is_file()


def test_require_is_met_only_by_a_parity_row_and_a_timed_row():
    ran = [VerifyRow("ort-cuda", "fp32", "CUDA:0", "pass")]
    timed = [["ort-cuda fp32 (host in/out)", 1, "0.300", "0.400", "3,000", 40, "CUDA:0"]]
    gc = _script("gpu_check")
    assert gc.require_failures(["cuda"], "H200", ran, timed) == []
    assert gc.require_failures(["cuda"], "H200", ran, [timed[0][:2] + ["-", "-", "-", 0, "error: x"]])
    assert gc.require_failures(["cuda"], "H200", [VerifyRow("ort-cuda", "fp32", "", "skipped", note="n")], timed)


def test_naive_ort_baseline_names_its_provider(trained, monkeypatch):
    import onnxruntime as ort

    real = ort.InferenceSession

    def gpu_build_session(path, sess_options=None, providers=None, **kw):  # GPU builds refuse a missing providers=
        if providers is None:
            raise ValueError("This ORT build has ['CUDAExecutionProvider', 'CPUExecutionProvider'] enabled; "
                             "set the providers parameter")
        return real(path, sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", gpu_build_session)
    peers = _script("compare_peers")
    fn, _ = peers.build({"kind": "naive_ort", "model": str(trained.onnx)})
    from edgecnn.bench import make_inputs

    assert fn(make_inputs(1)[0]).shape == (1, 6)


def test_device_gpu_extra_is_torch_free_and_documented():
    text = (ROOT / "pyproject.toml").read_text()

    def entry(key: str) -> list[str]:  # a one-line TOML list (Python 3.10 has no tomllib)
        return json.loads(re.search(rf"^{re.escape(key)} = (\[.*\])$", text, re.M).group(1))

    extra = entry("device-gpu")
    assert [d.split(">")[0] for d in extra] == ["onnxruntime-gpu"]
    assert not any("torch" in d or "edgecnn[" in d for d in extra)
    assert {d.split(">")[0] for d in entry("dependencies")} == {"numpy", "pillow", "click"}
    readme = (ROOT / "README.md").read_text()
    assert "`device-gpu`" in readme and "edgecnn[device-gpu]" in readme
