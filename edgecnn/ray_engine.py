"""`edgecnn predict --engine ray`: the bulk pipeline on Ray Data, locally or on a cluster. Torch-free.

The paths go into a dataset of one block per ``--batch-size`` paths (only the names: the files are read
by the workers, never by the driver). ``map_batches`` runs ``predict_batch`` on Ray's pool of worker
processes, one CPU each: a worker opens the model once through ``Classifier`` (one runtime thread, the
split the local engine gives each decode worker), keeps it for every later batch, decodes its batch with
the pipeline's own ``decode_many`` (the same preprocessing as the local engine) and returns the rows as
an Arrow table. The rows stream back to the driver, which only writes them, with the same table writers
as the local engine (so --resume and every format work alike). On a cluster, edgecnn must be installed
on every node and the model and image paths readable there (a shared file system).

Why tasks on the worker pool and not a Ray Data actor pool (``ActorPoolStrategy``), measured on 2 cores
with 300 photos: an actor pool is created and destroyed by every run, and each of its actors is a fresh
process importing Ray Data (2 s here) and opening the model, 2.5-3 s of every run even for a no-op
function, which made the engine 0.35x the local engine. Ray's task workers stay alive while the Ray
instance does, so a worker process keeps its imports and its model (the model once per worker, as an
actor would), and a later run starts in 0.2 s.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator

from .errors import MissingDependencyError, RuntimeUnavailableError


def check_available() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("ray", "ray", "--engine ray") from None


# ------------------------------------------------------------------------------------------ on a worker
_OPEN: tuple[tuple, object] | None = None  # (key, Classifier): the model this worker process holds


def _stamp(path: str) -> tuple:
    """What changes when the model file (or a bundle folder's files) changes: part of the cache key."""
    try:
        if os.path.isdir(path):
            out = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    st = os.stat(os.path.join(dirpath, name))
                    out.append((os.path.relpath(os.path.join(dirpath, name), path), st.st_mtime_ns, st.st_size))
            return tuple(out)
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return ()  # let Classifier say what is wrong


def _classifier(model: str, runtime: str | None, options: dict):
    """This worker's Classifier for (model, runtime, options): opened on first use, then kept."""
    global _OPEN
    from edgecnn.runtimes import Classifier

    key = (model, runtime, repr(sorted(options.items())), _stamp(model))
    if _OPEN is not None and _OPEN[0] == key:
        return _OPEN[1]
    if _OPEN is not None:  # one model per worker: the previous one is let go
        old, _OPEN = _OPEN[1], None
        old.close()
    clf = Classifier(model, runtime=runtime, **options)
    _OPEN = (key, clf)
    return clf


def predict_batch(batch, *, model: str, runtime: str | None, options: dict, top_k: int, fast_jpeg: bool, cwd: str):
    """One batch of paths (an Arrow table with a ``path`` column) -> its rows (an Arrow table)."""
    import pyarrow as pa

    from edgecnn.runtimes.pipeline import columns, decode_many, make_rows

    clf = _classifier(model, runtime, options)
    paths = batch.column("path").to_pylist()  # as the user named them: the rows' key
    # relative to the driver's working folder, which is not the worker's (join keeps an absolute path)
    files = [os.path.normpath(os.path.join(cwd, p)) for p in paths]
    pixels, errors = decode_many(files, clf.input_size, fast_jpeg)
    ok = [i for i, e in enumerate(errors) if e is None]
    probs = clf.probabilities_from_pixels(pixels if len(ok) == len(paths) else pixels[ok]) if ok else None
    rows = make_rows(paths, errors, probs, clf.class_names, top_k)
    cols = columns(top_k)
    schema = pa.schema([(c, pa.float64() if c.startswith("prob_") else pa.string()) for c in cols])
    return pa.Table.from_pylist(rows, schema=schema)  # None stays null: no NaN or "None" to undo


# ------------------------------------------------------------------------------------------ on the driver
_SETTINGS = ("enable_progress_bars", "print_on_execution_start", "op_resource_reservation_enabled")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) where nothing answers is one error line within ``timeout`` seconds:
    ``ray.init`` itself retries such an address for ever, printing a warning every few seconds."""
    import socket

    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        if address == "auto" or "://" in address:
            return  # Ray finds the running instance ("auto"), or another scheme: left to Ray
        raise RuntimeUnavailableError(f"cannot reach Ray at {address}: give HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise RuntimeUnavailableError(f"cannot reach Ray at {address}: {why} (is `ray start --head` running "
                                      "there?)") from None


def _quiet() -> None:
    """Ray's INFO lines, and its start-up WARNING about token authentication (a local instance edgecnn starts
    and stops itself), would bury edgecnn's own summary: a successful run prints edgecnn's lines only. After
    ``import ray.data``, which sets up its own logging."""
    import ray.data  # noqa: F401

    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def start_local(num_cpus: int | None = None) -> None:
    """Start the local Ray instance the engine runs on without --address (``ray.init``; a benchmark may
    call it first to time Ray's start-up apart). ``num_cpus``: default one per usable core."""
    import ray

    from edgecnn.runtimes.pipeline import default_workers

    _quiet()
    # Ray runs its workers at nice 15 by default: behind any other work on the machine, where the local
    # engine's threads run at the user's own priority; the same CPUs means the same priority
    ray.init(num_cpus=num_cpus or default_workers(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _system_config={"worker_niceness": 0})


def _connect(opts) -> bool:
    """Join ``opts.ray_address`` or start a local instance, unless one is running; True when this call did."""
    import ray

    if ray.is_initialized():
        return False
    if opts.ray_address:
        _check_reachable(opts.ray_address)
    try:
        if opts.ray_address:
            ray.init(address=opts.ray_address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        else:
            start_local(opts.workers)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = opts.ray_address or "a local instance"
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise RuntimeUnavailableError(f"cannot start or reach Ray at {where}: {first}") from None
    return True


def _reason(e: BaseException) -> str:
    """The user's exception line out of a RayTaskError's text (which holds both tracebacks), else its first line."""
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", ln)
        if m and not m.group(1).startswith("ray."):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    return lines[0] if lines else type(e).__name__


def predict_rows(paths: list[str], model: str, opts, runtime_options: dict,
                 on_overhead: Callable[[float], None] | None = None) -> Iterator[list[dict]]:
    """Rows for ``paths`` computed on Ray (an existing instance, ``opts.ray_address``, or a new local one).
    ``on_overhead(seconds)`` is called with the time spent joining or starting Ray, and again with the
    time its shutdown took when this call started the instance (a caller keeps both out of its rate)."""
    if not paths:
        return
    import ray
    import ray.data

    _quiet()
    t = time.perf_counter()
    started = _connect(opts)
    if on_overhead is not None:
        on_overhead(time.perf_counter() - t)
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in _SETTINGS}
    saved_order = ctx.execution_options.preserve_order
    try:
        ctx.execution_options.preserve_order = True  # rows in input order, like the local engine
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Ray Data reserves part of the CPUs for each operator by default: the one map operator here then
        # ran 1.1-1.2 tasks at a time on 2 CPUs (a CPU-spinning no-op, measured), 1.8 without reservation
        ctx.op_resource_reservation_enabled = False
        # one block per batch, and a block is one task's batch (batch_size=None: with a batch size, Ray Data
        # bundles blocks up to it, 2 blocks of 60 rows for a batch of 64: fewer, uneven tasks and an idle CPU)
        ds = ray.data.from_items([{"path": p} for p in paths],
                                 override_num_blocks=max(1, -(-len(paths) // opts.batch_size)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = ds.map_batches(
                predict_batch, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                num_cpus=1,  # one task per CPU; decode and the runtime's one thread run in it
                max_retries=2,  # a worker that dies (killed, out of memory) is retried twice, then the run fails
                fn_kwargs={"model": os.path.abspath(model), "runtime": opts.runtime, "options": runtime_options,
                           "top_k": opts.top_k, "fast_jpeg": opts.fast_jpeg, "cwd": os.getcwd()})
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                yield table.to_pylist()
        except ray.exceptions.RayError as e:  # e.g. the model is not at that path on a worker node
            raise RuntimeUnavailableError(f"the run on Ray failed: {_reason(e)}") from None
    finally:
        for k, v in saved.items():  # the caller's Ray Data settings as they were
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = saved_order
        if started:
            t = time.perf_counter()
            ray.shutdown()
            if on_overhead is not None:
                on_overhead(time.perf_counter() - t)
