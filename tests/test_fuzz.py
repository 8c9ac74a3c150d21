"""Seeded fuzz over the CLI: mutated ONNX files through predict and verify, mutated checkpoints through export.

For every case: exit code in {0, 1, 2, 3} (never 70, the internal-error code), no traceback, a non-zero
exit ends stderr with one `edgecnn: error:` line, and an exit 0 from predict prints only finite
probabilities. The cases run in one child process (a native crash fails the test, naming the case,
instead of killing pytest); the child's real stderr must hold no ONNX Runtime log line.
"""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from PIL import Image

from edgecnn.data import synthetic_dataset

SEED = 20261129

WORKER = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
os.environ.pop("EDGECNN_DEBUG", None)
from click.testing import CliRunner
from edgecnn.cli import cli
cases = json.load(open(sys.argv[1]))
runner = CliRunner()
for i, args in enumerate(cases):
    print(json.dumps({"i": i, "start": True}), flush=True)
    r = runner.invoke(cli, args, catch_exceptions=True)
    tb = r.exception is not None and not isinstance(r.exception, SystemExit)
    print(json.dumps({"i": i, "code": r.exit_code, "out": r.stdout[-2000:], "err": r.stderr[-2000:],
                      "exception": repr(r.exception) if tb else ""}), flush=True)
