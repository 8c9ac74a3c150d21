"""Latency and throughput: warm-up excluded, rotating real-looking inputs, percentiles per batch size."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError


@dataclass
class BenchRow:
    runtime: str
    device: str
    precision: str
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images per second over the timed iterations
    load_s: float  # model load / compile time (cold start)
    note: str = ""
    threads_used: int | None = None  # intra-op threads the runtime ran with (given, or the usable CPUs)

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(batch: int, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), buffers: int = 4,
                seed: int = 0, raw: bool = False) -> list[np.ndarray]:
    """``buffers`` distinct batches of built-in data-set images (not zeros), normalized (raw: uint8 NHWC)."""
    from .data import synthetic_dataset

    n = batch * buffers
    ds = synthetic_dataset(per_class=min(-(-n // 6), 64), seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(ds), size=n)
    x = ds.images[idx] if raw else ds.subset(idx).tensors(mean, std)
    return [np.ascontiguousarray(x[i * batch : (i + 1) * batch]) for i in range(buffers)]


def time_runtime(rt, batch: int, *, warmup: int = 5, min_time: float = 1.0, min_iters: int = 10,
                 max_iters: int = 10_000, load_s: float = 0.0) -> BenchRow:
    from edgecnn.runtimes.classifier import metadata_norm

    _, mean, std = metadata_norm(rt.metadata())
    from edgecnn.runtimes.timing import measure

    inputs = make_inputs(batch, mean, std, raw=getattr(rt, "input_layout", "NCHW") == "NHWC-uint8")
    t = measure(rt.run, inputs, warmup=warmup, min_time=min_time, min_iters=min_iters, max_iters=max_iters)
    return BenchRow(rt.name, rt.device, getattr(rt, "actual_precision", rt.precision), batch, t.iterations,
                    t.p50_ms, t.p90_ms, t.p99_ms, t.mean_ms, t.throughput(batch), load_s)


def relax_batch(onnx_path: Path, out: Path, batch: int | None = None) -> Path:
    """Copy of an ONNX model with a symbolic batch axis (for batch > 1 timing), or with the batch axis
    pinned to ``batch`` (CUDA graphs capture one fixed shape)."""
    import onnx

    m = onnx.load(str(onnx_path))
    for vi in list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        if batch is None:
            d.ClearField("dim_value")
            d.dim_param = "batch"
        else:
            d.ClearField("dim_param")
            d.dim_value = batch
    onnx.save(m, str(out))
    return out


@dataclass
class FailedCell:
    """A configuration (or one batch of it) that could not be measured, and why."""

    runtime: str
    precision: str
    batch: int | None
    error: str
    unavailable: bool = False  # the runtime/device/precision is not usable here (RuntimeUnavailableError)

    def as_dict(self) -> dict:
        return asdict(self)


def default_model(folder: Path, num_classes: int = 6) -> tuple[Path, Path]:
    """A freshly exported default Net (random weights; latency does not depend on them)."""
    import torch

    from edgecnn.exporters.onnx import export

    from .checkpoint import Checkpoint, save_checkpoint
    from .model import Net

    torch.manual_seed(0)
    net = Net(num_classes)
    pt = folder / "default_net.pt"
    save_checkpoint(Checkpoint(net.state_dict(), num_classes, [f"class_{i}" for i in range(num_classes)]), pt)
    res = export(pt, folder / "default_net.onnx", dynamic_batch=True, check=False)
    return res.path, pt


def model_for_runtime(runtime: str, model: Path) -> Path:
    """The file a runtime reads: torch needs the checkpoint an ONNX file was exported from."""
    from edgecnn.runtimes import get_runtime_class

    suffixes = get_runtime_class(runtime).suffixes
    if model.suffix.lower() in suffixes:
        return model
    if runtime == "torch" and model.suffix.lower() == ".onnx":
        sib = model.with_suffix(".pt")
        if sib.is_file():
            from edgecnn.exporters.meta import onnx_metadata

            from ._io import sha256_file

            meta_sha = onnx_metadata(model).get("source_sha256")
            if meta_sha is None or meta_sha == sha256_file(sib):
                return sib
        raise InvalidInputError(f"runtime torch needs the .pt checkpoint {model} was exported from; pass it instead")
    raise InvalidInputError(f"runtime {runtime} reads {'/'.join(suffixes)} files, not {model.name}")


def bench(model: str | os.PathLike | None, runtimes: list[str], batches: list[int], *, precision: str = "fp32",
          threads: int | None = None, min_time: float = 1.0, warmup: int = 5, progress=None,
          options: dict | None = None, failed: list | None = None) -> list[BenchRow]:
    """Time each runtime in this process. ``options``: {runtime: {key: value}}, each runtime's own (see
    edgecnn.runtimes.options.route). With ``failed`` (a list), a batch that cannot be run is recorded
    there as a FailedCell and the other batches are still measured; without it, the error is raised."""
    if not batches or min(batches) < 1:
        raise InvalidInputError("batch sizes must be >= 1")
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="edgecnn-bench-") as td:
        tmp = Path(td)
        if model is None:
            onnx_path, pt_path = default_model(tmp)
            paths = {"onnx": onnx_path, "pt": pt_path}
        else:
            model = Path(model)
            if not model.is_file():
                raise InvalidInputError(f"{model}: no such model file")
            paths = None
        for name in runtimes:
            opts = dict((options or {}).get(name) or {})
            if paths is not None:
                path = paths["pt"] if name == "torch" else paths["onnx"]
            else:
                path = model_for_runtime(name, model)
            for row in _bench_one(name, path, batches, tmp, precision, threads, min_time, warmup, opts, failed):
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def _bench_one(name: str, path: Path, batches: list[int], tmp: Path, precision: str, threads, min_time, warmup,
               opts: dict, failed: list | None):
    """Rows for one runtime over the batch sizes. A fixed-batch model runs larger batches through a copy
    with a symbolic batch axis; with cuda_graph, each batch runs a copy pinned to that batch (one graph
    per shape). A batch that fails is a FailedCell when ``failed`` is given."""
    from edgecnn.runtimes import load_runtime

    from .errors import EdgeCNNError

    graphs = bool(opts.get("cuda_graph"))
    loaded: dict[str, object] = {}

    def get(key: str, file):
        """The runtime for ``file`` (a path, or a function making the file), loaded once; its error, again."""
        if key not in loaded:
            t0 = time.perf_counter()
            try:
                file = file() if callable(file) else file
                loaded[key] = (load_runtime(name, file, precision=precision, threads=threads, **opts),
                               time.perf_counter() - t0)
            except EdgeCNNError as e:
                loaded[key] = e
        if isinstance(loaded[key], Exception):
            raise loaded[key]
        return loaded[key]

    file_precision = _graph_precision(path)  # int8 / fp16 files, read from the graph
    try:
        for b in batches:
            try:
                if graphs and path.suffix.lower() == ".onnx":
                    rt, load_s = get(f"b{b}", lambda b=b: relax_batch(path, tmp / f"b{b}_{path.name}", batch=b))
                    note = f"batch axis pinned to {b} for CUDA graph capture"
                else:
                    rt, load_s = get("main", path)
                    note = ""
                    if rt.input_shape[0] is not None and rt.input_shape[0] != b:
                        rt, _ = get("relaxed", lambda: relax_batch(path, tmp / f"relaxed_{path.name}"))
                        note = "batch axis made symbolic for this run"
                row = time_runtime(rt, b, warmup=warmup, min_time=min_time, load_s=load_s)
            except EdgeCNNError as e:
                if failed is None:
                    raise
                from .errors import RuntimeUnavailableError

                failed.append(FailedCell(name, precision, b, str(e), isinstance(e, RuntimeUnavailableError)))
                continue
            row.note = note
            row.threads_used = getattr(rt, "threads_used", None)
            if file_precision and file_precision != "fp32":
                row.precision = file_precision
            yield row
    finally:
        for v in loaded.values():
            if not isinstance(v, Exception):
                v[0].close()


def _graph_precision(path: Path) -> str | None:
    """The precision a model file's graph computes in (None for a checkpoint)."""
    from edgecnn.runtimes.artifact import FORMATS, describe

    return describe(path).precision if path.suffix.lower() in FORMATS else None


