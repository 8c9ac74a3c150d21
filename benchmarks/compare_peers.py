"""edgecnn against what a user would otherwise do, in one run on one machine.

    python benchmarks/compare_peers.py [--checkpoint model.pt] [--min-time 2] [--out benchmarks/results]

Baselines: PyTorch eager (inference_mode), torch.compile, a plain torch.onnx.export + default
InferenceSession ("naive ORT"), OpenVINO with default settings. edgecnn rows: its default
(Classifier / bench with no options), the fastest configuration with exact fp32 parity, and the
fastest configuration that passes the accuracy gate (from `edgecnn tune`). Reports batch-1 latency
and batch-64 throughput as ratios to naive ORT and to PyTorch eager, the roofline floor, and ORT's
per-node profile of the fp32 default (and of the gated winner when it runs on ORT).

Restricted rows show what the operator's CPU limits do to naive ORT and to edgecnn's default: under
`taskset -c 0` (a one-CPU affinity mask: which CPUs the process's threads may run on afterwards) and,
where this process may create a cgroup, under a 1-CPU cgroup quota (what `docker run --cpus=1` sets).

Writes peers-<cpu kind>.md/.json (runtimes/cpu.py names the kind; hand-written analysis for a kind is
kept in peers-<kind>.notes.md and appended) and regenerates the peers.md index over every kind measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")


def time_fn(fn, inputs: list, min_time: float, warmup: int = 5) -> dict:
    """edgecnn's timing helper (the one bench uses): warm-up, >= 10 calls and >= min_time, no call cap."""
    from edgecnn.runtimes.timing import measure

    t = measure(fn, inputs, warmup=warmup, min_time=min_time, min_iters=10, max_iters=None)
    return {"p50_ms": t.p50_ms, "p99_ms": t.p99_ms, "throughput": t.throughput(len(inputs[0])),
            "iterations": t.iterations}


def build(spec: dict):
    """The callable one configuration runs, built inside the child process that times it."""
    kind = spec["kind"]
    if kind in ("eager", "compile"):
        import torch

        from edgecnn.checkpoint import load_checkpoint

        net = load_checkpoint(spec["checkpoint"]).build_model()
        if kind == "compile":
            net = torch.compile(net, dynamic=False)  # static shapes: its best kernels for each batch size

        def f(x):
            with torch.inference_mode():
                return net(torch.from_numpy(x)).numpy()
        return f, None
    if kind == "naive_ort":
        import onnxruntime as ort

        # Defaults, as a user would write them, with the provider named: GPU builds of ONNX Runtime refuse
        # a session without providers=, and this is the CPU baseline.
        s = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return (lambda x: s.run(None, {name: x})[0]), None
    if kind == "ov_default":
        import openvino as ov

        c = ov.Core().compile_model(spec["model"], "CPU")  # no config at all
        r = c.create_infer_request()
        return (lambda x: r.infer({0: x})[0]), str(c.get_property("INFERENCE_PRECISION_HINT"))
    from edgecnn.runtimes import load_runtime

    rt = load_runtime(spec["runtime"], spec["model"], **spec.get("options", {}))
    return rt.run, getattr(rt, "actual_precision", rt.precision)


def child(spec: dict, min_time: float) -> dict:
    """Load one configuration (its load time includes torch.compile's compilation), time it, report."""
    from edgecnn.runtimes.cpu import thread_cpus

    from edgecnn.bench import make_inputs

    x1, x64 = make_inputs(1, spec["mean"], spec["std"]), make_inputs(64, spec["mean"], spec["std"])
    t0 = time.perf_counter()
    fn, precision = build(spec)
    if spec["kind"] == "compile":
        fn(x1[0])
        fn(x64[0])
    load = time.perf_counter() - t0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = {"load_s": load, "b1": time_fn(fn, x1, min_time), "b64": time_fn(fn, x64, min_time),
           "precision": precision, "thread_cpus": thread_cpus(), "threads": len(list(Path("/proc/self/task").iterdir()))}
    out["cpu_s"], out["wall_s"] = time.process_time() - cpu0, time.perf_counter() - wall0
    return out


