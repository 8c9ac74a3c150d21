"""Optional-dependency checks that never import torch and never raise."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from pathlib import Path


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ort_distributions() -> list[str]:
    """Every installed distribution that provides the ``onnxruntime`` module."""
    names = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
             "onnxruntime-training")
    found = [n for n in names if dist_version(n) is not None]
    return [n for n in found if _provides_imported_ort(n)] if len(found) > 1 else found


def _provides_imported_ort(dist: str) -> bool:
    """Whether ``dist`` owns the onnxruntime package Python imports (a build installed with
    ``pip --target`` on PYTHONPATH shadows, rather than overwrites, one in site-packages)."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
        mine = md.distribution(dist).locate_file("onnxruntime/__init__.py")
        return spec is None or spec.origin is None or Path(str(mine)).resolve() == Path(spec.origin).resolve()
    except Exception:  # noqa: BLE001 - when unsure, count it (the conflict check errs on the safe side)
        return True


def ort_conflict() -> str | None:
    """A message when several ONNX Runtime builds are installed over each other, else None."""
    dists = ort_distributions()
    if len(dists) > 1:
        return (
            f"{' and '.join(dists)} are both installed and overwrite each other's files "
            f"(the CUDA provider silently disappears): pip uninstall -y {' '.join(dists)} && "
            f"pip install {'onnxruntime-gpu' if 'onnxruntime-gpu' in dists else dists[0]}"
        )
    return None
