"""Atomic file writes: temp file in the target's folder, fsync, rename. No half-written outputs.

What every written file gets (the README's "Writes are atomic"):
- permissions: those of the file it replaces, or 0666 minus the umask for a new file (as ``open``);
- a symlink as target is written through: the link's target (even a dangling one) is replaced
  atomically and the link stays, as editors and ``install`` do;
- temp files are named ``.<stem>.<pid>-<random>.tmp<suffix>``; one left by a killed writer (its pid
  no longer runs here, or a name without a pid that is older than ``STALE_SECONDS``) is removed on the
  next write to the same target;
- an OS error (no space, read-only file system, permission denied, name too long) is one
  ``OutputError`` naming the path and the condition, and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidInputError

STALE_SECONDS = 600  # a temp name without a pid (older edgecnn) is stale after this long


# The OS errors that mean "this output cannot be written here" (anything else is not the user's path).
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EDQUOT,
                errno.EFBIG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EXDEV}


class OutputError(InvalidInputError):
    """An output path cannot be written (exit code 2, like any bad output path)."""


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


def output_error(path: Path, e: OSError) -> OutputError:
    name = errno.errorcode.get(e.errno or 0, "")
    why = e.strerror or str(e)
    if e.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    elif e.errno == errno.ENOSPC:
        why = "no space left on device"
    elif e.errno == errno.EROFS:
        why = "read-only file system"
    elif e.errno == errno.ENAMETOOLONG:
        why = "file name too long"
    return OutputError(f"{path}: cannot write: {why}" + (f" ({name})" if name else ""))


def resolve_target(target: str | os.PathLike) -> Path:
    """The file a write to ``target`` replaces: ``target`` itself, or what its symlink(s) point at."""
    target = Path(target)
    if target.is_symlink():
        return Path(os.path.realpath(target))
    return target


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove edgecnn's own temp files for ``target`` left by a writer that is gone; return them."""
    folder = target.parent if str(target.parent) else Path(".")
    pat = re.compile(r"^\." + re.escape(target.stem) + r"\.(?:(\d+)-)?[A-Za-z0-9_]+\.tmp" + re.escape(target.suffix) + "$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for ent in entries:
        m = pat.match(ent.name)
        if not m:
            continue
        try:
            st = ent.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            stale = (not _pid_alive(int(m.group(1)))) if m.group(1) else now - st.st_mtime > STALE_SECONDS
            if stale and int(m.group(1) or 0) != os.getpid():
                os.unlink(ent.path)
                removed.append(Path(ent.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target``, on error it vanishes."""
    given = Path(target)
    tmp_path: Path | None = None
    try:
        target = resolve_target(given)
        if target.is_dir():
            raise InvalidInputError(f"{given}: is a directory; give a file path")
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            raise InvalidInputError(f"{folder}: output folder does not exist")
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = new_file_mode()
        remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.{os.getpid()}-", suffix=f".tmp{target.suffix}",
                                   dir=folder)
        tmp_path = Path(tmp)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:  # a writer that recreated the file
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise output_error(given, e) from None
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
