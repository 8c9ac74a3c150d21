"""Streaming bulk prediction: paths -> parallel decode -> batches -> model -> result rows. Torch-free.

`edgecnn predict`, `edgecnn predict --engine ray` and the bundle's predict.py (which gets a standalone
copy of this file, edgecnn_pipeline.py) all run this code; the result files are written by
``edgecnn.runtimes.tables``. Memory is bounded: paths are read lazily and at most ``workers + 1``
batches are decoded ahead of the model.

Measured on 2 shared cores (benchmarks/bulk_predict.py -> results/bulk_predict.md): decode threads and
decode processes came out within noise of each other, so threads are the default (no start-up, no
pickling, nothing to spawn from the bundle's predict.py); ``executor="process"`` is there. The model's
runtime is given one thread by the callers, as decoding, not inference, is the cost (a 640x480 JPEG takes
milliseconds to decode, the network a fraction of one).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np
from edgecnn.runtimes.preprocess import InvalidInputError, to_rgb_uint8

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
DEFAULT_BATCH = 64  # the runtime's throughput is flat from 32 up on this Net (bench), and 64 keeps latency low
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


def predict_rows(paths: Iterable[str], model: BatchModel, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH,
                 workers: int | None = None, fast_jpeg: bool = False, executor: str = "thread",
                 skip: Callable[[str], bool] | None = None) -> Iterator[list[dict]]:
    """Stream ``paths`` through ``model``; yield the rows of each batch, in input order.

    Decoding runs on ``workers`` threads (or processes) while the model infers the previous batch; a file
    that cannot be read is a row with its ``error`` set. ``skip(path)`` true: the path is left out (resume).
    """
    if top_k < 1:
        raise InvalidInputError(f"top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be >= 1, got {batch_size}")
    workers = workers or default_workers()
    it = iter(paths) if skip is None else (p for p in paths if not skip(p))
    names, size = list(model.class_names), int(model.input_size)
    pool = _executor(executor, workers)
    pending: deque = deque()

    def submit() -> None:
        chunk = list(islice(it, batch_size))
        if chunk:
            pending.append((chunk, pool.submit(decode_many, chunk, size, fast_jpeg)))

    try:
        for _ in range(workers + 1):
            submit()
        while pending:
            chunk, fut = pending.popleft()
            submit()
            pixels, errors = fut.result()
            ok = [i for i, e in enumerate(errors) if e is None]
            batch = pixels if len(ok) == len(errors) else pixels[ok]  # no copy when every file decoded
            probs = model.probabilities_from_pixels(batch) if ok else None
            yield make_rows(chunk, errors, probs, names, top_k)
    finally:
        for _, fut in pending:
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
