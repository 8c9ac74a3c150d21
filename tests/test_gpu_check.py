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


def _cpu_backed_cuda(broken_fp16: bool = False):
    """ort-cuda with the CPU provider standing in for the card: the same class, the same fp16 conversion on
    load (real fp16 compute, ONNX Runtime's CPU kernels), only the provider swapped. ``broken_fp16``: its fp16
    logits come back distorted (scaled and shifted), as a bad conversion would give them."""
    import numpy as np
    from edgecnn.runtimes.ort_gpu import OrtCuda

    class CpuCuda(OrtCuda):
        providers = ("CPUExecutionProvider",)
        memory_device = "cpu"  # IO binding and the CUDA-graph buffers bind host memory

        @classmethod
        def available(cls):
            return True, ""

        def provider_list(self):
            return ["CPUExecutionProvider"]

        def session_options(self, ort):  # the CPU provider is the only one: no "no CPU fallback" entry
            self.cpu_fallback = True
            return super().session_options(ort)

        def run(self, x):
            out = super().run(x)
            if broken_fp16 and self.precision == "fp16":
                return (np.asarray(out) * 1.3 + 0.5).astype(np.float32)
            return out

    CpuCuda.name = "ort-cuda"
    return CpuCuda


def _fake_card(gpu_check, monkeypatch, cuda_cls):
    from edgecnn.runtimes import base

    monkeypatch.setitem(base._REGISTRY, "ort-cuda", cuda_cls)
    monkeypatch.setattr(gpu_check, "_gpu_visible", lambda: "Fake H200")
    monkeypatch.setattr(gpu_check, "TORCH_DEVICE", "cpu")  # PyTorch's own fp16 kernels, on the CPU
    timed = [[label, 1, "0.100", "0.200", "10,000", 50, "CPU"] for _, _, _, label in gpu_check.ORT_CELLS
             if label.startswith("ort-cuda")]
    timed += [[label, 1, "0.100", "0.200", "10,000", 50, "cuda:0"] for label in gpu_check.TORCH_CELLS]
    monkeypatch.setattr(gpu_check, "_bench", lambda *a: timed)


def _bench_rows(out: str) -> dict[str, str]:
    """label -> parity verdict, read from the printed timing table."""
    part = out.split("latency and throughput")[1]
    rows = {}
    for line in part.splitlines():
        cells = [c.strip() for c in re.split(r"\s{2,}", line.strip())]
        if cells and (cells[0].startswith("ort-") or cells[0].startswith("torch eager")):
            rows[cells[0]] = cells[6]
    return rows


def test_fp16_cells_are_judged_and_a_good_fp16_passes(gpu_check, tmp_path, capsys, monkeypatch):
    _fake_card(gpu_check, monkeypatch, _cpu_backed_cuda())
    rc = gpu_check.main(["--results", str(tmp_path), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    raw = json.loads((tmp_path / "gpu_fake_h200.json").read_text())
    judged = {(r["runtime"], r["precision"], r["options"]): r for r in raw["parity"]}
    # every timed ort-cuda configuration and both torch precisions have a computed row of their own
    for name, prec, opts, _ in gpu_check.ORT_CELLS:
        if name == "ort-cuda":
            row = judged[(name, prec, gpu_check._opts_text(opts))]
            assert row["status"] == "pass" and row["max_abs"] > 0  # fp16/fp32 CPU vs torch: never bit-equal
    fp16 = judged[("ort-cuda", "fp16", "io-binding")]
    fp32 = judged[("ort-cuda", "fp32", "io-binding")]
    assert fp16["max_abs"] > 10 * fp32["max_abs"]  # it really computed in half precision
    assert judged[("torch-cuda", "fp16", "default options")]["status"] == "pass"
    verdicts = _bench_rows(out)
    assert verdicts["ort-cuda fp16 io-binding (on device)"] == "pass"
    assert verdicts["torch eager fp16 (on device)"] == "pass"
    assert set(verdicts.values()) == {"pass"}


def test_a_bad_fp16_cell_fails_the_check(gpu_check, tmp_path, capsys, monkeypatch):
    _fake_card(gpu_check, monkeypatch, _cpu_backed_cuda(broken_fp16=True))
    rc = gpu_check.main(["--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1, out
    verdicts = _bench_rows(out)
    assert verdicts["ort-cuda fp16 io-binding (on device)"] == "FAIL"
    assert verdicts["ort-cuda fp32 (host in/out)"] == "pass"
    md = (tmp_path / "gpu_fake_h200.md").read_text()
    assert re.search(r"ort-cuda\s+fp16 .*FAIL", md)


def test_a_timed_cell_without_a_parity_row_is_not_judged_and_fails(gpu_check):
    ran = [VerifyRow("ort-cuda", "fp32", "CUDA:0", "pass")]
    bench = [["ort-cuda fp32 (host in/out)", 1, "0.3", "0.4", "3,000", 40, "CUDA:0"],
             ["ort-cuda fp16 io-binding (on device)", 1, "0.2", "0.3", "5,000", 40, "CUDA:0"],
             ["ort-trt fp16 io-binding (on device)", 1, "-", "-", "-", 0, "skipped: no TensorRT"]]
    rows, unjudged = gpu_check.judged_bench(bench, ran)
    assert [r[6] for r in rows] == ["pass", "not judged", "not judged"]
    assert unjudged == ["ort-cuda fp16 io-binding (on device)"]  # a skipped cell has no numbers to judge
