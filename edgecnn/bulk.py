"""`edgecnn predict`: classify many files into a results table, on this machine or on Ray. Torch-free.

The command parses options and prints; this module opens the model and the output table, picks the
engine (``edgecnn.runtimes.pipeline`` locally, ``edgecnn.ray_engine`` on Ray) and counts what happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .errors import InvalidInputError

ENGINES = ("local", "ray")


@dataclass
class BulkOptions:
    top_k: int = 1
    runtime: str | None = None  # None: what the model names (a deploy.json's or bundle's runtime, else ort-cpu)
    options: dict = field(default_factory=dict)  # runtime options (-O); threads default to 1, see below
    batch_size: int = 64
    workers: int | None = None
    executor: str = "thread"  # decode on threads (measured faster here) or "process"
    fast_jpeg: bool = False
    engine: str = "local"
    ray_address: str | None = None
    resume: bool = False
    force: bool = False
    progress: bool | None = None  # None: when stderr is a terminal


@dataclass
class BulkSummary:
    total: int = 0  # paths named by the inputs
    done: int = 0  # rows written by this run
    failed: int = 0  # of them, rows with an error
    skipped: int = 0  # already in the output (--resume)
    seconds: float = 0.0  # the run's time, Ray's start-up and shutdown excluded
    ray_overhead_seconds: float = 0.0  # joining or starting Ray, and shutting down the instance it started
    failures: list[str] = field(default_factory=list)  # the first few "path: reason"
    split: dict = field(default_factory=dict)  # decode workers and runtime threads used, and why (Split.as_dict)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def runtime_options(opts: BulkOptions, tuned_threads: bool = False) -> dict:
    """A plain model file's runtime gets one thread unless -O threads=N says otherwise: decoding is the
    cost, and the decode workers need the cores (measured in benchmarks/bulk_predict.py). A deploy.json or
    bundle that records a thread count (``tuned_threads``) runs with it, as it runs everywhere else."""
    return dict(opts.options) if tuned_threads else {"threads": 1, **opts.options}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: the output is closed (Parquet written) with the rows done so far."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(model: str | os.PathLike, inputs: Sequence[str], output: str | None, opts: BulkOptions,
        echo: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None) -> BulkSummary:
    """Classify every path named by ``inputs``; rows go to ``output`` (a table) or, without it, to ``echo``."""
    from edgecnn.runtimes import Classifier
    from edgecnn.runtimes.pipeline import Progress, columns, count_paths, iter_paths, plan_split
    from edgecnn.runtimes.tables import open_table

    if opts.engine not in ENGINES:
        raise InvalidInputError(f"unknown engine {opts.engine!r}; use one of {', '.join(ENGINES)}")
    if opts.top_k < 1 or opts.batch_size < 1 or (opts.workers is not None and opts.workers < 1):
        raise InvalidInputError("--top-k, --batch-size and --workers must be >= 1")
    if not inputs:
        raise InvalidInputError("no images given")
    if opts.resume and not output:
        raise InvalidInputError("--resume needs -o FILE (the table to continue)")
    if opts.engine == "ray":
        from . import ray_engine

        ray_engine.check_available()
    total = count_paths(inputs)  # also refuses a glob that matches nothing, before any output exists
    if total == 0:
        raise InvalidInputError(f"no image files in {', '.join(map(str, inputs))}")
    summary = BulkSummary(total=total)
    from edgecnn.runtimes.deploy import resolve

    deployable = resolve(model)  # a bundle altered after packaging is refused here, before any output exists
    tuned = "threads" in deployable.configured and deployable.threads is not None
    say = log or (lambda s: None)
    with contextlib.ExitStack() as stack:
        rt_opts = runtime_options(opts, tuned)
        clf = stack.enter_context(Classifier(model, runtime=opts.runtime, **rt_opts))
        for note in clf.override_notes + ([clf.assumption_note] if clf.assumption_note else []):
            say(f"edgecnn: note: {note}")
        table = open_table(output, columns(opts.top_k), resume=opts.resume, force=opts.force) if output else None
        done = table.done if table is not None else None

        def _skip(path: str) -> bool:
            if path in done:
                summary.skipped += 1
                return True
            return False

        skip = _skip if done else None
        paths = iter_paths(inputs) if skip is None else (p for p in iter_paths(inputs) if not skip(p))
        progress = Progress(total - (len(done) if done else 0), enabled=opts.progress)
        start = time.perf_counter()  # the calibration below is part of the run's time
        try:
            with _sigterm_as_interrupt():
                if opts.engine == "ray":
                    from . import ray_engine

                    def overhead(seconds: float) -> None:
                        summary.ray_overhead_seconds += seconds

                    batches = ray_engine.predict_rows(list(paths), str(model), opts, runtime_options(opts, tuned),
                                                      on_overhead=overhead)
                else:
                    from edgecnn.runtimes.pipeline import predict_rows

                    # decode workers and runtime threads: what is given is kept, the rest measured and chosen
                    open_threads = int(clf.deployable.threads or 1)
                    given_threads = opts.options.get("threads") or (open_threads if tuned else None)
                    split = plan_split(paths, clf, workers=opts.workers, threads=given_threads,
                                       model_threads=open_threads, fast_jpeg=opts.fast_jpeg,
                                       batch_size=opts.batch_size, files_left=total - (len(done) if done else 0))
                    if split.threads != open_threads:  # opened on 1 thread to be measured: reopen on the choice
                        stack.pop_all().close()
                        more = {"threads": split.threads}
                        if split.threads > 1 and "spinning" not in opts.options and opts.runtime in (None, "ort-cpu") \
                                and clf.deployable.runtime == "ort-cpu":
                            more["spinning"] = False  # its threads share the cores with decoding: no busy-waiting
                        clf = stack.enter_context(Classifier(model, runtime=opts.runtime, **{**rt_opts, **more}))
                    if split.chosen and not split.reason:  # a run too small to measure keeps quiet
                        say(f"edgecnn: note: {split.note()}")
                    summary.split = split.as_dict()
                    batches = predict_rows(paths, clf, top_k=opts.top_k, batch_size=opts.batch_size,
                                           workers=split.workers, fast_jpeg=opts.fast_jpeg, first=split.head,
                                           executor=opts.executor)
                with contextlib.closing(batches):  # stops the decode workers whatever ends the loop
                    for rows in batches:
                        if table is not None:
                            table.write(rows)
                        else:
                            for r in rows:
                                echo(r)
                        progress.update(rows)
                        summary.failures += [f"{r['path']}: {r['error']}" for r in rows
                                             if r["error"] is not None][: max(0, 3 - len(summary.failures))]
        finally:
            summary.done, summary.failed = progress.done, progress.failed
            summary.seconds = max(0.0, time.perf_counter() - start - summary.ray_overhead_seconds)
            progress.close()
            if table is not None:
                table.close()
    return summary
