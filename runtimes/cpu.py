"""The CPUs this process may use, and what kind they are (torch-free: it ships to devices).

Thread counts come from what the operator allowed, never from the host's size: the affinity mask
(``taskset``, ``--cpuset-cpus``, Kubernetes static CPU manager) and the cgroup CPU quota (``docker run
--cpus``, Kubernetes limits; cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``),
whichever is smaller. ONNX Runtime's own default sees neither: it sizes its pool from the host's
physical cores and pins its threads there, escaping a ``taskset`` mask (measured: a default session under
``taskset -c 0`` kept a worker pinned to CPU 1). Every runtime edgecnn starts is therefore given an
explicit count, which also stops ORT from setting thread affinities at all.

``EDGECNN_CGROUP_ROOT`` points at another cgroup mount (tests use it to fake a quota); ``EDGECNN_CPUINFO``
at another ``/proc/cpuinfo`` (tests use it to describe another CPU kind).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# The instruction-set features the per-kind defaults and the tune candidates look at.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_paths(self_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process from /proc/self/cgroup's text."""
    v2 = v1 = None
    for line in self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _walk(root: Path, rel: str | None, *mounts: str):
    """root/<mount>/<rel>, then each parent up to root/<mount>: a limit on any ancestor applies too."""
    for mount in mounts:
        base = root / mount if mount else root
        if not base.is_dir():
            continue
        parts = [p for p in (rel or "/").split("/") if p]
        for k in range(len(parts), -1, -1):
            yield base.joinpath(*parts[:k])


