"""Written files: usual permissions, symlinks written through, stale temps cleaned, OS errors as one line."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time

import pytest

from edgecnn import _io
from edgecnn._io import OutputError, atomic_path, remove_stale_temps, write_text_atomic


@pytest.fixture()
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_files_get_0666_minus_umask_and_replaced_files_keep_their_mode(tmp_path, umask022):
    new = tmp_path / "new.json"
    write_text_atomic(new, "{}")
    assert _mode(new) == 0o644
    os.umask(0o027)
    write_text_atomic(tmp_path / "other.json", "{}")
    assert _mode(tmp_path / "other.json") == 0o640
    kept = tmp_path / "kept.csv"
    kept.write_text("old")
    os.chmod(kept, 0o664)
    write_text_atomic(kept, "new")
    assert kept.read_text() == "new" and _mode(kept) == 0o664


def test_cli_outputs_are_readable_by_others(trained, tmp_path, umask022, run_cli):
    out = tmp_path / "m.onnx"
    r = run_cli("export", trained.pt, "-o", out, "--no-check")
    assert r.exit_code == 0, r.output
    assert _mode(out) == 0o644
    r = run_cli("runtimes", "--json", tmp_path / "rt.json")
    assert r.exit_code == 0 and _mode(tmp_path / "rt.json") == 0o644


def test_a_symlink_target_is_written_through(tmp_path, umask022):
    real = tmp_path / "store" / "model.json"
    real.parent.mkdir()
    real.write_text("old")
    os.chmod(real, 0o640)
    link = tmp_path / "model.json"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new" and _mode(real) == 0o640
    assert sorted(p.name for p in real.parent.iterdir()) == ["model.json"]  # the temp lived beside the target
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "store" / "future.json")
    write_text_atomic(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "store" / "future.json").read_text() == "made"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "model.onnx"
    dead = tmp_path / f".model.{_dead_pid()}-abc123.tmp.onnx"
    live = tmp_path / f".model.{os.getppid()}-def456.tmp.onnx"  # a writer that still runs
    old_style = tmp_path / ".model.k3j4h5.tmp.onnx"  # no pid: judged by age
    young_old_style = tmp_path / ".model.zz9y8x.tmp.onnx"
    other_target = tmp_path / f".other.{_dead_pid()}-abc.tmp.onnx"
    not_ours = tmp_path / ".model.onnx.swp"
    for p in (dead, live, old_style, young_old_style, other_target, not_ours):
        p.write_bytes(b"half")
    t = time.time() - _io.STALE_SECONDS - 60
    os.utime(old_style, (t, t))
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"model.onnx", live.name, young_old_style.name, other_target.name, not_ours.name}
    assert remove_stale_temps(tmp_path / "other.onnx") == [other_target]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_are_one_line_exit_2_and_leave_nothing(trained, tmp_path, monkeypatch, run_cli, err):
    out = tmp_path / "out"
    out.mkdir()
    real = os.replace

    def failing(src, dst, *a, **k):
        if os.path.dirname(os.fspath(dst)) == str(out):
            raise OSError(err, os.strerror(err), os.fspath(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    r = run_cli("export", trained.pt, "-o", out / "m.onnx", "--no-check")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgecnn: error:") and str(out / "m.onnx") in lines[0]
    assert errno.errorcode[err] in lines[0]
    assert list(out.iterdir()) == []


def test_read_only_folder_and_too_long_name(trained, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.geteuid() != 0:  # root writes through chmod: the os.replace fake above covers it there
            r = subprocess.run([sys.executable, "-m", "edgecnn", "export", str(trained.pt), "-o", str(ro / "m.onnx"),
                                "--no-check"], capture_output=True, text=True, timeout=300)
            assert r.returncode == 2 and "permission denied" in r.stderr and "Traceback" not in r.stderr
            assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)
    long = tmp_path / ("x" * 300 + ".json")
    with pytest.raises(OutputError, match="name too long"):
        write_text_atomic(long, "{}")
    assert list(tmp_path.iterdir()) == [ro]


def test_a_bundle_that_cannot_be_written_is_one_line(trained, tmp_path, monkeypatch, run_cli):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    r = run_cli("package", trained.onnx, "-o", tmp_path / "bundle")
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"edgecnn: error: {tmp_path / 'bundle'}: cannot write: permission denied (EACCES)"
    assert list(tmp_path.iterdir()) == []