def _worker(job: dict) -> list[dict]:
    """One configuration in this (fresh) process: every batch size, plus peak RSS and file size."""
    from .quant_report import file_size

    model = Path(job["model"])
    label = job["precision"]
    run_precision = "fp32" if label == "int8" else label  # an int8 file runs with the runtime's fp32 setting
    failed: list[FailedCell] = []
    rows = bench(model, [job["runtime"]], job["batches"], precision=run_precision, threads=job["threads"],
                 min_time=job["min_time"], warmup=job["warmup"], options={job["runtime"]: job.get("options") or {}},
                 failed=failed)
    peak_mb = _peak_rss_mb()
    out = [{"failed": True, **f.as_dict(), "precision": label} for f in failed]
    for r in rows:
        d = r.as_dict()
        d.update(peak_rss_mb=peak_mb, file_bytes=file_size(model), model=str(model), options=job.get("options") or {})
        if d["options"]:
            opts = ",".join(f"{k}={v}" for k, v in sorted(d["options"].items()))
            d["note"] = f"{d['note']}; {opts}" if d["note"] else opts
        out.append(d)
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss survives exec and would
    report the parent's size that the child was forked from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":  # python -m edgecnn.bench '<job json>' (used by edgecnn.sweep)
    import json
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    try:
        print(json.dumps(_worker(json.loads(sys.argv[1]))))
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
