"""`edgecnn predict --engine ray`: the bulk pipeline on Ray Data, locally or on a cluster. Torch-free.

Paths go in with ``ray.data.from_items``; ``map_batches`` runs a callable class on an actor pool, so each
actor opens the model once through ``Classifier`` and decodes its batches with the pipeline's own
``decode_many`` (the same preprocessing as the local engine); the rows stream back to the driver, which
writes them with the same table writers as the local engine (so --resume and every format work alike).
On a cluster, edgecnn must be installed on every node and the model and image paths readable there
(a shared file system).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import MissingDependencyError, RuntimeUnavailableError


def check_available() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("ray", "ray", "--engine ray") from None


class RayPredictor:
    """One actor of the pool: loads the model once, then turns batches of paths into batches of rows."""

    def __init__(self, model: str, runtime: str, options: dict, top_k: int, fast_jpeg: bool):
        from edgecnn.runtimes import Classifier

        self.clf = Classifier(model, runtime=runtime, **options)
        self.top_k, self.fast_jpeg = top_k, fast_jpeg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from edgecnn.runtimes.pipeline import columns, decode_many, make_rows

        paths = [str(p) for p in batch["path"]]  # as the user named them: the rows' key
        pixels, errors = decode_many([str(f) for f in batch["file"]], self.clf.input_size, self.fast_jpeg)
        ok = [i for i, e in enumerate(errors) if e is None]
        probs = self.clf.probabilities_from_pixels(pixels[ok]) if ok else None
        rows = make_rows(paths, errors, probs, self.clf.class_names, self.top_k)
        out = {}
        for c in columns(self.top_k):
            if c.startswith("prob_"):
                out[c] = np.array([np.nan if r[c] is None else r[c] for r in rows], np.float64)
            else:
                out[c] = np.array([r[c] for r in rows], dtype=object)
        return out


def _rows(batch: dict[str, np.ndarray], cols: Sequence[str]) -> list[dict]:
    n = len(batch["path"])
    rows = []
    for i in range(n):
        row = {}
        for c in cols:
            v = batch[c][i]  # Arrow may hand an all-null string column back as float NaN
            missing = v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))
            row[c] = None if missing else float(v) if c.startswith("prob_") else str(v)
        rows.append(row)
    return rows


def predict_rows(paths: list[str], model: str, opts, runtime_options: dict) -> Iterator[list[dict]]:
    """Rows for ``paths`` computed on Ray (an existing instance, ``opts.ray_address``, or a new local one)."""
    import ray
    import ray.data

    from edgecnn.runtimes.pipeline import columns

    if not paths:
        return
    # Ray's INFO lines, and its start-up WARNING about token authentication (a local instance edgecnn starts
    # and stops itself), would bury edgecnn's own summary: a successful run prints edgecnn's lines only.
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if opts.ray_address:
                ray.init(address=opts.ray_address, **kwargs)
            else:
                ray.init(num_cpus=opts.workers or None, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = opts.ray_address or "a local instance"
            raise RuntimeUnavailableError(f"cannot start or reach Ray at {where}: {str(e).splitlines()[0]}") from None
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows in input order, like the local engine
        ctx.enable_progress_bars = False
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, min(cpus, -(-len(paths) // opts.batch_size)))
        model = os.path.abspath(model)
        # "file": absolute, since an actor's working folder is not the driver's
        ds = ray.data.from_items([{"path": p, "file": os.path.abspath(p)} for p in paths],
                                 override_num_blocks=max(1, min(len(paths) // opts.batch_size, 4 * actors)))
        with warnings.catch_warnings():  # max_restarts is only taken through the (deprecated) remote args
            warnings.simplefilter("ignore")
            ds = ds.map_batches(
                RayPredictor, batch_size=opts.batch_size, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors),
                batch_format="numpy",
                # no restarts: with restarts allowed, Ray logs an error-level core_worker line on every
                # successful run (the actors' constructor arguments sit in the object store); a failed actor
                # fails the run instead, and --resume continues the output table
                max_restarts=0,
                fn_constructor_kwargs={"model": model, "runtime": opts.runtime, "options": runtime_options,
                                       "top_k": opts.top_k, "fast_jpeg": opts.fast_jpeg})
        cols = columns(opts.top_k)
        for batch in ds.iter_batches(batch_size=opts.batch_size, batch_format="numpy"):
            yield _rows(batch, cols)
    finally:
        if started:
            ray.shutdown()
