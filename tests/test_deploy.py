"""One deployable: a model file, a deploy.json and a bundle folder resolve to what runs, everywhere alike."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgecnn.runtimes import Classifier
from edgecnn.runtimes.deploy import DeployableError, TamperedBundleError, resolve, serving_name
from PIL import Image

from edgecnn.data import synthetic_dataset
from edgecnn.package import build_bundle


@pytest.fixture(scope="module")
def tuned(trained, tmp_path_factory) -> Path:
    """A deploy.json as `edgecnn tune` writes it, in model.tuned/, with a thread count and a backend option."""
    folder = tmp_path_factory.mktemp("t") / "model.tuned"
    folder.mkdir()
    shutil.copyfile(trained.onnx, folder / "model.fp32.onnx")
    cfg = {"format": "edgecnn-deploy/1", "runtime": "ort-cpu", "precision": "fp32", "label_precision": "fp32",
           "model": "model.fp32.onnx", "threads": 1, "options": {"spinning": False}}
    (folder / "deploy.json").write_text(json.dumps(cfg))
    return folder / "deploy.json"


@pytest.fixture(scope="module")
def tuned_bundle(tuned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    build_bundle([tuned], out)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(synthetic_dataset(1, seed=5).images[0]).save(p)
    return p


def test_serving_names():
    assert serving_name("model.int8.ov.xml") == "model"
    assert serving_name("model.onnx") == "model"
    assert serving_name("my.net.fp16.onnx") == "my.net"


def test_each_kind_resolves_to_what_it_says(trained, tuned, tuned_bundle):
    plain = resolve(trained.onnx)
    assert (plain.kind, plain.runtime, plain.threads, plain.options, plain.hashes_checked) == (
        "model", "ort-cpu", None, {}, False)
    d = resolve(tuned)
    assert (d.kind, d.runtime, d.threads, d.options, d.name) == ("deploy.json", "ort-cpu", 1, {"spinning": False},
                                                                  "model")
    assert d.model == (tuned.parent / "model.fp32.onnx").resolve()
    b = resolve(tuned_bundle)
    assert (b.kind, b.runtime, b.threads, b.options, b.hashes_checked, b.name) == (
        "bundle", "ort-cpu", 1, {"spinning": False}, True, "model")


def test_classifier_runs_the_tuned_configuration_and_says_what_overrides_it(tuned, tuned_bundle):
    for source in (tuned, tuned_bundle):
        with Classifier(source) as clf:
            assert clf.runtime.threads_used == 1 and clf.runtime.spinning_used is False
            assert clf.override_notes == []
        with Classifier(source, threads=2, spinning=True) as clf:
            assert clf.runtime.threads_used == min(2, clf.runtime.threads_used) and clf.runtime.spinning_used
            notes = " ".join(clf.override_notes)
            assert "threads=2 overrides" in notes or clf.runtime.threads_used == 1  # capped on a 1-CPU box
            assert "spinning=True overrides" in notes


def test_bench_of_a_deploy_config_times_its_options_and_threads(tuned, run_cli, tmp_path):
    r = run_cli("bench", tuned, "--batch", "1", "--min-time", "0.05", "--no-roofline", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows and all(x["options"] == {"spinning": False} and x["threads_used"] == 1 for x in rows)
    r = run_cli("bench", tuned, "--batch", "1", "--min-time", "0.05", "--no-roofline", "-O", "spinning=on")
    assert r.exit_code == 0 and "spinning=True overrides the deploy.json's spinning=False" in r.output


def _tampered(bundle: Path, tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(bundle, b)
    data = bytearray((b / "model.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (b / "model.fp32.onnx").write_bytes(bytes(data))
    return b


def test_a_bundle_altered_after_packaging_is_refused_everywhere(tuned_bundle, image, run_cli, tmp_path):
    b = _tampered(tuned_bundle, tmp_path)
    with pytest.raises(TamperedBundleError, match="model.fp32.onnx was altered"):
        resolve(b)
    with pytest.raises(TamperedBundleError):
        Classifier(b)
    for args in (("predict", b, image), ("bench", b, "--batch", "1")):
        r = run_cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "altered after packaging" in r.output and "Traceback" not in r.output
    # serve in a child process, bounded: a server that did start would otherwise run until killed
    r = subprocess.run([sys.executable, "-m", "edgecnn.cli", "serve", str(b), "--port", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "altered after packaging" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(b / "predict.py"), str(image)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "altered after packaging" in r.stderr and len(r.stderr.splitlines()) == 1


def test_bundle_predict_py_runs_the_tuned_threads_and_reads_a_broken_manifest_in_one_line(tuned_bundle, image,
                                                                                           tmp_path):
    sys.path.insert(0, str(tuned_bundle))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bundle_predict_under_test", tuned_bundle / "predict.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        m = mod.BundleModel(tuned_bundle)
        assert m.threads == 1 and m.deployable.options == {"spinning": False}
        with Classifier(tuned_bundle) as clf:
            np.testing.assert_allclose(m.probabilities([image]), clf.probabilities([image]), rtol=1e-5, atol=1e-6)
    finally:
        sys.path.remove(str(tuned_bundle))
    b = tmp_path / "nokey"
    shutil.copytree(tuned_bundle, b)
    manifest = json.loads((b / "manifest.json").read_text())
    del manifest["default_model"]
    (b / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run([sys.executable, str(b / "predict.py"), str(image)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "default_model" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(DeployableError, match="default_model"):
        resolve(b)


def test_a_tuned_openvino_bundle_is_served_with_its_runtime_and_threads(trained, tmp_path):
    """The real server process: the bundle's tuned runtime (OpenVINO), threads and hint, shown in the metadata."""
    import openvino  # noqa: F401 - the openvino extra is installed by CI: a broken install fails here
    from test_serve import Server

    folder = tmp_path / "model.tuned"
    folder.mkdir()
    shutil.copyfile(trained.onnx, folder / "model.fp32.onnx")
    (folder / "deploy.json").write_text(json.dumps(
        {"format": "edgecnn-deploy/1", "runtime": "openvino", "precision": "fp32", "model": "model.fp32.onnx",
         "threads": 1, "options": {"hint": "latency"}}))
    bundle = tmp_path / "bundle"
    build_bundle([folder / "deploy.json"], bundle)
    srv = Server(bundle, tmp_path / "serve.log")
    try:
        status, body, _ = srv.get("/v2/models/model")
        assert status == 200, body
        meta = json.loads(body)
        params = meta["parameters"]
        assert "openvino" in str(params.get("runtime")) and params.get("threads") == 1, params
        assert params.get("instances") == 1 and params.get("lone_threads") == 1, params  # never split a tuned count
        x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
        req = {"inputs": [{"name": meta["inputs"][0]["name"], "datatype": "FP32", "shape": [2, 3, 64, 64],
                           "data": x.ravel().tolist()}], "outputs": [{"name": "logits"}]}
        status, body, _ = srv.request("POST", "/v2/models/model/infer", json.dumps(req).encode(),
                                      {"Content-Type": "application/json"})
        assert status == 200, body
        got = np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
        with Classifier(trained.onnx, runtime="openvino", threads=1) as ref:
            np.testing.assert_allclose(got, ref.run(x), rtol=1e-3, atol=1e-5)
    finally:
        assert srv.stop() == 0