"""


def _set_meta(m, key, value):
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
            return
    m.metadata_props.add(key=key, value=value)


def onnx_cases(src, folder, rng) -> list:
    """(name, bytes) of mutated copies of an honest export."""
    data = src.read_bytes()
    out = []
    for i in range(80):  # random byte flips anywhere
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 17))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        out.append((f"flip{i}", bytes(b)))
    meta_at = data.find(b"class_names")
    for i in range(30):  # byte flips in the metadata area (UTF-8 breaks, lengths)
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            b[min(len(b) - 1, meta_at + int(rng.integers(-8, 200)))] = int(rng.integers(0, 256))
        out.append((f"metaflip{i}", bytes(b)))
    for i in range(20):
        out.append((f"trunc{i}", data[: int(rng.integers(0, len(data)))]))
    base = onnx.load(str(src))

    def variant(name, fn):
        m = onnx.ModelProto()
        m.CopyFrom(base)
        fn(m)
        out.append((name, m.SerializeToString()))

    def dims(values):
        def fn(m):
            d = m.graph.input[0].type.tensor_type.shape.dim
            for k, v in enumerate(values):
                d[k].dim_value = v
        return fn

    variant("in_c1", dims([1, 1, 64, 64]))
    variant("in_c4", dims([1, 4, 64, 64]))
    variant("in_huge", dims([1, 3, 2**62, 64]))
    variant("in_b0", dims([0, 3, 64, 64]))
    for key, values in {"mean": ["5", "null", "[0, 0]", '["a", "b", "c"]', "[1e309, 1, 1]", "{}", "nope"],
                        "std": ["[0, 1, 1]", "[-1, 1, 1]", '"x"', "[inf]"],
                        "class_names": ["5", "[]", '["a"]', "[1, 2, 3, 4, 5, 6]", "null"],
                        "input_layout": ["NHWC-uint8", "??"], "embedded_softmax": ["1"]}.items():
        for j, v in enumerate(values):
            variant(f"meta_{key}{j}", lambda m, key=key, v=v: _set_meta(m, key, v))
    floats = [t.name for t in base.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    for i in range(24):  # NaN / +-Inf weights
        def poison(m, i=i):
            t = next(x for x in m.graph.initializer if x.name == floats[i % len(floats)])
            w = numpy_helper.to_array(t).copy()
            w.flat[int(rng.integers(0, w.size))] = [np.nan, np.inf, -np.inf][i % 3]
            t.CopyFrom(numpy_helper.from_array(w, t.name))
        variant(f"nonfinite{i}", poison)

    def gemm_bias_empty(m):
        g = next(n for n in m.graph.node if n.op_type == "Gemm")
        t = next(x for x in m.graph.initializer if x.name == g.input[2])
        t.CopyFrom(numpy_helper.from_array(np.zeros((0,), np.float32), t.name))

    def conv_group(value):
        def fn(m):
            c = next(n for n in m.graph.node if n.op_type == "Conv")
            c.attribute.append(helper.make_attribute("group", value))
        return fn

    variant("gemm_bias_empty", gemm_bias_empty)
    variant("conv_group0", conv_group(0))
    variant("conv_group2", conv_group(2))
    variant("no_nodes", lambda m: m.graph.ClearField("node"))
    variant("drop_last_node", lambda m: m.graph.node.pop())
    variant("two_outputs", lambda m: m.graph.output.append(m.graph.output[0]))
    for i in range(12):  # initializer shapes that do not match their data
        def bad_dims(m, i=i):
            t = m.graph.initializer[i % len(m.graph.initializer)]
            t.dims[0] = [0, 1, 7, 2**40][i % 4]
        variant(f"dims{i}", bad_dims)
    return out


def checkpoint_cases(src, folder, rng) -> list:
    """Paths of mutated copies of an honest checkpoint."""
    obj = torch.load(src, weights_only=True)
    out = []

    def save(name, o):
        p = folder / f"{name}.pt"
        torch.save(o, p)
        out.append(p)

    def with_(name, **kv):
        o = dict(obj)
        o.update(kv)
        save(name, o)

    def sd_with(name, key, value):
        sd = dict(obj["state_dict"])
        if value is None:
            sd.pop(key)
        else:
            sd[key] = value
        with_(name, state_dict=sd)

    for j, v in enumerate(["0.5", ["a", "b", "c"], [0.5, 0.5], [float("nan")] * 3, None, 5, torch.ones(3)]):
        with_(f"mean{j}", mean=v)
    for j, v in enumerate([[0, 1, 1], [float("inf")] * 3, "x", [-1.0, 1.0, 1.0]]):
        with_(f"std{j}", std=v)
    for j, v in enumerate(["big", 2**40, 0, 32, -64, 64.0, True]):
        with_(f"size{j}", input_size=v)
    for j, v in enumerate([[1, 2], "text", 5]):
        with_(f"summary{j}", summary=v)
    for j, v in enumerate([5, ["a"] * 3, ["x\ny"] * 6, None, [1, 2, 3, 4, 5, 6]]):
        with_(f"names{j}", class_names=v)
    bias = obj["state_dict"]["classifier.bias"]
    sd_with("sparse_bias", "classifier.bias", bias.to_sparse())
    sd_with("nan_bias", "classifier.bias", bias * float("nan"))
    sd_with("int_bias", "classifier.bias", bias.to(torch.int64))
    sd_with("short_bias", "classifier.bias", bias[:3])
    sd_with("no_bias", "classifier.bias", None)
    sd_with("extra", "extra.weight", torch.zeros(2))
    with_("sd_list", state_dict=[1, 2, 3])
    save("a_list", [1, 2, 3])
    save("a_tensor", torch.zeros(3))
    raw = src.read_bytes()
    for i in range(16):
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        p = folder / f"flip{i}.pt"
        p.write_bytes(bytes(b))
        out.append(p)
    (folder / "png.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    out.append(folder / "png.pt")
    return out


def test_fuzz_cli(trained, tmp_path):
    rng = np.random.default_rng(SEED)
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_dataset(1, seed=4).images[0]).save(img)
    models = tmp_path / "onnx"
    models.mkdir()
    cases: list[list[str]] = []
    for k, (name, blob) in enumerate(onnx_cases(trained.onnx, models, rng)):
        p = models / f"{name}.onnx"
        p.write_bytes(blob)
        cases.append(["predict", str(p), str(img)] + (["--top-k", "3"] if k % 2 else []))
        if k % 16 == 0:
            cases.append(["verify", str(p), "--against", str(trained.pt)])
    ckpts = tmp_path / "ckpt"
    ckpts.mkdir()
    for p in checkpoint_cases(trained.pt, ckpts, rng):
        cases.append(["export", str(p), "-o", str(p.with_suffix(".onnx")), "--no-check"])
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "cases.json")], capture_output=True,
                          text=True, timeout=900)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    done = [x for x in lines if "code" in x]
    started = [x["i"] for x in lines if x.get("start")]
    assert proc.returncode == 0 and len(done) == len(cases), (
        f"the fuzz worker died (exit {proc.returncode}) in case {cases[started[-1]] if started else '?'}: "
        f"{proc.stderr[-1500:]}")
    assert "onnxruntime" not in proc.stderr and "[E:" not in proc.stderr, proc.stderr[-1500:]
    problems = []
    for x in done:
        args, code, err = cases[x["i"]], x["code"], x["err"]
        last = (err.strip().splitlines() or [""])[-1]
        if code not in (0, 1, 2, 3):
            problems.append(f"exit {code} {x['exception']}: {args} :: {last}")
        elif "Traceback" in err or x["exception"]:
            problems.append(f"traceback: {args} :: {x['exception']}")
        elif code != 0 and not last.startswith("edgecnn: error:"):
            problems.append(f"stderr does not end in one error line: {args} :: {err[-300:]}")
        elif code == 0 and args[0] == "predict":
            probs = [float(tok.rstrip(",")) for ln in x["out"].splitlines() for tok in ln.split(": ", 1)[-1].split()[1::2]]
            if not probs or not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
                problems.append(f"exit 0 with non-finite or no probabilities: {args} :: {x['out'][-200:]}")
    tally = collections.Counter((cases[x["i"]][0], x["code"]) for x in done)
    print(f"\nfuzz: {len(cases)} cases, exit codes by command: {dict(sorted(tally.items()))}")
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:25])


@pytest.mark.parametrize("name", ["-dash.png"])
def test_double_dash_ends_options(trained, tmp_path, name, monkeypatch):
    """An image named like an option is taken as an image after `--`."""
    from click.testing import CliRunner

    from edgecnn.cli import cli

    monkeypatch.chdir(tmp_path)
    Image.fromarray(synthetic_dataset(1, seed=4).images[0]).save(tmp_path / name)
    r = CliRunner().invoke(cli, ["predict", str(trained.onnx), "--", name])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(name)