def cgroup_quota(root: str | os.PathLike | None = None, self_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup (and its ancestors) in CPUs, or None when unlimited/unknown.

    cgroup v2: ``cpu.max`` holds "<quota> <period>" or "max <period>"; v1: ``cpu.cfs_quota_us`` (-1 for
    none) over ``cpu.cfs_period_us``. The smallest limit on the path to the root is the one that binds.
    """
    root = Path(root or os.environ.get("EDGECNN_CGROUP_ROOT") or "/sys/fs/cgroup")
    if self_cgroup is None:
        self_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(self_cgroup)
    limits: list[float] = []
    for d in _walk(root, v2, "unified", ""):  # "unified": v2 beside v1 (hybrid hosts)
        text = _read(d / "cpu.max")
        if text:
            fields = text.split()
            try:
                if len(fields) >= 2 and fields[0] != "max" and int(fields[1]) > 0:
                    limits.append(int(fields[0]) / int(fields[1]))
            except ValueError:
                pass
    if not limits:
        for d in _walk(root, v1, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            try:
                if quota and period and int(quota) > 0 and int(period) > 0:
                    limits.append(int(quota) / int(period))
            except ValueError:
                pass
    return min(limits) if limits else None


def allowed_cpus() -> int:
    """CPUs in this process's affinity mask (all logical CPUs where the OS has no such mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_cpus() -> list[str]:
    """The CPU lists this process's threads may run on (Cpus_allowed_list of /proc/self/task/*/status): a
    list other than the process's mask is a thread pinned elsewhere."""
    out = set()
    for st in Path("/proc/self/task").glob("*/status"):
        text = _read(st) or ""
        out.update(ln.split()[1] for ln in text.splitlines() if ln.startswith("Cpus_allowed_list"))
    return sorted(out)


def threads_from(allowed: int, quota: float | None) -> int:
    """min(affinity mask, quota rounded up), at least 1: a quota of 1.5 CPUs gets 2 threads (as the JVM,
    .NET and Go size their pools), a quota of 0.5 gets 1."""
    n = allowed if quota is None else min(allowed, math.ceil(quota - 1e-9))
    return max(1, n)


def usable_cpus() -> int:
    """How many CPUs this process may keep busy: the affinity mask and the cgroup quota, never more."""
    return threads_from(allowed_cpus(), cgroup_quota())


@dataclass(frozen=True)
class CpuDescription:
    """What the machine reports about its CPUs; the per-kind defaults are chosen from this alone."""

    vendor: str = ""  # GenuineIntel / AuthenticAMD / "" (not x86 or unknown)
    model: str = ""
    flags: frozenset = field(default_factory=frozenset)  # the ISA_FLAGS this CPU has
    logical: int = 1  # logical CPUs the host has
    threads_per_core: int = 1  # SMT: 2 where two logical CPUs share a core
    allowed: int = 1  # in this process's affinity mask
    quota: float | None = None  # cgroup CPU quota, in CPUs
    machine: str = ""  # platform.machine()

    @property
    def usable(self) -> int:
        return threads_from(self.allowed, self.quota)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags and ("amx_int8" in self.flags or "amx_bf16" in self.flags)

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (AVX-512 BF16 or AMX-BF16): OpenVINO's bf16 path is fast here."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot products (AVX-512 VNNI or AVX-VNNI, or AMX-INT8)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def kind(self) -> str:
        """A short name for the CPU kind, used to name results files: vendor + the ISA tier that
        decides the fast paths (e.g. ``intel-xeon-amx``, ``amd-epyc-avx512-bf16``, ``amd-epyc-avx2``)."""
        vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(self.vendor, "")
        m = self.model.lower()
        family = next((f for f in ("xeon", "epyc", "core", "ryzen") if f in m), "")
        tier = ("amx" if self.amx else "avx512-bf16" if "avx512_bf16" in self.flags
                else "avx512" if "avx512f" in self.flags else "avx2" if "avx2" in self.flags else "")
        parts = [p for p in (vendor, family, tier) if p] or [self.machine or "cpu"]
        return "-".join(parts)

    def text(self) -> str:
        q = f", cgroup quota {self.quota:g} CPUs" if self.quota is not None else ""
        smt = f", {self.threads_per_core} threads per core" if self.threads_per_core > 1 else ""
        isa = ", ".join(f for f in ISA_FLAGS if f in self.flags) or "no AVX2"
        return (f"{self.model or self.machine or 'unknown CPU'} ({self.kind}), {self.logical} logical CPUs{smt}, "
                f"{self.allowed} in the affinity mask{q} -> {self.usable} usable; {isa}")


def parse_cpuinfo(text: str) -> dict:
    """vendor, model, flags and threads per core from /proc/cpuinfo's text (first processor's block)."""
    info: dict = {"vendor": "", "model": "", "flags": frozenset(), "threads_per_core": 1}
    siblings = cores = None
    for line in text.splitlines():
        if ":" not in line:
            if info["model"] and not line.strip():
                break  # the first processor's block is enough
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        if key == "vendor_id":
            info["vendor"] = value
        elif key == "model name":
            info["model"] = value
        elif key in ("flags", "Features"):
            info["flags"] = frozenset(value.split()) & frozenset(ISA_FLAGS)
        elif key == "siblings" and value.isdigit():
            siblings = int(value)
        elif key == "cpu cores" and value.isdigit():
            cores = int(value)
    if siblings and cores:
        info["threads_per_core"] = max(1, siblings // cores)
    return info


def describe_cpu(cpuinfo: str | None = None) -> CpuDescription:
    """This machine, as the process sees it now (affinity and quota are read each call: they can change)."""
    info = parse_cpuinfo(cpuinfo if cpuinfo is not None else _cpuinfo_text())
    return CpuDescription(vendor=info["vendor"], model=info["model"] or platform.processor(),
                          flags=info["flags"], logical=os.cpu_count() or 1, threads_per_core=info["threads_per_core"],
                          allowed=allowed_cpus(), quota=cgroup_quota(), machine=platform.machine())


@lru_cache(maxsize=4)
def _cpuinfo_file(path: str) -> str:
    return _read(Path(path)) or ""


def _cpuinfo_text() -> str:
    return _cpuinfo_file(os.environ.get("EDGECNN_CPUINFO") or "/proc/cpuinfo")


# ------------------------------------------------------------------------------- per-kind defaults
# What a runtime does when the user sets nothing, decided at load time from the CpuDescription alone.
# Each choice names the measurement that made it (benchmarks/results/peers-<kind>.md hold the tables).
MEASURED = {
    "threads": (
        "one intra-op thread per usable CPU (affinity mask and cgroup quota), always passed explicitly. "
        "Intel Xeon AMX, 2 vCPUs = 1 core x 2 SMT (issue 16): ORT's physical-core default ran 1 thread, "
        "b1 0.359 ms / b64 2,672 img/s, against 0.315 ms / 2,983 with 2 threads; AMD EPYC (no SMT): the "
        "default equals an explicit 2 (5,725 vs 5,637 img/s, peers-amd-epyc-avx512-bf16.md); under a 1-CPU "
        "cgroup quota on amd-epyc-avx2, 2 threads gave 749 img/s at b64 against 931 with 1 (peers-amd-epyc-avx2.md)"),
    "spinning": (
        "on where every thread has a CPU of its own (b1 p50 0.16-0.20 ms with it, 0.23-0.24 without on "
        "amd-epyc-avx512-bf16); off where a cgroup quota is smaller than the affinity mask: spinning threads "
        "burn the quota while idle and the whole pool is throttled for the rest of the period (amd-epyc-avx2, "
        "1.5-CPU quota, 2 threads, 3 rounds: spinning b1 p50 0.56-0.79 ms but p99 up to 21.7 ms; without it "
        "p50 0.61-0.64 ms, p99 at most 1.63 ms; b64 within noise, 1,070-1,722 against 1,101-1,654 img/s)"),
    "openvino_hint": (
        "LATENCY on every kind measured (one synchronous request per thread): amd-epyc-avx512-bf16 5,504 "
        "vs 2,838 img/s with THROUGHPUT; amd-epyc-avx2 1,584 vs 840 img/s (tune screening, 2 threads)"),
    "openvino_hyper_threading": (
        "on where the CPU has SMT (two logical CPUs per core): OpenVINO's LATENCY hint otherwise runs one "
        "thread per physical core, half the usable CPUs of a 2-vCPU SMT VM; there ORT measured 2 threads "
        "faster than 1 at both batch sizes (Intel Xeon AMX, issue 16; not measured with OpenVINO: no such "
        "machine was lent); off elsewhere (OpenVINO's own default)"),
    "batch_sessions": (
        "one session for every batch size: a batch-1 session with fewer threads was slower on each kind "
        "measured (amd-epyc-avx2: b1 p50 0.76-0.96 ms with 1 thread against 0.51-0.69 ms with 2; Intel AMX, "
        "issue 16: 0.315 ms with 2 threads against 0.359 ms with ORT's 1)"),
    "serve_instances": (
        "`edgecnn serve` on ort-cpu: one instance with every usable thread, except amd-epyc-avx512-bf16 with "
        "2 usable CPUs: two single-thread instances taking at most 2 queued rows a call, a lone request on a "
        "2-thread session. There, binary batch-1 requests, three runs with both configurations in the same "
        "3 rounds (benchmarks/results/serve-amd-epyc-avx512-bf16.md at 0345d32, cbe462d and after): 32 "
        "clients 2,544 / 2,492 / 2,410, 2,206 / 2,125 / 2,097 and 2,176 / 2,172 / 2,178 req/s against "
        "2,136 / 1,780 / 2,206, 2,156 / 1,939 / 2,142 and 2,116 / 1,679 / 1,995 for one 2-thread instance "
        "(ahead in 8 rounds of 9); 8 clients even or ahead (medians 2,070, 2,135 and 1,902 against 2,134, "
        "1,712 and 1,663); 1 client p50 lower in 7 rounds of 9, up to 0.14 ms higher in the other 2. "
        "Alternated probes of other bodies (3 rounds): JSON even (32 clients 1,013 / 1,090 / 1,106 against "
        "954 / 1,030 / 1,206 req/s, p99 lower in every round), JPEG BYTES at 32 clients 1,240 / 1,363 / "
        "1,301 against 1,366 / 1,408 / 1,186 (median 5% lower). In alternated probes two instances taking "
        "every queued row left one idle (1.53 cores busy, against 1.7 with 2-row calls). Not re-measured "
        "elsewhere: amd-epyc-avx2 measured --instances 2 -O threads=1 no better than one 2-thread "
        "instance, before the 2-row calls and the lone session existed. Since the lean parser (a057fd3; runs "
        "0592df7, 3021cac and the one after) the two are even: 32 clients 1,643 / 1,761 / 1,857, 2,415 / "
        "2,109 / 2,671 and 2,647 / 2,686 / 2,761 against 1,888 / 1,759 / 1,938, 2,215 / 2,134 / 2,374 and "
        "2,762 / 2,788 / 2,916 req/s (ahead in 3 rounds of 9), server CPU per request 964 / 740 / 664 against "
        "961 / 853 / 684 us. Three runs at 370e7ad (the leaner load client, ~40 instead of ~87 client CPU us "
        "per request) decided it for the split: 32 clients medians 2,518 / 2,367 / 2,496 against 1,998 / "
        "2,272 / 2,161 req/s (ahead in 8 rounds of 9), server CPU per request 727 / 773 / 728 against 961 / "
        "892 / 896 us; 8 clients and 1 client even; JPEG BYTES at 32 clients even (ahead in 4 rounds of 9)"),
    "fast_paths": (
        "tune candidates follow the ISA: bf16 (and int8 with bf16 float ops) only where bf16 is native "
        "(AVX-512 BF16 or AMX-BF16; elsewhere OpenVINO does not list BF16 among the CPU's capabilities, "
        "amd-epyc-avx2: FP32, INT8, BIN); int8 everywhere (VNNI/AMX-INT8 speed it up where present)"),
}


@dataclass(frozen=True)
class Defaults:
    """The per-kind defaults for one CpuDescription; ``why`` says which measurement chose each."""

    kind: str
    threads: int
    spinning: bool
    openvino_hint: str
    openvino_hyper_threading: bool
    bf16_candidates: bool
    int8_bf16_candidates: bool
    serve_instances: int = 1
    serve_call_rows: int | None = None
    why: dict = field(default_factory=lambda: dict(MEASURED))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "threads": self.threads, "spinning": self.spinning,
                "openvino_hint": self.openvino_hint, "openvino_hyper_threading": self.openvino_hyper_threading,
                "bf16_candidates": self.bf16_candidates,
                "int8_bf16_candidates": self.int8_bf16_candidates,
                "serve_instances": self.serve_instances, "serve_call_rows": self.serve_call_rows}


def defaults_for(cpu: CpuDescription) -> Defaults:
    """The defaults for the machine ``cpu`` describes (a pure function: tests pass made-up machines)."""
    usable = cpu.usable
    quota_binds = cpu.quota is not None and cpu.quota < cpu.allowed
    split = cpu.kind == "amd-epyc-avx512-bf16" and usable == 2 and not quota_binds  # the one kind measured
    return Defaults(kind=cpu.kind, threads=usable, spinning=not quota_binds and usable > 1,
                    openvino_hint="latency", openvino_hyper_threading=cpu.threads_per_core > 1,
                    bf16_candidates=cpu.bf16, int8_bf16_candidates=cpu.bf16,
                    serve_instances=usable if split else 1, serve_call_rows=2 if split else None)


def current_defaults() -> Defaults:
    """defaults_for(this machine, as this process sees it now)."""
    return defaults_for(describe_cpu())
