"""ort-cuda / ort-trt code paths with CUDA faked: a stand-in onnxruntime module whose sessions claim the GPU
providers and compute on ONNX Runtime's CPU provider, whose OrtValues are numpy arrays "on the device"
and whose CUDA-graph replays accept only the captured buffers (as ORT's do). Nothing here needs a GPU."""

from __future__ import annotations

import os
import types

import numpy as np
import onnx
import onnxruntime as real_ort
import pytest
from edgecnn.runtimes import gpu_libs, load_runtime, ort, ort_gpu

from edgecnn.errors import InvalidInputError, RuntimeUnavailableError

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


class FakeOrtValue:
    def __init__(self, arr: np.ndarray):
        self.arr = np.array(arr, copy=True)

    @staticmethod
    def ortvalue_from_numpy(x, device="cpu", device_id=0):
        assert device == "cuda"
        return FakeOrtValue(x)

    @staticmethod
    def ortvalue_from_shape_and_type(shape, dtype, device="cpu", device_id=0):
        return FakeOrtValue(np.zeros(shape, dtype))

    def update_inplace(self, x):
        np.copyto(self.arr, x)

    def numpy(self):
        return self.arr.copy()

    def shape(self):
        return list(self.arr.shape)


class FakeBinding:
    def __init__(self):
        self.inp = self.out = None
        self.outputs = []

    def bind_ortvalue_input(self, name, v):
        self.inp = v

    def bind_ortvalue_output(self, name, v):
        self.out = v

    def bind_output(self, name, device, device_id):
        assert device == "cuda"

    def copy_outputs_to_cpu(self):
        return [o.numpy() for o in self.outputs]

    def get_outputs(self):
        return self.outputs


class FakeSession:
    def __init__(self, fake, source, sess_options=None, providers=None):
        fake.created.append(self)
        self.fake, self.providers = fake, providers
        self.env_tf32 = os.environ.get("NVIDIA_TF32_OVERRIDE")
        opts = dict(providers[0][1])
        if fake.reject_option and fake.reject_option in opts:
            raise RuntimeError(f"[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unknown provider option: "
                               f"{fake.reject_option}")
        first = providers[0][0]
        if first == TRT and fake.trt_fails:
            os.write(2, b"2026-11-29 12:00:00.0 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1029 "
                        b"CreateExecutionProviderInstance] Failed to create TensorrtExecutionProvider: "
                        b"libnvinfer.so.10: cannot open shared object file: No such file or directory\n")
            first = CUDA
        self._providers = [first, CPU]
        self.graph = opts.get("enable_cuda_graph") == "1" or opts.get("trt_cuda_graph_enable") == "True"
        self.captured = None  # (input, output) buffers of the first replay, in graph mode
        self.real = real_ort.InferenceSession(source, providers=[CPU])

    def get_providers(self):
        return list(self._providers)

    def get_inputs(self):
        return self.real.get_inputs()

    def get_outputs(self):
        return self.real.get_outputs()

    def get_modelmeta(self):
        return self.real.get_modelmeta()

    def run(self, names, feeds):
        return self.real.run(names, feeds)

    def io_binding(self):
        return FakeBinding()

    def run_with_iobinding(self, b):
        if self.graph:  # a replay must use the addresses captured by the first run
            if self.captured is None:
                self.captured = (b.inp, b.out)
            assert (b.inp, b.out) == self.captured, "CUDA graph replayed with other buffers"
        out = self.real.run(None, {self.real.get_inputs()[0].name: b.inp.arr})[0]
        if b.out is not None:
            np.copyto(b.out.arr, out)
            b.outputs = [b.out]
        else:
            b.outputs = [FakeOrtValue(out)]


def _fake_module(tmp_path):
    fake = types.SimpleNamespace(created=[], preloaded=0, trt_fails=False, reject_option=None,
                                 severities=[])
    fake.__file__ = str(tmp_path / "onnxruntime" / "__init__.py")
    fake.__version__ = "1.22.0"
    fake.cuda_version = "12.8"
    fake.InferenceSession = lambda source, sess_options=None, providers=None: FakeSession(
        fake, source, sess_options, providers)
    fake.SessionOptions = real_ort.SessionOptions
    fake.GraphOptimizationLevel = real_ort.GraphOptimizationLevel
    fake.OrtValue = FakeOrtValue
    fake.get_available_providers = lambda: [TRT, CUDA, CPU]

    def preload_dlls():
        fake.preloaded += 1

    fake.preload_dlls = preload_dlls
    fake.set_default_logger_severity = fake.severities.append
    fake.copy_tensors = lambda src, dst, stream=None: [np.copyto(d.arr, s.arr) for s, d in zip(src, dst, strict=True)]
    return fake


