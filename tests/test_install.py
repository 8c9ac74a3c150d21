"""The README's device install line, as typed from a clone, into a fresh venv; then the imports work from the
clone's root (where ./edgecnn/ shadows the installed package) and from any other folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = ("import edgecnn, edgecnn.runtimes, edgecnn.exporters; from edgecnn.runtimes import Classifier, "
           "load_runtime; print(edgecnn.__file__)")


def _clone(dst: Path) -> None:
    """The files a clone has (tracked or not ignored), without this checkout's venv and build outputs."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                       capture_output=True, timeout=60)
    if r.returncode == 0 and r.stdout:
        for name in r.stdout.decode().split("\0"):
            if name and (REPO / name).is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, dst / name)
    else:  # not a git checkout (an sdist): the top-level layout
        for name in ("pyproject.toml", "README.md", "edgecnn", "exporters", "runtimes"):
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / name)


def _new_setuptools() -> bool:
    try:
        from importlib.metadata import version

        return tuple(int(x) for x in re.findall(r"\d+", version("setuptools"))[:2]) >= (70, 1)
    except Exception:  # noqa: BLE001 - absent or odd: build in isolation instead
        return False


def test_readme_device_line_installs_and_imports_from_the_clone_root(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert 'pip install ".[device]"' in readme and 'pip install "edgecnn[device]"' not in readme
    clone = tmp_path / "clone"
    clone.mkdir()
    _clone(clone)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (numpy, Pillow, onnxruntime, click) come from this environment: a path line, so its
    # .pth files (the editable install's import hook) are not run in the new venv.
    Path(site, "host-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", ".[device]"]
    if _new_setuptools():
        cmd.insert(-1, "--no-build-isolation")  # no download of the build backend: faster
    r = subprocess.run(cmd, cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(clone / "build", ignore_errors=True)

    r = subprocess.run([str(py), "-c", IMPORTS], cwd=clone, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # from the clone's root: ./edgecnn/ is imported first
    assert Path(r.stdout.strip()).resolve() == (clone / "edgecnn" / "__init__.py").resolve()
    r = subprocess.run([str(py), "-c", IMPORTS], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve().is_relative_to(venv.resolve())  # elsewhere: the installed one
