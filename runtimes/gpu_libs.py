"""Which NVIDIA libraries the installed onnxruntime-gpu needs, and whether they are on this machine,
found on disk without loading any of them (so listing runtimes never pulls CUDA into the process)."""

from __future__ import annotations

import functools
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

from ._deps import dist_version

# onnxruntime-gpu versions edgecnn supports: 1.19 and later are built against CUDA 12 (or 13), cuDNN 9
# and TensorRT 10 (ORT's CUDA/TensorRT provider requirement tables); 1.18 wheels were cuDNN 8 builds.
SUPPORTED_ORT_GPU = (1, 19)
# Used only when the provider libraries cannot be read (e.g. a Windows build): what >= 1.19 needs.
FALLBACK_MAJORS = {"cudnn": "9", "tensorrt": "10"}
_SONAME = re.compile(r"^lib(cudart|cudnn|nvinfer)\.so\.(\d+)$")
_KIND = {"cudart": "cuda", "cudnn": "cudnn", "nvinfer": "tensorrt"}


def needed_sonames(path: str | os.PathLike) -> list[str]:
    """The DT_NEEDED entries of an ELF64 shared library (what it loads), read from the file. [] if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # ELF64, little endian
                return []
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
            for sh in sections:
                if sh[1] != 6:  # SHT_DYNAMIC
                    continue
                f.seek(sh[4])
                dyn = f.read(sh[5])
                strtab = sections[sh[6]]
                f.seek(strtab[4])
                strs = f.read(strtab[5])
                out = []
                for i in range(0, len(dyn) - 15, 16):
                    tag, val = struct.unpack_from("<qQ", dyn, i)
                    if tag == 0:
                        break
                    if tag == 1:  # DT_NEEDED
                        out.append(strs[val:strs.index(b"\0", val)].decode())
                return out
    except (OSError, struct.error, ValueError, IndexError):
        return []
    return []


def _ort_version_tuple(version: str | None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def required_majors(ort) -> dict[str, str]:
    """{"cuda": "12", "cudnn": "9", "tensorrt": "10"}: read from the installed provider libraries'
    DT_NEEDED entries; the CUDA major also from ORT's build info; FALLBACK_MAJORS where unreadable."""
    capi = Path(getattr(ort, "__file__", "") or ".").parent / "capi"
    out: dict[str, str] = {}
    for lib in ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"):
        for name in needed_sonames(capi / lib):
            m = _SONAME.match(name)
            if m:
                out.setdefault(_KIND[m.group(1)], m.group(2))
    cuda = str(getattr(ort, "cuda_version", "") or "")
    if not cuda:
        try:
            from onnxruntime.capi import build_and_package_info as info

            cuda = str(getattr(info, "cuda_version", "") or "")
        except Exception:  # noqa: BLE001 - older builds do not say
            cuda = ""
    if cuda and "cuda" not in out:
        out["cuda"] = cuda.split(".")[0]
    for k, v in FALLBACK_MAJORS.items():
        out.setdefault(k, v)
    return out


def unsupported_version() -> str | None:
    """A message when the installed onnxruntime-gpu is older than edgecnn supports, else None."""
    v = dist_version("onnxruntime-gpu")
    if v is not None and _ort_version_tuple(v) < SUPPORTED_ORT_GPU:
        need = ".".join(map(str, SUPPORTED_ORT_GPU))
        return (f"onnxruntime-gpu {v} is not supported (edgecnn supports >= {need}: CUDA 12/13, cuDNN 9, "
                f"TensorRT 10): pip install -U 'onnxruntime-gpu>={need}'")
    return None


@functools.lru_cache(maxsize=1)
def _ldconfig_names() -> frozenset[str]:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.split()[0] for line in out.splitlines()[1:] if line.strip())


def _search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    for entry in sys.path:  # the nvidia-* and tensorrt pip wheels
        base = Path(entry or ".")
        dirs += sorted(base.glob("nvidia/*/lib")) + [base / "tensorrt_libs"]
    dirs += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                               "/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib",
                               "/usr/lib/wsl/lib", "/usr/local/lib")]
    return dirs


def find_library(soname: str) -> str | None:
    """Where ``soname`` would be found (LD_LIBRARY_PATH, the nvidia-* wheels, system folders, the ldconfig
    cache), without loading it. None if nowhere."""
    for d in _search_dirs():
        try:
            if (d / soname).exists():
                return str(d / soname)
        except OSError:
            continue
    return soname if soname in _ldconfig_names() else None


def missing(ort, tensorrt: bool = False) -> str | None:
    """Why the CUDA (and TensorRT) provider cannot run here, or None; loads nothing."""
    too_old = unsupported_version()
    if too_old:
        return too_old
    if sys.platform == "win32":  # DLL search differs; session creation checks and names what is missing
        return None
    if find_library("libcuda.so.1") is None:
        return "no NVIDIA driver here (libcuda.so.1 not found): no usable GPU"
    need = required_majors(ort)
    cuda = need.get("cuda")
    cudas = [cuda] if cuda else ["13", "12"]
    if not any(find_library(f"libcudart.so.{m}") for m in cudas):
        return (f"CUDA runtime library not found (libcudart.so.{'/'.join(cudas)}, which this onnxruntime-gpu "
                f"needs): pip install nvidia-cuda-runtime-cu{cudas[0]}")
    if find_library(f"libcudnn.so.{need['cudnn']}") is None:
        return (f"cuDNN {need['cudnn']} library not found (libcudnn.so.{need['cudnn']}, which this onnxruntime-gpu "
                f"needs): pip install nvidia-cudnn-cu{cudas[0]}")
    if tensorrt and find_library(f"libnvinfer.so.{need['tensorrt']}") is None:
        return (f"TensorRT {need['tensorrt']} library not found (libnvinfer.so.{need['tensorrt']}, which this "
                f"onnxruntime-gpu needs): pip install 'tensorrt=={need['tensorrt']}.*'")
    return None
