"""`edgecnn predict --address`: joins a Ray cluster that the test starts (`ray start --head` on 127.0.0.1,
its own temp folder and token) and stops (only the processes it started), through the real CLI in a child."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - the ray extra is installed by CI: a broken install fails the module
from edgecnn.runtimes.tables import iter_table
from PIL import Image
from test_bulk_predict import assert_same_rows

from edgecnn.data import synthetic_dataset

RAY = Path(sys.executable).with_name("ray")  # the CLI of the ray installed beside this Python
TOP_K = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process this user can see (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (parent, cmd)
    return out


def _cluster_processes(marker: str) -> set[int]:
    """The cluster's processes: those naming its temp folder (GCS, raylet, monitors) and their descendants
    (the workers and agents, renamed ray::...). Nothing of another Ray instance on the machine."""
    procs = _processes()
    mine = {p for p, (_, cmd) in procs.items() if marker in cmd and p != os.getpid()}
    while True:
        more = {p for p, (parent, _) in procs.items() if parent in mine} - mine
        if not more:
            return mine
        mine |= more


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has exited
                    alive.add(p)
        except OSError:
            pass
    return alive


def _stop(marker: str) -> set[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after 5 s; returns any still alive."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _alive(_cluster_processes(marker))
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _alive(_cluster_processes(marker))


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster: `ray start --head` on 127.0.0.1 with 2 CPUs, token authentication (a token
    of its own, given to the CLI as a user would), a short temp folder (Ray's socket paths have a length
    limit); stopped afterwards, and no process of it left behind. Yields (address, env, temp folder)."""
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    try:
        r = subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                            f"--temp-dir={temp}"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        yield f"127.0.0.1:{port}", env, Path(temp)
    finally:
        left = _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left running: {sorted(left)}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """JPEGs and PNGs in nested folders plus one text file named .jpg (the bad file)."""
    root = tmp_path_factory.mktemp("cluster") / "imgs"
    for i, img in enumerate(synthetic_dataset(per_class=2, seed=11).images):
        sub = root / ("" if i % 3 else "sub")
        sub.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img).resize((80 + i, 64))
        im.save(sub / f"im_{i:02d}.png") if i % 4 == 1 else im.save(sub / f"im_{i:02d}.jpg", quality=80)
    bad = root / "sub" / "not_an_image.jpg"
    bad.write_text("text, not a JPEG\n")
    return root, bad


def _rows(path: Path) -> list[dict]:
    rows = list(iter_table(str(path)))
    for r in rows:  # CSV cells are strings
        for k, v in r.items():
            r[k] = None if v == "" else float(v) if k.startswith("prob_") else v
    return rows


def _only_edgecnns_lines(r: subprocess.CompletedProcess) -> None:
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines and all(ln.startswith("edgecnn:") for ln in lines), r.stdout + r.stderr
    for noise in ("INFO", "WARNING", "core_worker", "oken", "Traceback"):
        assert noise not in r.stdout + r.stderr, r.stdout + r.stderr


def test_address_joins_the_cluster_and_writes_the_local_engines_rows(cluster, images, trained, run_cli, tmp_path):
    address, env, temp = cluster
    root, bad = images
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", local, "--top-k", TOP_K)
    assert r.exit_code == 1, r.output  # 1: one file could not be read
    drivers = set(temp.glob("session_*/logs/python-core-driver-*"))
    r = subprocess.run([sys.executable, "-m", "edgecnn", "predict", str(trained.onnx_dynamic), str(root),
                        "--address", address, "--top-k", str(TOP_K), "--batch-size", "4", "-o", str(remote)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    _only_edgecnns_lines(r)
    assert set(temp.glob("session_*/logs/python-core-driver-*")) - drivers  # it ran as a job of that cluster
    a, b = _rows(local), _rows(remote)
    assert_same_rows(a, b, TOP_K, rtol=1e-3, atol=1e-6)
    (row,) = [y for y in b if y["path"] == str(bad)]
    assert "not an image file" in row["error"] and row["label_1"] is None and row["prob_1"] is None
    assert sum(y["error"] is not None for y in b) == 1
    json.dumps(b)

    # only good files: exit 0, the rows on stdout (no -o), and still nothing but edgecnn's own lines
    good = [str(p) for p in sorted(root.rglob("*.png"))]
    r = subprocess.run([sys.executable, "-m", "edgecnn", "predict", str(trained.onnx_dynamic), *good,
                        "--engine", "ray", "--ray-address", address, "--progress"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert [ln.split(": ")[0] for ln in out] == good
    want = {x["path"]: x["label_1"] for x in a}
    assert all(ln.split(": ", 1)[1].split(" ")[0] == want[p] for ln, p in zip(out, good, strict=True))
    err = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert err and err[-1].startswith("edgecnn: ") and "0 failed" in err[-1]
    assert not any(n in r.stderr for n in ("INFO", "WARNING", "core_worker", "oken", "Traceback")), r.stderr


def test_an_unreachable_address_is_one_line_and_a_prompt_exit(trained, images, tmp_path):
    root, _ = images
    port = _free_port()  # nothing listens there
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgecnn", "predict", str(trained.onnx_dynamic), str(root),
                        "--address", f"127.0.0.1:{port}", "-o", str(tmp_path / "o.csv")],
                       capture_output=True, text=True, timeout=90)
    assert time.monotonic() - t < 60
    assert r.returncode == 3, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"edgecnn: error: cannot reach Ray at 127.0.0.1:{port}")
    assert "Traceback" not in r.stderr and not r.stdout


def test_address_with_the_local_engine_is_a_usage_error(trained, images, run_cli):
    root, _ = images
    r = run_cli("predict", trained.onnx_dynamic, root, "--engine", "local", "--address", "127.0.0.1:1")
    assert r.exit_code == 2 and "--address" in r.stderr and r.stderr.count("\n") == 1
