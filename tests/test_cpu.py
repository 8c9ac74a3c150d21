"""Thread counts and per-CPU-kind defaults (runtimes/cpu.py): chosen from what the machine reports, the
affinity mask and the cgroup quota, never more; overridable. Quotas and CPU kinds are faked; the
affinity mask is really restricted, in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from edgecnn.runtimes.cpu import (
    CpuDescription,
    cgroup_quota,
    defaults_for,
    describe_cpu,
    parse_cpuinfo,
    threads_from,
)

from edgecnn.tune import candidates

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
siblings\t: 2
cpu cores\t: 1
flags\t\t: fpu sse avx avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
"""
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
siblings\t: 2
cpu cores\t: 2
flags\t\t: fpu sse avx avx2 fma sha_ni vaes
"""
AMD_AVX512 = AMD_AVX2.replace("vaes", "vaes avx512f avx512_vnni avx512_bf16")


def test_cpu_kind_and_features_come_from_cpuinfo():
    intel, amd, zen4 = (parse_cpuinfo(t) for t in (INTEL_AMX, AMD_AVX2, AMD_AVX512))
    assert intel["vendor"] == "GenuineIntel" and intel["threads_per_core"] == 2
    assert {"amx_int8", "amx_bf16", "avx512_bf16"} <= intel["flags"] and "fpu" not in intel["flags"]
    kinds = [CpuDescription(vendor=i["vendor"], model=i["model"], flags=i["flags"]).kind for i in (intel, amd, zen4)]
    assert kinds == ["intel-xeon-amx", "amd-epyc-avx2", "amd-epyc-avx512-bf16"]
    assert CpuDescription(machine="aarch64").kind == "aarch64"


@pytest.mark.parametrize("allowed,quota,want", [(2, None, 2), (2, 1.5, 2), (2, 0.5, 1), (4, 2.0, 2), (1, 3.0, 1),
                                                (8, 0.01, 1)])
def test_threads_are_the_mask_and_the_quota_never_more(allowed, quota, want):
    assert threads_from(allowed, quota) == want


def _tree(root, files: dict) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_cgroup_quota_v2_v1_hybrid_and_ancestors(tmp_path):
    v2 = tmp_path / "v2"
    _tree(v2, {"cpu.max": "max 100000\n", "kubepods/cpu.max": "150000 100000\n", "kubepods/pod/cpu.max": "max 100000\n"})
    assert cgroup_quota(v2, "0::/kubepods/pod\n") == 1.5  # an ancestor's limit binds
    assert cgroup_quota(v2, "0::/\n") is None  # "max": no limit
    v1 = tmp_path / "v1"
    _tree(v1, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
               "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(v1, "4:cpu,cpuacct:/docker/abc\n") == 0.5
    assert cgroup_quota(v1, "4:cpu,cpuacct:/\n") is None  # -1: no limit
    hybrid = tmp_path / "hybrid"
    _tree(hybrid, {"unified/cpu.max": "300000 100000\n", "cpu/cpu.cfs_quota_us": "-1\n"})
    assert cgroup_quota(hybrid, "1:cpu:/\n0::/\n") == 3.0
    bad = tmp_path / "bad"
    _tree(bad, {"cpu.max": "garbage\n"})
    assert cgroup_quota(bad, "0::/\n") is None
    assert cgroup_quota(tmp_path / "missing", "0::/\n") is None


def test_per_kind_defaults_are_decided_from_the_description():
    amx = CpuDescription("GenuineIntel", "Xeon", frozenset({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}),
                         logical=2, threads_per_core=2, allowed=2)
    avx2 = CpuDescription("AuthenticAMD", "AMD EPYC", frozenset({"avx2"}), logical=2, allowed=2)
    throttled = CpuDescription("AuthenticAMD", "AMD EPYC", frozenset({"avx2"}), logical=64, allowed=64, quota=2.0)
    a, b, c = defaults_for(amx), defaults_for(avx2), defaults_for(throttled)
    # SMT: one thread per logical CPU, not ORT's one per physical core
    assert (a.threads, a.spinning, a.bf16_candidates, a.int8_bf16_candidates) == (2, True, True, True)
    assert a.openvino_hyper_threading and not b.openvino_hyper_threading
    assert (b.threads, b.spinning, b.bf16_candidates) == (2, True, False)
    assert (c.threads, c.spinning) == (2, False)  # a 64-CPU host with a 2-CPU quota: 2 threads, no spinning
    for d in (a, b, c):
        assert d.openvino_hint == "latency" and set(d.why) >= {"threads", "spinning", "openvino_hint", "batch_sessions"}
    assert defaults_for(describe_cpu()).kind == describe_cpu().kind
    # serve: two single-thread instances, 2 rows a call, only on the kind and size where that was measured
    avx512 = CpuDescription("AuthenticAMD", "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}), logical=2,
                            allowed=2)
    big = CpuDescription("AuthenticAMD", "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}), logical=8,
                         allowed=8)
    capped = CpuDescription("AuthenticAMD", "AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}), logical=4,
                            allowed=4, quota=2.0)
    assert (defaults_for(avx512).serve_instances, defaults_for(avx512).serve_call_rows) == (2, 2)
    for d in (a, b, c, defaults_for(big), defaults_for(capped)):
        assert (d.serve_instances, d.serve_call_rows) == (1, None) and "serve_instances" in d.why


def test_tune_candidates_follow_the_cpu_kind(tmp_path):
    amx = defaults_for(CpuDescription("GenuineIntel", "Xeon", frozenset({"amx_tile", "amx_int8", "amx_bf16"}), allowed=2))
    avx2 = defaults_for(CpuDescription("AuthenticAMD", "EPYC", frozenset({"avx2"}), allowed=2))
    int8 = {"ort-cpu": tmp_path / "q.onnx", "openvino": tmp_path / "q.xml"}
    on_amx = {c.label() for c in candidates(tmp_path / "m.onnx", int8, [2], cpu_defaults=amx)}
    on_avx2 = {c.label() for c in candidates(tmp_path / "m.onnx", int8, [2], cpu_defaults=avx2)}
    assert "openvino bf16 threads=2 hint=latency" in on_amx
    assert "openvino int8 (bf16 float ops) threads=2 hint=latency" in on_amx
    assert "openvino int8 threads=2 hint=latency" in on_amx and "ort-cpu int8 threads=2" in on_amx
    assert not any("bf16" in label for label in on_avx2) and "openvino int8 threads=2 hint=latency" in on_avx2


CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from edgecnn.runtimes import load_runtime
    from edgecnn.runtimes.cpu import current_defaults, thread_cpus
    from edgecnn.runtimes.pipeline import default_workers
    opts = json.loads(sys.argv[1])
    res = {"defaults": current_defaults().as_dict(), "workers": default_workers()}
    rt = load_runtime("ort-cpu", opts.pop("model"), **opts.pop("ort", {}))
    rt.run(np.zeros((8, 3, 64, 64), np.float32))
    res["ort"] = {"threads": rt.threads_used, "spinning": rt.spinning_used, "options": rt.options,
                  "intra_op_num_threads": rt.session.get_session_options().intra_op_num_threads}
    res["thread_cpus"] = thread_cpus()
    ov = load_runtime("openvino", rt.model_path, **opts.pop("ov", {}))
    ov.run(np.zeros((2, 3, 64, 64), np.float32))
    res["ov"] = {"threads": ov.threads_used, "hint": ov.options["hint"],
                 "INFERENCE_NUM_THREADS": int(ov.compiled.get_property("INFERENCE_NUM_THREADS")),
                 "ENABLE_HYPER_THREADING": ov.compile_config.get("ENABLE_HYPER_THREADING")}
    res["thread_cpus_after_ov"] = thread_cpus()
    print(json.dumps(res))
""")