@pytest.fixture()
def fake_gpu(monkeypatch, tmp_path):
    """onnxruntime-gpu 1.22 with CUDA 12, cuDNN 9 and TensorRT 10 libraries 'installed' (empty files)."""
    fake = _fake_module(tmp_path)
    libs = tmp_path / "libs"
    libs.mkdir()
    for name in ("libcuda.so.1", "libcudart.so.12", "libcudnn.so.9", "libnvinfer.so.10"):
        (libs / name).write_bytes(b"")
    monkeypatch.setattr(gpu_libs, "_search_dirs", lambda: [libs])  # not this machine's own folders
    monkeypatch.setattr(gpu_libs, "_ldconfig_names", lambda: frozenset())
    monkeypatch.setattr(gpu_libs, "dist_version", lambda n: "1.22.0" if n == "onnxruntime-gpu" else None)
    monkeypatch.setattr(ort._OrtRuntime, "_probe", staticmethod(lambda msg: (fake, fake.get_available_providers(), "")))
    monkeypatch.setattr(ort, "_import_ort", lambda: fake)
    monkeypatch.setattr(ort_gpu, "_import_ort", lambda: fake)
    monkeypatch.setattr(ort_gpu._deps, "nvidia_gpu_visible", lambda: (True, "faked"))  # a GPU is 'there'
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    for k in ("ORT_TENSORRT_FP16_ENABLE", "ORT_TENSORRT_INT8_ENABLE", "ORT_TENSORRT_BF16_ENABLE"):
        monkeypatch.delenv(k, raising=False)
    fake.libs = libs
    return fake


def _x(n=3):
    return np.random.default_rng(0).standard_normal((n, 3, 64, 64)).astype(np.float32)


# ---------------------------------------------------------------------------------------- fp32 is fp32
@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt"])
def test_fp32_runs_with_tf32_disabled_before_the_session(fake_gpu, trained, name):
    with load_runtime(name, trained.onnx) as rt:
        assert rt.actual_precision == "fp32" and rt.tf32 is False
    sess = fake_gpu.created[-1]
    assert sess.env_tf32 == "0"  # set before the provider initializes (TensorRT reads it once per process)
    assert dict(sess.providers[-1][1])["use_tf32"] == "0"  # and CUDA's own switch for what CUDA runs


def test_fp32_refuses_an_environment_that_allows_tf32(fake_gpu, trained, monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    with pytest.raises(RuntimeUnavailableError, match="NVIDIA_TF32_OVERRIDE=1"):
        load_runtime("ort-trt", trained.onnx)
    assert fake_gpu.created == []
    with load_runtime("ort-trt", trained.onnx, precision="fp16") as rt:  # fp16 is what the label says
        assert rt.actual_precision == "fp16"
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    monkeypatch.setenv("ORT_TENSORRT_FP16_ENABLE", "1")
    with pytest.raises(RuntimeUnavailableError, match="ORT_TENSORRT_FP16_ENABLE"):
        load_runtime("ort-trt", trained.onnx)


# ---------------------------------------------------------------------------------------- trt_options
def test_trt_options_from_the_command_line_are_parsed_and_cannot_change_precision(fake_gpu, trained, run_cli):
    from edgecnn.runtimes.options import parse_cli, route_registered

    names = ["ort-cpu", "ort-trt"]
    for text in ("trt_max_workspace_size=1000;trt_builder_optimization_level=3",
                 '{"trt_max_workspace_size": 1000, "trt_builder_optimization_level": 3}'):
        opts = route_registered(parse_cli([f"ort-trt.trt_options={text}"], names), names)
        assert opts == {"ort-cpu": {}, "ort-trt": {"trt_options": {"trt_max_workspace_size": "1000",
                                                                   "trt_builder_optimization_level": "3"}}}
    with load_runtime("ort-trt", trained.onnx, **opts["ort-trt"]) as rt:
        assert rt.options["trt_options"]["trt_max_workspace_size"] == "1000"
    trt = dict(fake_gpu.created[-1].providers[0][1])
    assert trt["trt_max_workspace_size"] == "1000" and trt["trt_fp16_enable"] == "False"
    for bad in ("trt_fp16_enable=True", "trt_int8_enable=1", "trt_dla_enable=1", "device_id=1",
                "trt_cuda_graph_enable=1", "cuda_device=1"):
        fake_gpu.created.clear()
        with pytest.raises(InvalidInputError, match="ort-trt: option trt_options"):
            load_runtime("ort-trt", trained.onnx, trt_options=bad)
        assert fake_gpu.created == []  # refused before any session
        r = run_cli("predict", trained.onnx, trained.pt, "--runtime", "ort-trt", "-O", f"trt_options={bad}")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "trt_options" in r.stderr


def test_option_errors_from_onnx_runtime_are_option_errors(fake_gpu, trained, tmp_path):
    fake_gpu.reject_option = "trt_made_up"
    with pytest.raises(InvalidInputError, match="rejected a provider option.*trt_made_up"):
        load_runtime("ort-trt", trained.onnx, trt_options={"trt_made_up": "1"})
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError, match="cache must be a folder"):
        load_runtime("ort-trt", trained.onnx, cache_dir=str(tmp_path / "file"))


