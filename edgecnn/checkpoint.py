"""model.pt: a dict of tensors and plain data, always read with torch.load(weights_only=True)."""

from __future__ import annotations

import json
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
    assumed: list[str] = field(default_factory=list)  # "labels" / "normalization" the file did not carry
    sources: dict = field(default_factory=dict)  # "labels"/"normalization" -> "command line" when given there

    def build_model(self) -> Net:
        net = Net(self.num_classes)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()

    def source_of(self, what: str) -> str:
        """Where the ``what`` ("labels" / "normalization") came from: checkpoint, command line or assumed."""
        return self.sources.get(what) or ("assumed" if what in self.assumed else "checkpoint")

    def onnx_metadata(self) -> dict[str, str]:
        meta = {
            "class_names": json.dumps(self.class_names),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            # where each came from, so the device can say when it runs on assumed labels / normalization
            "labels_source": self.source_of("labels"),
            "normalization_source": self.source_of("normalization"),
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


# What a non-checkpoint file starts with (a torch checkpoint is a zip, or a legacy pickle: 0x80).
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
          (b"%PDF", "a PDF document"), (b"\x08", "an ONNX model or other protobuf"))


def _sniff(path: Path) -> str | None:
    """None when the file may be a torch checkpoint; else what it looks like instead."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "neither a zip nor a pickle"


def _torch_load(path: Path):
    what = _sniff(path)
    if what is not None:
        raise InvalidModelError(f"{path}: not a PyTorch checkpoint (it is {what}); give the .pt file saved "
                                "with torch.save(net.state_dict(), path)")
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


# Where the common checkpoint shapes keep the weights: edgecnn's and the PyTorch tutorial's dicts, and
# the usual names people pick. A bare state_dict is a dict of tensors.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "model_state", "weights")
# Wrappers that prefix every key: DataParallel / DistributedDataParallel, torch.compile.
PREFIXES = ("module.", "_orig_mod.")


def _is_tensor_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def strip_prefixes(sd: dict) -> dict:
    """Remove DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, in any nesting."""
    out = {}
    for k, v in sd.items():
        key = str(k)
        while key.startswith(PREFIXES):
            key = key[len(next(p for p in PREFIXES if key.startswith(p))):]
        if key in out:
            raise InvalidModelError(f"two keys become {key!r} once the module./_orig_mod. prefixes are removed")
        out[key] = v
    return out


def _find_state_dict(obj: dict, path: Path) -> tuple[dict, str | None]:
    """(the Net's state_dict, the key it was under or None for a bare state_dict)."""
    if _is_tensor_dict(obj):
        return obj, None
    for key in STATE_DICT_KEYS:
        if key in obj:
            sd = obj[key]
            if not isinstance(sd, dict):
                raise InvalidModelError(f"{path}: {key!r} is a {type(sd).__name__}, not a state_dict")
            return sd, key
    from .labels import format_list

    raise InvalidModelError(f"{path}: no state_dict in this checkpoint: expected a dict of tensors or one of the "
                            f"keys {format_list(STATE_DICT_KEYS)}; its keys are {format_list(sorted(map(str, obj)))}")


def _names_from(obj: dict) -> list[str] | None:
    for key in ("class_names", "classes", "labels"):
        v = obj.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(n, str) for n in v):
            return list(v)
    c2i = obj.get("class_to_idx")
    if isinstance(c2i, dict) and c2i and sorted(c2i.values()) == list(range(len(c2i))):
        return [n for n, _ in sorted(c2i.items(), key=lambda kv: kv[1])]
    return None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint of the Net in any common shape; anything else is refused.

    Accepted: edgecnn's own, a bare state_dict, a dict holding it under ``state_dict``,
    ``model_state_dict`` (the PyTorch tutorial's), ``model``, ``net``, ...; keys prefixed by
    ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile). Class names (``class_names``,
    ``classes``, ``labels``, ``class_to_idx``) and ``mean``/``std`` beside the weights are used;
    what the file does not carry is listed in ``Checkpoint.assumed``.
    """
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
    sd, key = _find_state_dict(obj, path)
    sd = strip_prefixes(sd)
    try:
        num_classes = check_state_dict(sd)
    except ValueError as e:
        raise InvalidModelError(f"{path}: not a state_dict of edgecnn's Net: {e}") from None
    meta = obj if key is not None else {}
    if key == "state_dict" and "class_names" in meta:  # edgecnn's own format: class_names must be strings
        given = meta["class_names"]
        if not isinstance(given, (list, tuple)) or not all(isinstance(n, str) for n in given):
            raise InvalidModelError(f"{path}: class_names must be a list of strings, got {str(given)[:60]}")
    names = _names_from(meta)
    assumed = []
    if names is None:
        names = [f"class_{i}" for i in range(num_classes)]
        assumed.append("labels")
    if len(names) != num_classes:
        raise InvalidModelError(f"{path}: {len(names)} class names for {num_classes} outputs")
    ck = Checkpoint(state_dict=sd, num_classes=num_classes, class_names=[str(n) for n in names],
                    sha256=sha256_file(path), bare=key is None)
    if "mean" in meta or "std" in meta:
        ck.mean = _triple(path, "mean", meta.get("mean", DEFAULT_MEAN))
        ck.std = _triple(path, "std", meta.get("std", DEFAULT_STD), positive=True)
    else:
        assumed.append("normalization")
    size = meta.get("input_size", INPUT_SIZE)
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, int) or size != INPUT_SIZE:
        raise InvalidModelError(f"{path}: input_size {str(size)[:40]!r}: the Net takes {INPUT_SIZE}x{INPUT_SIZE} "
                                "images (its classifier is sized for them)")
    ck.input_size = size
    summary = meta.get("summary") or {}
    if key == "state_dict" and not isinstance(summary, dict):
        raise InvalidModelError(f"{path}: 'summary' must be a dict, got {type(summary).__name__}")
    ck.summary = dict(summary) if isinstance(summary, dict) else {}
    ck.assumed = assumed
    return ck


def _triple(path: Path, key: str, value, positive: bool = False) -> list[float]:
    """Three finite numbers on the 0..1 scale (std: > 0), or InvalidModelError naming the field and the value."""
    from edgecnn.runtimes.preprocess import check_norm

    return list(check_norm(value, f"{path}: {key}", positive, InvalidModelError))


def with_overrides(ck: Checkpoint, class_names: list[str] | None = None, mean: list[float] | None = None,
                   std: list[float] | None = None) -> Checkpoint:
    """The checkpoint with the class names / normalization the user gave (--labels, --mean, --std)."""
    from .errors import InvalidInputError
    from .labels import format_list

    if class_names is not None:
        if len(class_names) != ck.num_classes:
            raise InvalidInputError(f"--labels gives {len(class_names)} names ({format_list(class_names)}) but the "
                                    f"model has {ck.num_classes} outputs")
        ck.class_names = list(class_names)
        ck.assumed = [a for a in ck.assumed if a != "labels"]
        ck.sources["labels"] = "command line"
    if (mean is None) != (std is None) and "normalization" in ck.assumed:
        raise InvalidInputError("give --mean and --std together (the checkpoint carries neither)")
    if mean is not None:
        ck.mean = list(mean)
    if std is not None:
        ck.std = list(std)
    if mean is not None or std is not None:
        ck.assumed = [a for a in ck.assumed if a != "normalization"]
        ck.sources["normalization"] = "command line"
    return ck


def assumption_note(ck: Checkpoint) -> str | None:
    """One line saying which labels / normalization export assumed, and how to set them; None if none."""
    if not ck.assumed:
        return None
    from .labels import format_list

    parts = []
    if "labels" in ck.assumed:
        parts.append(f"labels {format_list(ck.class_names, 4)}")
    if "normalization" in ck.assumed:
        parts.append(f"mean {','.join(f'{v:g}' for v in ck.mean)} std {','.join(f'{v:g}' for v in ck.std)}")
    how = " ".join(opt for a, opt in (("labels", "--labels FILE|a,b,c|DIR"),
                                      ("normalization", "--mean R,G,B --std R,G,B")) if a in ck.assumed)
    return f"note: the checkpoint carries no {' or '.join(ck.assumed)}: assumed {'; '.join(parts)}; set them with {how}"