def test_serve_splits_the_cpus_only_where_measured_and_never_a_tuned_thread_count(trained, tuned, tmp_path):
    """The real server: a plain model gets this CPU kind's serve default (instances, rows a call, the lone
    request's threads); a deploy.json that pins its threads is served on one instance with exactly those."""
    from edgecnn.runtimes.cpu import current_defaults, usable_cpus
    from test_serve import Server

    kind = current_defaults()
    x = np.random.default_rng(4).standard_normal((3, 3, 64, 64)).astype(np.float32)
    for source, want in ((trained.onnx, {"instances": kind.serve_instances,
                                          "threads": max(1, usable_cpus() // kind.serve_instances),
                                          "lone_threads": usable_cpus() if kind.serve_instances > 1 else None,
                                          "call_rows": kind.serve_call_rows or 64}),
                         (tuned, {"instances": 1, "threads": 1, "lone_threads": 1, "call_rows": 64})):
        srv = Server(source, tmp_path / f"{source.stem}.log")
        try:
            status, body, _ = srv.get("/v2/models/model")
            assert status == 200, body
            params = json.loads(body)["parameters"]
            want["lone_threads"] = want["lone_threads"] or params["threads"]
            assert {k: params.get(k) for k in want} == want, params
            req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 3, 64, 64],
                               "data": x.ravel().tolist()}], "outputs": [{"name": "logits"}]}
            status, body, _ = srv.request("POST", "/v2/models/model/infer", json.dumps(req).encode(),
                                          {"Content-Type": "application/json"})
            assert status == 200, body
            got = np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
            with Classifier(trained.onnx) as ref:
                np.testing.assert_allclose(got, ref.run(x), rtol=1e-3, atol=1e-5)
        finally:
            assert srv.stop() == 0