def test_cpu_fallback_is_in_the_device_label(fake_gpu, trained):
    with load_runtime("ort-cuda", trained.onnx) as strict, load_runtime("ort-cuda", trained.onnx,
                                                                         cpu_fallback=True) as loose:
        assert strict.device == "CUDA:0" and loose.device == "CUDA:0+CPU"


def test_tensorrt_load_failure_says_why(fake_gpu, trained):
    fake_gpu.trt_fails = True
    with pytest.raises(RuntimeUnavailableError, match="libnvinfer.so.10: cannot open shared object file"):
        load_runtime("ort-trt", trained.onnx)
    assert fake_gpu.severities[-2:] == [0, 4]  # verbose while the session was created, silenced after


# ---------------------------------------------------------------------------------------- CUDA graphs
def test_run_device_replays_on_the_captured_buffers(fake_gpu, trained, run_threads):
    with load_runtime("ort-cuda", trained.onnx) as plain, load_runtime("ort-cuda", trained.onnx, cuda_graph=True) as g:
        xs = [_x(1) + i for i in range(4)]
        want = [plain.run(x) for x in xs]
        outs = [g.run_device(FakeOrtValue(x)).numpy() for x in xs]  # fresh device inputs: copied in
        for o, w in zip(outs, want, strict=True):
            np.testing.assert_allclose(o, w, rtol=1e-6)
        buf = g.graph_input()
        buf.update_inplace(xs[2])
        assert g.run_device(buf) is g.run_device(buf)  # the captured output buffer, every time
        np.testing.assert_allclose(g.run_device(buf).numpy(), want[2], rtol=1e-6)
        with pytest.raises(InvalidInputError, match="shape"):
            g.run_device(FakeOrtValue(_x(2)))
        errors = run_threads(8, lambda i: np.testing.assert_allclose(g.run(xs[i % 4]), want[i % 4], rtol=1e-6))
        assert errors == []


def test_cuda_graph_on_a_symbolic_batch_is_an_option_error(fake_gpu, trained):
    with pytest.raises(InvalidInputError, match="cuda_graph needs a fixed-shape model"):
        load_runtime("ort-cuda", trained.onnx_dynamic, cuda_graph=True)


def test_bench_cuda_graph_pins_each_batch_and_never_aborts(fake_gpu, trained, monkeypatch):
    from edgecnn.bench import bench

    for model in (trained.onnx, trained.onnx_dynamic):
        failed: list = []
        rows = bench(model, ["ort-cuda"], [1, 4], min_time=0.01, warmup=1, failed=failed,
                     options={"ort-cuda": {"cuda_graph": True}})
        assert [r.batch for r in rows] == [1, 4] and failed == []
        assert all("pinned to" in r.note and r.device == "CUDA:0" for r in rows)
    real = load_runtime

    def flaky(name, path, **kw):  # the batch-4 copy cannot be loaded: that batch fails, batch 1 is measured
        if "b4_" in str(path):
            raise InvalidInputError("cannot capture")
        return real(name, path, **kw)

    monkeypatch.setattr("edgecnn.runtimes.load_runtime", flaky)
    failed = []
    rows = bench(trained.onnx, ["ort-cuda"], [1, 4], min_time=0.01, warmup=1, failed=failed,
                 options={"ort-cuda": {"cuda_graph": True}})
    assert [r.batch for r in rows] == [1] and [(f.batch, f.error) for f in failed] == [(4, "cannot capture")]


