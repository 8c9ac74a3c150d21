"""Streaming bulk prediction: paths -> parallel decode -> batches -> model -> result rows. Torch-free.

`edgecnn predict`, `edgecnn predict --engine ray` and the bundle's predict.py (which gets a standalone
copy of this file, edgecnn_pipeline.py) all run this code; the result files are written by
``edgecnn.runtimes.tables``. Memory is bounded: paths are read lazily and at most ``workers + 1``
batches are decoded ahead of the model.

Measured on 2 shared cores (benchmarks/bulk_predict.py -> results/bulk_predict.md): decode threads and
decode processes came out within noise of each other, so threads are the default (no start-up, no
pickling, nothing to spawn from the bundle's predict.py); ``executor="process"`` is there. The model's
runtime is given one thread by the callers unless ``choose_split`` (below) finds the model the slower stage.

How many decode workers and how many runtime threads: ``measure_split`` decodes the first few files on the
calling thread (CPU time) and times the model on them, while helper threads decode the rest of the first
batch (all of it then is the first batch: nothing is decoded twice); ``choose_split`` turns those
per-image costs into the split that a simple model of the pipeline predicts fastest for the usable CPUs,
with the fewest threads among near-ties. What the caller fixed (``--workers``, ``-O threads``, a tuned
thread count) is kept; only the rest is chosen. Measured on 2 cores (300 photos, interleaved rounds):
2 workers + 1 runtime thread 267 img/s, 1 + 1 182, 1 + 2 186, 2 + 2 243 (274 without ORT's spinning);
for 128x96 JPEGs (model-bound) 1 worker + 2 threads without spinning 670 against 486 for 2 + 1.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np
from edgecnn.runtimes.preprocess import InvalidInputError, to_rgb_uint8

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
DEFAULT_BATCH = 64  # the runtime's throughput is flat from 32 up on this Net (bench), and 64 keeps latency low
DECODE_CHUNK = 16  # files per decode task where the model's thread may decode some (see predict_rows)
_GLOB = re.compile(r"[*?[]")


class BatchModel(Protocol):
    """What the pipeline needs from a model: ``Classifier`` and the bundle's ``BundleModel`` both have it."""

    class_names: Sequence[str]
    input_size: int

    def probabilities_from_pixels(self, rgb: np.ndarray) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------ input paths
