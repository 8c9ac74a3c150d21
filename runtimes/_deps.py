"""Optional-dependency checks that never import torch and never raise."""

from __future__ import annotations

import ctypes
import importlib.metadata as md
import importlib.util
import os
import shutil
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


def nvidia_gpu_visible() -> tuple[bool, str]:
    """(an NVIDIA GPU looks present, what was looked at). Cheap: files and the driver library, no CUDA init."""
    try:
        gpus = Path("/proc/driver/nvidia/gpus")
        if gpus.is_dir() and any(gpus.iterdir()):
            return True, "/proc/driver/nvidia/gpus"
        if Path("/dev/dxg").exists():  # WSL2: the GPU is behind /dev/dxg and libcuda from /usr/lib/wsl
            return True, "/dev/dxg"
        if shutil.which("nvidia-smi"):
            return True, "nvidia-smi"
        for lib in (("nvcuda.dll",) if os.name == "nt" else ("libcuda.so.1", "libcuda.so")):
            try:
                ctypes.CDLL(lib)
                return True, lib
            except OSError:
                continue
    except Exception:  # noqa: BLE001 - never raises; when unsure, let the real checks speak
        return True, "unknown"
    return False, "no /proc/driver/nvidia/gpus, no nvidia-smi, no NVIDIA driver library (libcuda)"