# ---------------------------------------------------------------------------------------- close
def test_close_releases_device_buffers_and_run_after_close_raises(fake_gpu, trained):
    rt = load_runtime("ort-cuda", trained.onnx, cuda_graph=True)
    rt.run(_x(1))
    rt.close()
    assert not any(hasattr(rt, a) for a in ("session", "_in_val", "_out_val")) and rt._graph_binding is None
    with pytest.raises(InvalidInputError, match="closed"):
        rt.run(_x(1))
    with pytest.raises(InvalidInputError, match="closed"):
        rt.run_device(FakeOrtValue(_x(1)))
    rt.close()  # twice is harmless
    assert rt.device == "CUDA:0"


# ---------------------------------------------------------------------------------------- libraries
def test_available_loads_no_library_and_preloads_only_for_a_session(fake_gpu, trained, monkeypatch):
    import ctypes

    def no_load(*a, **k):
        raise AssertionError("available() loaded a library")

    monkeypatch.setattr(ctypes, "CDLL", no_load)
    assert ort_gpu.OrtCuda.available() == (True, "")
    assert ort_gpu.OrtTensorRT.available() == (True, "")
    assert fake_gpu.preloaded == 0
    with load_runtime("ort-cuda", trained.onnx):
        assert fake_gpu.preloaded == 1


def test_required_library_majors_come_from_the_installed_build(fake_gpu, monkeypatch):
    # the provider libraries' DT_NEEDED entries decide; here a CUDA 13 build needing cuDNN 10 (say)
    monkeypatch.setattr(gpu_libs, "needed_sonames", lambda p: {
        "libonnxruntime_providers_cuda.so": ["libcudart.so.13", "libcudnn.so.10", "libc.so.6"],
        "libonnxruntime_providers_tensorrt.so": ["libnvinfer.so.11"]}.get(os.path.basename(p), []))
    assert gpu_libs.required_majors(fake_gpu) == {"cuda": "13", "cudnn": "10", "tensorrt": "11"}
    ok, why = ort_gpu.OrtCuda.available()
    assert not ok and "libcudart.so.13" in why
    (fake_gpu.libs / "libcudart.so.13").write_bytes(b"")
    assert "libcudnn.so.10" in ort_gpu.OrtCuda.available()[1]
    (fake_gpu.libs / "libcudnn.so.10").write_bytes(b"")
    assert ort_gpu.OrtCuda.available() == (True, "")
    assert "libnvinfer.so.11" in ort_gpu.OrtTensorRT.available()[1]


def test_older_onnxruntime_gpu_is_named_unsupported(fake_gpu, monkeypatch):
    monkeypatch.setattr(gpu_libs, "dist_version", lambda n: "1.18.1" if n == "onnxruntime-gpu" else None)
    ok, why = ort_gpu.OrtCuda.available()
    assert not ok and "onnxruntime-gpu 1.18.1 is not supported" in why and ">= 1.19" in why


def test_needed_sonames_reads_a_real_shared_library():
    import glob

    lib = glob.glob(os.path.join(os.path.dirname(real_ort.__file__), "capi", "onnxruntime_pybind11_state*.so"))[0]
    needed = gpu_libs.needed_sonames(lib)
    assert "libc.so.6" in needed and "libstdc++.so.6" in needed
    assert gpu_libs.needed_sonames(__file__) == []  # not an ELF file


# ---------------------------------------------------------------------------------------- int8 files
def _qdq_copy(src, dst):
    m = onnx.load(str(src))
    inp = m.graph.input[0].name
    m.graph.initializer.extend([onnx.helper.make_tensor("q_scale", onnx.TensorProto.FLOAT, [], [0.05]),
                                onnx.helper.make_tensor("q_zero", onnx.TensorProto.INT8, [], [0])])
    for node in m.graph.node:
        node.input[:] = ["x_dq" if i == inp else i for i in node.input]
    m.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["x_q", "q_scale", "q_zero"], ["x_dq"]))
    m.graph.node.insert(0, onnx.helper.make_node("QuantizeLinear", [inp, "q_scale", "q_zero"], ["x_q"]))
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt"])
def test_fp16_refuses_an_int8_qdq_file(fake_gpu, trained, tmp_path, name):
    qdq = _qdq_copy(trained.onnx, tmp_path / "model.int8.onnx")
    with pytest.raises(InvalidInputError, match="refuses an int8 model.*QuantizeLinear"):
        load_runtime(name, qdq, precision="fp16")
    assert fake_gpu.created == []
    with load_runtime(name, qdq) as rt:  # fp32 runs it as it is
        assert rt.run(_x(1)).shape == (1, 6)