def iter_paths(inputs: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Each input -> image paths, lazily: a folder (recursive, sorted, image suffixes, no hidden names),
    a glob, a .txt/.lst file listing one path a line (# comments), or a file (named as given)."""
    for arg in inputs:
        arg = os.fspath(arg)
        if os.path.isdir(arg):
            yield from _walk(arg)
        elif os.path.isfile(arg) and os.path.splitext(arg)[1].lower() in LIST_SUFFIXES:
            yield from _read_list(arg)
        elif not os.path.lexists(arg) and _GLOB.search(arg):
            import glob

            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise InvalidInputError(f"{arg}: no file matches this pattern")
            for m in matches:
                yield from (_walk(m) if os.path.isdir(m) else (m,))
        else:
            yield arg  # a file, or one that is missing: its row will say so


def _walk(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield os.path.join(dirpath, name)


def _read_list(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line
    except OSError as e:
        raise InvalidInputError(f"{path}: cannot read the list of paths ({e.strerror or type(e).__name__})") from None


def count_paths(inputs: Sequence[str | os.PathLike]) -> int:
    """How many paths ``iter_paths`` will give (a second, storage-free pass: for the progress bar's ETA)."""
    return sum(1 for _ in iter_paths(inputs))


# ------------------------------------------------------------------------------------------ decoding
def decode_many(paths: Sequence[str], size: int, fast_jpeg: bool = False) -> tuple[np.ndarray, list[str | None]]:
    """Paths -> (uint8 (N, size, size, 3), per path None or the reason it could not be read). Never raises."""
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    errors: list[str | None] = []
    for i, p in enumerate(paths):
        try:
            out[i] = to_rgb_uint8(p, size, fast_jpeg=fast_jpeg)
            errors.append(None)
        except InvalidInputError as e:  # its message starts with the path, which the row already has
            msg = str(e)
            prefix = next((f"{q}: " for q in (p, os.path.normpath(p), str(Path(p))) if msg.startswith(f"{q}: ")), "")
            errors.append(msg[len(prefix):])
        except Exception as e:  # noqa: BLE001 - any failure of one file is that file's row, never the run's end
            errors.append(f"{type(e).__name__}: {e}")
    return out, errors


def default_workers() -> int:
    """Decode workers: one per CPU this process may use (affinity mask and cgroup quota, runtimes/cpu.py)."""
    from edgecnn.runtimes.cpu import usable_cpus

    return usable_cpus()


def _executor(kind: str, workers: int) -> Executor:
    if kind == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="decode")
    if kind == "process":
        import multiprocessing

        # spawn, not fork: the parent holds a runtime's thread pool, which a forked child would inherit half-alive
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    raise InvalidInputError(f"unknown decode executor {kind!r}; use 'thread' or 'process'")


# ------------------------------------------------------------------------------------------ the split
PARALLEL_EFFICIENCY = 0.7  # a 2nd runtime thread's share of a 1st: ORT on this Net, batch 64, 2 cores: 1,040 vs 601 img/s
NEAR_TIE = 0.03  # splits predicted within 3% of the fastest count as ties: the one with the fewest threads wins


@dataclass
class Decoded:
    """Files already decoded (by ``measure_split``): ``predict_rows`` takes them as its first files."""

    paths: list[str]
    pixels: np.ndarray
    errors: list[str | None]
    measured: int = 0  # of them, the first files whose decoding was timed


@dataclass
class Split:
    """Decode workers and runtime threads for one run, and what they were chosen from."""

    workers: int
    threads: int
    cpus: int
    chosen: tuple[str, ...] = ()  # which of "workers", "threads" were chosen here (the rest was given)
    decode_s: float | None = None  # seconds per image, decoding on one thread
    model_s: float | None = None  # seconds per image, the model at ``model_threads``
    model_threads: int = 1
    files: int = 0  # files the figures were measured on
    predicted: float | None = None  # images/s the pipeline model predicts for this split
    reason: str = ""  # why nothing was measured, when nothing was
    head: Decoded | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1e3, 3)

        return {"workers": self.workers, "threads": self.threads, "cpus": self.cpus, "chosen": list(self.chosen),
                "decode_ms_per_image": ms(self.decode_s), "model_ms_per_image": ms(self.model_s),
                "model_threads": self.model_threads, "files": self.files,
                "predicted_img_s": None if self.predicted is None else round(self.predicted, 1),
                "reason": self.reason or None}

    def note(self) -> str:
        """The one line that says what was chosen and from what."""
        def n(v: int, what: str) -> str:
            return f"{v} {what}{'s' if v != 1 else ''}"
        given = [w for w in ("workers", "threads") if w not in self.chosen]
        head = (f"decoding on {n(self.workers, 'thread')}, the model on {n(self.threads, 'thread')} "
                f"({self.cpus} usable CPU{'s' if self.cpus != 1 else ''}")
        head += f"; {' and '.join({'workers': '--workers', 'threads': 'runtime threads'}[g] for g in given)} as given"\
            if given else ""
        if self.reason:
            return f"{head}; not measured: {self.reason})"
        figs = [f"decode {self.decode_s * 1e3:.1f} ms/image"] if self.decode_s is not None else []
        if self.model_s is not None:
            figs.append(f"model {self.model_s * 1e3:.2f} ms/image on {n(self.model_threads, 'thread')}")
        return f"{head}; measured on {n(self.files, 'file')}: {', '.join(figs)})"


def _model_wall(model_s: float, measured_at: int, threads: int, efficiency: float) -> float:
    """Seconds per image on ``threads`` runtime threads, from a measurement on ``measured_at`` threads."""
    one = model_s * (1 + efficiency * (measured_at - 1))
    return one / (1 + efficiency * (threads - 1))


def predicted_rate(workers: int, threads: int, decode_s: float, model_s: float, cpus: int, *,
                   model_threads: int = 1, efficiency: float = PARALLEL_EFFICIENCY) -> float:
    """Images/s of the pipeline with ``workers`` decode workers and the model on ``threads`` threads: the
    slowest of the decode stage (one CPU per worker at most), the model stage, and the CPUs themselves
    (every runtime thread counts as busy while the model runs, as ORT's pool does while it spins)."""
    m = _model_wall(model_s, model_threads, threads, efficiency)
    decode_cap = min(workers, cpus) / max(decode_s, 1e-9)
    model_cap = 1 / max(m, 1e-9)
    cpu_cap = cpus / max(decode_s + threads * m, 1e-9)
    return min(decode_cap, model_cap, cpu_cap)


def choose_split(decode_s: float | None, model_s: float | None, cpus: int, *, workers: int | None = None,
                 threads: int | None = None, model_threads: int = 1,
                 efficiency: float = PARALLEL_EFFICIENCY) -> tuple[int, int]:
    """(decode workers, runtime threads) for ``cpus`` usable CPUs, from the measured per-image seconds of
    decoding (one thread) and of the model (on ``model_threads`` threads). ``workers`` / ``threads`` given:
    kept, only the other is chosen. Unmeasured (None): the decode-bound default, one worker per CPU and
    one runtime thread. Workers and threads each stay within ``cpus``; together they may exceed it by what
    the CPU term of ``predicted_rate`` allows (the model's thread waits for decoding part of the time: on
    2 CPUs, 2 workers and 1 runtime thread measured 1.46x one of each); among splits predicted within
    NEAR_TIE of the fastest, the one with the fewest threads in all (then fewer runtime threads) wins:
    a thread more than the work needs only competes for the cores."""
    cpus = max(1, int(cpus))
    if decode_s is None or model_s is None or decode_s <= 0 or model_s <= 0:
        return (workers or cpus, threads or 1)
    ws = [workers] if workers else range(1, cpus + 1)
    ts = [threads] if threads else range(1, cpus + 1)
    rates = {(w, t): predicted_rate(w, t, decode_s, model_s, cpus, model_threads=model_threads, efficiency=efficiency)
             for w in ws for t in ts}
    best = max(rates.values())
    return min((k for k, v in rates.items() if v >= best * (1 - NEAR_TIE)), key=lambda k: (k[0] + k[1], k[1], k[0]))


def measure_split(paths: Iterator[str], model: BatchModel, *, fast_jpeg: bool = False, max_files: int = 8,
                  max_seconds: float = 0.1, time_model: bool = True, model_threads: int = 1, fill: int = 0,
                  helpers: int = 0) -> tuple[Decoded | None, float | None, float | None]:
    """Decode the next ``max_files`` of ``paths`` on this thread, timing the first of them (those within
    ``max_seconds``, at least one), and time the model on those that decoded: (the decoded files, decode
    s/image, model s/image; ``Decoded.measured`` says on how many files). Meanwhile ``helpers`` threads
    decode the ``fill`` files after them (this thread joins in once it is done), so the start of a run
    does not leave CPUs idle. Never raises for a file; the decoded files are meant for
    ``predict_rows(first=...)``."""
    size = int(model.input_size)
    probe = list(islice(paths, max(1, max_files)))
    if not probe:
        return None, None, None
    extra = list(islice(paths, fill)) if helpers > 0 and fill > 0 else []
    pieces = [extra[i:i + DECODE_CHUNK] for i in range(0, len(extra), DECODE_CHUNK)]
    pool = ThreadPoolExecutor(helpers, thread_name_prefix="decode") if pieces else None
    arrays: list[np.ndarray] = []
    errors: list[str | None] = []
    model_s = None

    def time_model_on(x: np.ndarray) -> float:
        model.probabilities_from_pixels(x)  # the first run at a new batch size allocates
        w0, c0 = time.perf_counter(), time.thread_time()
        model.probabilities_from_pixels(x)
        w, c = time.perf_counter() - w0, time.thread_time() - c0
        # on one thread ORT runs on this one, so its CPU time is the model's; more threads: the wall time
        return (c if model_threads <= 1 else w) / len(x)

    try:
        futs = [pool.submit(decode_many, pc, size, fast_jpeg) for pc in pieces] if pool is not None else []
        counted, cpu = 0, 0.0
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for p in probe:
            timing = counted == len(arrays) and (counted == 0 or time.perf_counter() - wall0 < max_seconds)
            px, err = decode_many([p], size, fast_jpeg)
            arrays.append(px)
            errors += err
            if timing:
                counted += 1
                cpu = time.thread_time() - cpu0
        # CPU time: what the work costs, whatever else the machine runs (wall time doubled under a load of
        # 4 on 2 cores and flipped the choice); the split divides CPUs, so their time is what counts
        decode_s = cpu / counted
        ok = [i for i, e in enumerate(errors) if e is None]
        probe_pixels = np.concatenate(arrays)
        if ok and time_model and model_threads <= 1:  # its CPU time is not disturbed by the helpers
            model_s = time_model_on(probe_pixels[ok])
        results = [decode_many(pc, size, fast_jpeg) if f.cancel() else None for pc, f in zip(pieces, futs, strict=True)]
        results = [r if r is not None else f.result() for r, f in zip(results, futs, strict=True)]
        if ok and time_model and model_threads > 1:  # wall time: once the helpers are done
            model_s = time_model_on(probe_pixels[ok])
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    pixels = np.concatenate([probe_pixels, *(r[0] for r in results)]) if results else probe_pixels
    head = Decoded(probe + extra, pixels, errors + [e for r in results for e in r[1]], counted)
    return head, decode_s, model_s


def plan_split(paths: Iterator[str], model: BatchModel, *, cpus: int | None = None, workers: int | None = None,
               threads: int | None = None, model_threads: int = 1, fast_jpeg: bool = False,
               batch_size: int = DEFAULT_BATCH, files_left: int | None = None) -> Split:
    """Measure (unless both are given) and choose the split; the Split's ``head`` holds the files decoded
    meanwhile (pass it to ``predict_rows(first=...)``), ``paths`` continues after them. ``files_left``: how
    many files the run has; one batch or less is not measured (the split hardly matters, the time would)."""
    cpus = cpus or default_workers()
    chosen = tuple(w for w, v in (("workers", workers), ("threads", threads)) if not v)
    if not chosen:
        return Split(workers, threads, cpus)
    if files_left is not None and files_left <= batch_size:
        w, t = choose_split(None, None, cpus, workers=workers, threads=threads)
        why = ("no files left" if files_left <= 0 else
               f"{files_left} file{'s' if files_left != 1 else ''}, one batch or less")
        return Split(w, t, cpus, chosen, reason=why)
    probe = min(8, batch_size)
    # the rest of the first batch is decoded meanwhile, on as many threads as decoding may have less this one
    helpers = max(0, min(cpus, workers or cpus) - 1)
    head, decode_s, model_s = measure_split(paths, model, fast_jpeg=fast_jpeg, max_files=probe,
                                            model_threads=threads or model_threads, fill=batch_size - probe,
                                            helpers=helpers)
    w, t = choose_split(decode_s, model_s, cpus, workers=workers, threads=threads,
                        model_threads=threads or model_threads)
    reason = ("no files left" if head is None else
              f"none of the first {min(probe, len(head.paths))} files could be read" if model_s is None else "")
    split = Split(w, t, cpus, chosen, decode_s, model_s, threads or model_threads, head.measured if head else 0,
                  None, reason, head)
    if decode_s and model_s:
        split.predicted = predicted_rate(w, t, decode_s, model_s, cpus, model_threads=split.model_threads)
    return split


# ------------------------------------------------------------------------------------------ rows
def columns(top_k: int) -> list[str]:
    """The columns of a result row: path, label_1, prob_1, ..., label_k, prob_k, error."""
    cols = ["path"]
    for i in range(1, top_k + 1):
        cols += [f"label_{i}", f"prob_{i}"]
    return [*cols, "error"]


def make_rows(paths: Sequence[str], errors: Sequence[str | None], probs: np.ndarray | None,
              class_names: Sequence[str], top_k: int) -> list[dict]:
    """One row per path; ``probs`` holds one row per path whose error is None, in order."""
    k = min(top_k, len(class_names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k] if probs is not None else None  # once per batch
    rows, j = [], 0
    for p, err in zip(paths, errors, strict=True):
        row: dict = {"path": p}
        idx: Sequence[int] = ()
        if err is None:
            pr, idx = probs[j], order[j]
            j += 1
        for n in range(top_k):  # past the class count (or on error) the cells are empty
            found = n < len(idx)
            row[f"label_{n + 1}"] = class_names[idx[n]] if found else None
            row[f"prob_{n + 1}"] = float(pr[idx[n]]) if found else None
        row["error"] = err
        rows.append(row)
    return rows


def _plan(it: Iterator[str], batch_size: int, chunk: int, first: Decoded | None) -> Iterator[tuple[object, bool]]:
    """The decode tasks: (paths or the already decoded ``first``, last piece of its batch?). Batches are
    the same ``batch_size`` runs of paths as without ``first`` (the model sees the same batches)."""
    n0 = len(first.paths) if first is not None else 0
    lead = True
    while True:
        want = batch_size - n0 if lead else batch_size
        batch = list(islice(it, want)) if want > 0 else []
        pieces: list[object] = [batch[i:i + chunk] for i in range(0, len(batch), chunk)]
        if lead and first is not None and first.paths:
            pieces.insert(0, first)
        lead = False
        if not pieces:
            return
        for j, piece in enumerate(pieces):
            yield piece, j == len(pieces) - 1


def predict_rows(paths: Iterable[str], model: BatchModel, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH,
                 workers: int | None = None, fast_jpeg: bool = False, executor: str = "thread",
                 skip: Callable[[str], bool] | None = None, first: Decoded | None = None,
                 steal: bool | None = None) -> Iterator[list[dict]]:
    """Stream ``paths`` through ``model``; yield the rows of each batch, in input order.

    Decoding runs on ``workers`` threads (or processes) while the model infers the previous batch; a file
    that cannot be read is a row with its ``error`` set. ``skip(path)`` true: the path is left out
    (resume). ``first``: files already decoded (``plan_split``'s head), which come before ``paths`` (and
    are not skipped again). ``steal`` (default: when the workers are fewer than the usable CPUs): decode
    tasks are ``DECODE_CHUNK`` files and the model's thread decodes those of its next batch that no
    worker has started instead of waiting for them; otherwise a task is a batch (with as many workers as
    CPUs, a third decoding thread measured 2-4% slower: it only competes for the cores).
    """
    if top_k < 1:
        raise InvalidInputError(f"top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be >= 1, got {batch_size}")
    if first is not None and len(first.paths) > batch_size:
        raise InvalidInputError(f"{len(first.paths)} files decoded ahead, more than one batch ({batch_size})")
    workers = workers or default_workers()
    it = iter(paths) if skip is None else (p for p in paths if not skip(p))
    names, size = list(model.class_names), int(model.input_size)
    if steal is None:
        steal = workers < default_workers()
    chunk = max(1, min(batch_size, DECODE_CHUNK)) if steal else batch_size
    plan = _plan(it, batch_size, chunk, first)
    pool = _executor(executor, workers)
    pending: deque = deque()

    def submit() -> None:
        item = next(plan, None)
        if item is None:
            return
        piece, last = item
        if isinstance(piece, Decoded):
            fut: Future = Future()
            fut.set_result((piece.pixels, piece.errors))
            pending.append((piece.paths, fut, last))
        else:
            pending.append((piece, pool.submit(decode_many, piece, size, fast_jpeg), last))

    try:
        for _ in range((workers + 1) * -(-batch_size // chunk)):  # workers + 1 batches ahead, as before
            submit()
        while pending:
            parts = []
            while True:
                piece_paths, fut, last = pending.popleft()
                submit()
                parts.append((piece_paths, fut))
                if last or not pending:
                    break
            # the model's thread never waits idle on a file nobody started: it decodes that piece itself
            results = [decode_many(ps, size, fast_jpeg) if steal and fut.cancel() else None for ps, fut in parts]
            results = [r if r is not None else fut.result() for r, (_, fut) in zip(results, parts, strict=True)]
            chunk_paths = [p for ps, _ in parts for p in ps]
            pixels = results[0][0] if len(results) == 1 else np.concatenate([r[0] for r in results])
            errors = [e for r in results for e in r[1]]
            ok = [i for i, e in enumerate(errors) if e is None]
            batch = pixels if len(ok) == len(errors) else pixels[ok]  # no copy when every file decoded
            probs = model.probabilities_from_pixels(batch) if ok else None
            yield make_rows(chunk_paths, errors, probs, names, top_k)
    finally:
        for _, fut, _ in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """One self-rewriting line on a terminal: done/total, images/s, ETA, failures."""

    def __init__(self, total: int | None, stream=None, enabled: bool | None = None, every: float = 0.25):
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.every, self.start, self.last = every, time.perf_counter(), 0.0
        self.done = self.failed = 0

    def update(self, rows: Sequence[dict]) -> None:
        self.done += len(rows)
        self.failed += sum(1 for r in rows if r["error"] is not None)
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._draw(now)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            left = max(self.total - self.done, 0) / rate if rate > 0 else 0
            head = f"{self.done:,}/{self.total:,} {100 * self.done / max(self.total, 1):3.0f}%"
            tail = f" ETA {int(left // 60)}:{int(left % 60):02d}"
        else:
            head, tail = f"{self.done:,}", ""
        failed = f" {self.failed:,} failed" if self.failed else ""
        self.stream.write(f"\r{head} {rate:,.0f} img/s{tail}{failed}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
