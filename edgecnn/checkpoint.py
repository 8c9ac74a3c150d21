"""model.pt: a dict of tensors and plain data, always read with torch.load(weights_only=True)."""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgecnn.runtimes.preprocess import DEFAULT_MEAN, DEFAULT_STD

from . import __version__
from ._io import atomic_path, sha256_file  # noqa: F401 - sha256_file re-exported
from .errors import InvalidModelError
from .model import INPUT_SIZE, Net, check_state_dict


@dataclass
class Checkpoint:
    state_dict: dict
    num_classes: int
    class_names: list[str]
    mean: list[float] = field(default_factory=lambda: list(DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(DEFAULT_STD))
    input_size: int = INPUT_SIZE
    summary: dict = field(default_factory=dict)
    sha256: str = ""
    bare: bool = False  # True when the file was a bare state_dict

    def build_model(self) -> Net:
        net = Net(self.num_classes)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()

    def onnx_metadata(self) -> dict[str, str]:
        meta = {
            "class_names": json.dumps(self.class_names),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "input_layout": "NCHW",
            "input_size": str(self.input_size),
            "edgecnn_version": __version__,
        }
        if self.sha256:
            meta["source_sha256"] = self.sha256
        return meta

    def to_dict(self) -> dict:
        return {
            "format": "edgecnn-checkpoint/1",
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "input_size": int(self.input_size),
            "summary": self.summary,
            "edgecnn_version": __version__,
        }


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt.to_dict(), tmp)
    ckpt.sha256 = sha256_file(path)
    return path


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "nn.Module" in msg or "torch.nn" in msg or "__main__" in msg or "GLOBAL" in msg:
            hint = (" It holds pickled Python objects (a full nn.Module or custom classes);"
                    " save net.state_dict() instead.")
        else:
            hint = " Save net.state_dict() instead."
        raise InvalidModelError(
            f"{path}: refused: not loadable with torch.load(weights_only=True), which edgecnn always uses.{hint}"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises anything on garbage (IndexError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"{path}: not a readable PyTorch checkpoint ({first[:160]})") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an edgecnn checkpoint or a bare Net state_dict; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: empty file")
    if path.suffix.lower() in (".onnx", ".xml", ".bin"):
        raise InvalidModelError(f"{path}: this is an exported model, not a PyTorch checkpoint (.pt)")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise InvalidModelError(f"{path}: expected a dict (checkpoint or state_dict), got {type(obj).__name__}")
    bare = "state_dict" not in obj
    sd = obj if bare else obj["state_dict"]
    if not isinstance(sd, dict):
        raise InvalidModelError(f"{path}: 'state_dict' is not a dict")
    try:
        num_classes = check_state_dict(sd)
    except ValueError as e:
        raise InvalidModelError(f"{path}: not a state_dict of edgecnn's Net: {e}") from None
    names = [f"class_{i}" for i in range(num_classes)] if bare else obj.get("class_names") or []
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidModelError(f"{path}: class_names must be a list of strings, got {str(names)[:60]}")
    if len(names) != num_classes:
        raise InvalidModelError(f"{path}: {len(names)} class names for {num_classes} outputs")
    ck = Checkpoint(state_dict=sd, num_classes=num_classes, class_names=[str(n) for n in names],
                    sha256=sha256_file(path), bare=bare)
    if not bare:
        ck.mean = _triple(path, "mean", obj.get("mean", DEFAULT_MEAN))
        ck.std = _triple(path, "std", obj.get("std", DEFAULT_STD), positive=True)
        size = obj.get("input_size", INPUT_SIZE)
        if isinstance(size, float) and size.is_integer():
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size != INPUT_SIZE:
            raise InvalidModelError(f"{path}: input_size {str(size)[:40]!r}: the Net takes {INPUT_SIZE}x{INPUT_SIZE} "
                                    "images (its classifier is sized for them)")
        ck.input_size = size
        summary = obj.get("summary") or {}
        if not isinstance(summary, dict):
            raise InvalidModelError(f"{path}: 'summary' must be a dict, got {type(summary).__name__}")
        ck.summary = dict(summary)
    return ck


def _triple(path: Path, key: str, value, positive: bool = False) -> list[float]:
    """Three finite numbers (std: > 0), or InvalidModelError naming the field and the value."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    vals = [float(v) for v in value] if ok else []
    if not ok or not all(math.isfinite(v) for v in vals) or (positive and min(vals) <= 0):
        need = "three finite numbers > 0" if positive else "three finite numbers"
        raise InvalidModelError(f"{path}: {key} must be {need}, got {str(value)[:60]}")
    return vals