def _child(opts: dict, env: dict, cpus: set[int] | None = None) -> dict:
    """CHILD in a fresh process; ``cpus``: its affinity mask from the start, as `taskset -c` sets it."""
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(opts)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env}, preexec_fn=pre)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_cgroup_quota_sets_every_thread_count_and_options_override_it(trained, tmp_path):
    """A fake 1-CPU cgroup v2 quota on an Intel AMX description: one ORT thread, no spinning, one OpenVINO
    thread, one decode worker; explicit options win."""
    root = tmp_path / "cgroup"
    _tree(root, {"cpu.max": "100000 100000\n"})
    (tmp_path / "cpuinfo").write_text(INTEL_AMX)
    env = {"EDGECNN_CGROUP_ROOT": str(root), "EDGECNN_CPUINFO": str(tmp_path / "cpuinfo")}
    got = _child({"model": str(trained.onnx)}, env)
    assert got["defaults"]["kind"] == "intel-xeon-amx" and got["defaults"]["bf16_candidates"] is True
    assert got["defaults"]["threads"] == 1 and got["workers"] == 1
    if (os.cpu_count() or 1) > 1:  # the quota binds only where the mask has more than one CPU
        assert got["defaults"]["spinning"] is False and got["ort"]["spinning"] is False
    assert got["ort"]["threads"] == got["ort"]["intra_op_num_threads"] == 1
    assert got["ov"] == {"threads": 1, "hint": "latency", "INFERENCE_NUM_THREADS": 1,
                         "ENABLE_HYPER_THREADING": True}  # the faked Intel has 2 threads per core
    over = _child({"model": str(trained.onnx), "ort": {"threads": 2, "spinning": True},
                   "ov": {"threads": 2, "hint": "throughput", "hyper_threading": False}}, env)
    assert over["ort"]["threads"] == over["ort"]["intra_op_num_threads"] == 2
    assert over["ort"]["spinning"] is True and over["ort"]["options"] == {"spinning": True}
    assert over["ov"] == {"threads": 2, "hint": "throughput", "INFERENCE_NUM_THREADS": 2, "ENABLE_HYPER_THREADING": False}


def test_a_tuned_thread_count_is_capped_by_the_cpus_here(tmp_path):
    """deploy.json from a bigger machine: its threads are capped by this process's usable CPUs."""
    from edgecnn.runtimes.cpu import usable_cpus
    from edgecnn.runtimes.deploy import resolve

    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "deploy.json").write_text(json.dumps({"format": "edgecnn-deploy/1", "model": "m.onnx",
                                                      "runtime": "ort-cpu", "threads": 64}))
    assert resolve(tmp_path / "deploy.json").threads == min(64, usable_cpus())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="restricting the mask needs two CPUs")
def test_an_affinity_mask_is_respected_and_never_escaped(trained):
    """Under a one-CPU mask (taskset -c 0): one thread each, and no thread of the process, ORT's or
    OpenVINO's, is allowed on any other CPU (ORT's own default pins a worker outside the mask)."""
    first = min(os.sched_getaffinity(0))
    got = _child({"model": str(trained.onnx)}, {"EDGECNN_CGROUP_ROOT": "/nonexistent"}, {first})
    assert got["defaults"]["threads"] == got["workers"] == got["ort"]["threads"] == 1
    assert got["ov"]["threads"] == got["ov"]["INFERENCE_NUM_THREADS"] == 1
    assert got["thread_cpus"] == [str(first)] and got["thread_cpus_after_ov"] == [str(first)]