def quota_cgroup(cpus: float) -> Path | None:
    """A cgroup with a CPU quota of ``cpus`` (v1 cpu controller or v2 cpu.max), or None where this process
    may not make one. The caller removes it."""
    name = f"edgecnn-peers-{os.getpid()}"
    for base, files in ((Path("/sys/fs/cgroup/cpu"), {"cpu.cfs_period_us": "100000",
                                                      "cpu.cfs_quota_us": str(int(cpus * 100000))}),
                        (Path("/sys/fs/cgroup"), {"cpu.max": f"{int(cpus * 100000)} 100000"})):
        if not (base / "cgroup.procs").exists():
            continue
        try:
            d = base / name
            d.mkdir(exist_ok=True)
            for f, v in files.items():
                (d / f).write_text(v)
            return d
        except OSError:
            continue
    return None


def _pre_exec(spec: dict):
    """What runs in the child before Python starts: the affinity mask (taskset) and/or the cgroup."""
    cpus, cg = spec.get("cpus"), spec.get("cgroup")
    if not cpus and not cg:
        return None

    def pre():
        if cpus:
            os.sched_setaffinity(0, set(cpus))
        if cg:
            Path(cg, "cgroup.procs").write_text(str(os.getpid()))
    return pre


class Suite:
    """Each configuration runs alone in a fresh process (no other runtime's threads on the cores), in
    interleaved rounds; the median round is reported."""

    def __init__(self, mean, std, min_time):
        self.mean, self.std, self.min_time = list(mean), list(std), min_time
        self.entries: list[dict] = []

    def add(self, name: str, spec: dict, note: str = "") -> None:
        self.entries.append({"name": name, "spec": {**spec, "mean": self.mean, "std": self.std}, "note": note,
                             "runs": []})

    def run(self, rounds: int) -> list[dict]:
        for k in range(rounds):
            for e in self.entries:
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(e["spec"]),
                                       "--min-time", str(self.min_time)], capture_output=True, text=True,
                                      timeout=900, preexec_fn=_pre_exec(e["spec"]))
                if proc.returncode != 0:
                    raise SystemExit(f"{e['name']} failed: {proc.stderr.strip().splitlines()[-1:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                e["runs"].append(r)
                print(f"  round {k + 1}/{rounds} {e['name']}: b1 p50 {r['b1']['p50_ms']:.3f} ms, "
                      f"b64 {r['b64']['throughput']:,.0f} img/s", file=sys.stderr, flush=True)
        out = []
        for e in self.entries:
            runs = e["runs"]
            b1 = sorted((r["b1"] for r in runs), key=lambda r: r["p50_ms"])[len(runs) // 2]
            b64 = sorted((r["b64"] for r in runs), key=lambda r: r["throughput"])[len(runs) // 2]
            note = e["note"]
            if e["spec"]["kind"] == "ov_default":
                note = f"runs {runs[0]['precision']} (OpenVINO's default on this CPU), not fp32"
            out.append({"name": e["name"], "load_s": float(np.median([r["load_s"] for r in runs])),
                        "b1_p50_ms": b1["p50_ms"], "b1_p99_ms": b1["p99_ms"], "b64_throughput": b64["throughput"],
                        "note": note, "spec": {k: v for k, v in e["spec"].items() if k not in ("mean", "std")},
                        "thread_cpus": runs[-1]["thread_cpus"], "os_threads": runs[-1]["threads"],
                        "cpu_per_wall": float(np.median([r["cpu_s"] / r["wall_s"] for r in runs])),
                        "rounds_b1_p50_ms": [r["b1"]["p50_ms"] for r in runs],
                        "rounds_b64_throughput": [r["b64"]["throughput"] for r in runs]})
        return out


def naive_export(net, path: Path) -> None:
    import torch

    x = torch.zeros(1, 3, 64, 64)
    kw = dict(input_names=["input"], output_names=["logits"],
              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    try:
        torch.onnx.export(net, (x,), str(path), **kw)  # the user's plain call (the default exporter)
    except Exception:  # noqa: BLE001 - older default exporter paths
        torch.onnx.export(net, (x,), str(path), dynamo=False, **kw)


def ort_profile(model: Path, x: np.ndarray, runs: int = 20) -> list[tuple[str, float]]:
    """Share of time per node type for the edgecnn default ORT session (ORT's own profiler)."""
    import onnxruntime as ort
    from edgecnn.runtimes.ort import OrtCpu

    rt = OrtCpu(model)
    so = rt.session_options(ort)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as td:
        so.profile_file_prefix = str(Path(td) / "prof")
        s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        for _ in range(runs):
            s.run(None, {name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    per: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per[op] = per.get(op, 0.0) + e["dur"]
    total = sum(per.values()) or 1.0
    return sorted(((k, 100 * v / total) for k, v in per.items()), key=lambda kv: -kv[1])


def main() -> None:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per cell and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child), a.min_time)))
        return

    from edgecnn.exporters.onnx import export
    from edgecnn.runtimes.cpu import defaults_for, describe_cpu

    from edgecnn.bench import make_inputs
    from edgecnn.checkpoint import load_checkpoint
    from edgecnn.machine import describe, measure_peak, net_flops
    from edgecnn.tune import tune

    work = Path(tempfile.mkdtemp(prefix="edgecnn-peers-"))
    ckpt_path = a.checkpoint
    if ckpt_path is None:
        from edgecnn.data import synthetic_dataset
        from edgecnn.train import TrainConfig, train_to_file

        ckpt_path = work / "model.pt"
        print("training a model for the accuracy gate (600 images/class, 4 epochs)", file=sys.stderr)
        train_to_file(synthetic_dataset(600, 0), TrainConfig(epochs=4, progress=False), ckpt_path,
                      log=lambda s: print(s, file=sys.stderr))
    ck = load_checkpoint(ckpt_path)
    ours = export(ckpt_path, work / "model.onnx", dynamic_batch=True).path
    naive = work / "naive.onnx"
    naive_export(ck.build_model(), naive)
    inputs64 = make_inputs(64, ck.mean, ck.std)
    cpu = describe_cpu()
    threads = cpu.usable
    machine = describe()
    peak, peak_src = measure_peak(threads)
    flops = net_flops(ck.num_classes)
    floor = peak * 1e9 / flops
    print(f"{machine}\npeak {peak:.1f} GFLOP/s -> floor {floor:,.0f} img/s", file=sys.stderr)

    suite = Suite(ck.mean, ck.std, a.min_time)
    suite.add("PyTorch eager (inference_mode)", {"kind": "eager", "checkpoint": str(ckpt_path)})
    if not a.no_compile:
        suite.add("torch.compile (inductor)", {"kind": "compile", "checkpoint": str(ckpt_path)},
                  "compile time (both shapes) is the load time")
    naive_spec = {"kind": "naive_ort", "model": str(naive)}
    default_spec = {"kind": "runtime", "runtime": "ort-cpu", "model": str(ours)}
    suite.add(NAIVE, naive_spec)
    suite.add("OpenVINO default settings", {"kind": "ov_default", "model": str(naive)})
    suite.add(DEFAULT, default_spec, "fp32 parity (the judge's fp32 tolerance); exact graph passes")

    print("tuning (edgecnn tune)...", file=sys.stderr)
    cfg, cands = tune(ours, work / "tuned", min_time=a.min_time, log=lambda s: print(s, file=sys.stderr))
    fp32 = [c for c in cands if c.gate == "pass" and c.precision == "fp32"]
    best32 = max(fp32, key=lambda c: c.throughput)
    passing = [c for c in cands if c.gate == "pass"]
    best = max(passing, key=lambda c: c.throughput)
    for label, c in ((FASTEST32, best32), (FASTEST, best)):
        suite.add(f"{label}: {c.label()}",
                  {"kind": "runtime", "runtime": c.runtime, "model": str(c.model),
                   "options": {"precision": c.run_precision, "threads": c.threads, **c.options}},
                  f"accuracy {c.accuracy * 100:.2f}%, drop {c.drop_points:+.2f} pts, top-1 agreement {c.agreement * 100:.1f}%")
    # What the operator's limits do: a one-CPU affinity mask, and a 1-CPU cgroup quota where one can be made.
    restricted = []
    if len(os.sched_getaffinity(0)) > 1:
        first = min(os.sched_getaffinity(0))
        restricted.append((f"taskset -c {first}", {"cpus": [first]}))
    cg = quota_cgroup(1.0) if cpu.usable > 1 else None
    if cg is not None:
        restricted.append(("1-CPU cgroup quota", {"cgroup": str(cg)}))
    for what, extra in restricted:
        suite.add(f"{NAIVE_SHORT}, under {what}", {**naive_spec, **extra}, f"under {what}")
        suite.add(f"{DEFAULT_SHORT}, under {what}", {**default_spec, **extra}, f"under {what}")
    try:
        res = suite.run(a.rounds)
    finally:
        if cg is not None:
            try:
                cg.rmdir()
            except OSError:
                pass
    prof = {"edgecnn default (ort-cpu fp32)": ort_profile(ours, inputs64[0])}
    if best.runtime == "ort-cpu" and best.precision != "fp32":
        prof[f"fastest passing the gate ({best.label()})"] = ort_profile(best.model, inputs64[0])

    base_ort = next(r for r in res if r["name"] == NAIVE)
    base_eager = next(r for r in res if r["name"].startswith("PyTorch eager"))
    for r in res:
        r["b64_vs_naive_ort"] = r["b64_throughput"] / base_ort["b64_throughput"]
        r["b64_vs_eager"] = r["b64_throughput"] / base_eager["b64_throughput"]
        r["b1_latency_vs_naive_ort"] = r["b1_p50_ms"] / base_ort["b1_p50_ms"]
        r["b1_latency_vs_eager"] = r["b1_p50_ms"] / base_eager["b1_p50_ms"]
    default = next(r for r in res if r["name"] == DEFAULT)
    fastest = next(r for r in res if r["name"].startswith(FASTEST))
    targets = target_table(default, fastest)
    kind = cpu.kind
    command = f"python benchmarks/compare_peers.py --min-time {a.min_time:g} --rounds {a.rounds}"
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {"cpu_kind": kind, "machine": machine, "cpu": cpu.text(), "command": command,
           "date": time.strftime("%Y-%m-%d"), "peak_gflops": peak, "flops_per_image": flops, "floor_img_s": floor,
           "threads": threads, "defaults": defaults_for(cpu).as_dict(), "rows": res, "ort_profiles_b64": prof,
           "deploy": cfg, "targets": [{"target": t, "value": v, "goal": g, "met": _met(t, v, g)} for t, v, g in targets]}
    (a.out / f"peers-{kind}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = [f"# edgecnn vs the peers on {kind} (one run, one machine)", "",
          f"Machine: {machine}. Threads: {threads}. Command: `{command}` (median of {a.rounds} interleaved "
          f"rounds, each configuration in a fresh process). Date: {doc['date']}.", "",
          f"Defaults chosen on this CPU kind (runtimes/cpu.py): {_defaults_text(doc['defaults'])}.", "",
          f"Roofline: {flops / 1e6:.1f} MFLOP per image; measured fp32 peak {peak:.1f} GFLOP/s ({peak_src}) "
          f"-> fp32 compute floor {floor:,.0f} img/s.", "",
          "| configuration | b1 p50 ms | b1 p99 ms | b1 vs naive ORT | b1 vs eager | b64 img/s | b64 vs naive ORT "
          "| b64 vs eager | % of fp32 floor | CPUs busy | load s | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        md.append(f"| {r['name']} | {r['b1_p50_ms']:.3f} | {r['b1_p99_ms']:.3f} | {r['b1_latency_vs_naive_ort']:.2f}x | "
                  f"{r['b1_latency_vs_eager']:.2f}x | {r['b64_throughput']:,.0f} | {r['b64_vs_naive_ort']:.2f}x | "
                  f"{r['b64_vs_eager']:.2f}x | {100 * r['b64_throughput'] / floor:.0f}% | {r['cpu_per_wall']:.2f} | "
                  f"{r['load_s']:.2f} | {r['note']} |")
    if restricted:
        md += ["", "Restricted rows: which CPUs the process's threads were allowed on after timing (a thread "
               "outside the mask escaped it), and how many OS threads it had:", ""]
        md += [f"- {r['name']}: threads allowed on {', '.join(r['thread_cpus'])}; {r['os_threads']} OS threads; "
               f"{r['cpu_per_wall']:.2f} CPUs busy" for r in res if "under " in r["name"]]
    if cg is None and cpu.usable > 1:
        md += ["", "No cgroup-quota rows: this process may not create a cgroup here."]
    md += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t, v, g in targets:
        met = _met(t, v, g)
        md.append(f"| {t} | {v:.2f}x | {'yes' if met else f'no (short by {abs(v - g):.2f})'} |")
    for title, rows in prof.items():
        md += ["", f"## Where the time goes: {title}, batch 64 (ORT profiler)", "",
               "| node type | share of kernel time |", "|---|---|"]
        md += [f"| {op} | {pct:.1f}% |" for op, pct in rows]
    notes = Path(__file__).parent / "results" / f"peers-{kind}.notes.md"
    if notes.is_file():  # the written analysis (why a target is missed), kept beside the numbers
        md += ["", notes.read_text().strip()]
    (a.out / f"peers-{kind}.md").write_text("\n".join(md) + "\n")
    write_index(a.out)
    print("\n".join(md))


NAIVE = "naive ORT (torch.onnx.export + default InferenceSession)"
NAIVE_SHORT = "naive ORT"
DEFAULT = "edgecnn default (ort-cpu, fp32)"
DEFAULT_SHORT = "edgecnn default"
FASTEST32 = "edgecnn fastest fp32"
FASTEST = "edgecnn fastest passing the accuracy gate"


def target_table(default: dict, fastest: dict) -> list[tuple[str, float, float]]:
    """Issue 16's targets, from the default row and the fastest gated row: (target, measured, goal)."""
    return [
        ("default fp32, b64: >= 2x naive ORT", default["b64_vs_naive_ort"], 2.0),
        ("default fp32, b64: >= 6x PyTorch eager", default["b64_vs_eager"], 6.0),
        ("default fp32, b1: <= 0.6x naive ORT (moonshot 0.5x)", default["b1_latency_vs_naive_ort"], 0.6),
        ("fastest passing the gate, b64: >= 4x naive ORT", fastest["b64_vs_naive_ort"], 4.0),
        ("fastest passing the gate, b64: >= 12x PyTorch eager", fastest["b64_vs_eager"], 12.0),
        ("fastest passing the gate, b1: <= 0.45x naive ORT", fastest["b1_latency_vs_naive_ort"], 0.45),
    ]


def _met(target: str, value: float, goal: float) -> bool:
    return value <= goal if "<=" in target else value >= goal


def _defaults_text(d: dict) -> str:
    return (f"threads={d['threads']}, ort-cpu spinning={'on' if d['spinning'] else 'off'}, openvino hint="
            f"{d['openvino_hint']}, openvino hyper-threading {'on' if d.get('openvino_hyper_threading') else 'off'}, "
            f"bf16 tune candidates {'yes' if d['bf16_candidates'] else 'no'}")


def write_index(out: Path) -> None:
    """peers.md: one line per CPU kind measured, pointing at its table (peers-<kind>.md)."""
    lines = ["# edgecnn vs the peers, per CPU kind", "",
             "Each kind's table comes from `python benchmarks/compare_peers.py` on that kind of machine "
             "(see its file for the command, machine, every row, the targets and the profile). \"targets met\" "
             "applies the current targets (issue 16) to each table's rows.", "",
             "| CPU kind | machine | default b64 vs naive ORT | default b64 vs eager | default b1 vs naive ORT "
             "| fastest gated | its b64 vs naive ORT | vs eager | its b1 vs naive ORT | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("peers-*.json")):
        doc = json.loads(f.read_text())
        rows = doc["rows"]
        d = next((r for r in rows if r["name"].startswith("edgecnn default")), None)
        g = next((r for r in rows if r["name"].startswith(FASTEST)), None)
        if d is None or g is None:
            continue
        met = target_table(d, g)
        n_met = sum(1 for t, v, goal in met if _met(t, v, goal))
        lines.append(f"| [{doc.get('cpu_kind', f.stem[6:])}]({f.stem}.md) | {doc['machine']} | "
                     f"{d['b64_vs_naive_ort']:.2f}x | {d['b64_vs_eager']:.2f}x | {d['b1_latency_vs_naive_ort']:.2f}x | "
                     f"{g['name'].split(': ', 1)[-1]} | {g['b64_vs_naive_ort']:.2f}x | {g['b64_vs_eager']:.2f}x | "
                     f"{g['b1_latency_vs_naive_ort']:.2f}x | {n_met}/{len(met)} |")
    have = {f.stem[len("peers-"):] for f in out.glob("peers-*.json")}
    for kind, text in REPORTED_ONLY.items():
        if kind not in have:
            lines += ["", f"**{kind}: not measured on a machine lent to this project yet.** {text}"]
    (out / "peers.md").write_text("\n".join(lines) + "\n")


# CPU kinds seen only in someone's report: what it said, until this command runs there.
REPORTED_ONLY = {
    "intel-xeon-amx": (
        "Issue 16 reports the previous version of this command on a 2-vCPU Intel Xeon with AVX-512 BF16/VNNI "
        "and AMX (1 core x 2 SMT): edgecnn default b64 2.03x naive ORT and 6.07x eager, b1 0.74x naive ORT; "
        "fastest gated (OpenVINO bf16) b64 3.75x naive ORT and 11.2x eager; a plain ORT session with 2 threads "
        "beat ORT's default (1 thread per physical core) at both batch sizes. The defaults chosen for this kind "
        "from that report (one thread per logical CPU, OpenVINO hyper-threading on, bf16 and int8 + bf16 tune "
        "candidates) have not been measured here."),
}


if __name__ == "__main__":
    main()
