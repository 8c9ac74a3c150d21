"""Deployment configs (deploy.json, written by `edgecnn tune`): which file, runtime and settings to use."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgecnn.errors import InvalidInputError

FORMAT = "edgecnn-deploy/1"


def load_config(path: str | os.PathLike) -> tuple[Path, str, dict]:
    """deploy.json -> (model path, runtime name, load options: precision, threads, backend options)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a readable deploy config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("model"), str):
        raise InvalidInputError(f"{path}: not an edgecnn deploy config (format {FORMAT})")
    model = (path.parent / cfg["model"]).resolve()
    if path.parent.resolve() not in model.parents:
        raise InvalidInputError(f"{path}: the model path leaves the config's folder; refused")
    threads = cfg.get("threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
        # Tuned on another machine, perhaps: never more threads than the CPUs this process may use here.
        from .cpu import usable_cpus

        threads = min(threads, usable_cpus())
    opts = {"precision": cfg.get("precision", "fp32"), "threads": threads, **(cfg.get("options") or {})}
    return model, str(cfg.get("runtime", "ort-cpu")), opts
