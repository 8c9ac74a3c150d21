"""Result tables of the bulk pipeline: .csv, .jsonl, .parquet, written row batch by row batch. Torch-free.

What survives an interruption (Ctrl-C, SIGTERM, kill -9, a power cut aside):
- .csv / .jsonl: each batch of rows is one ``os.write`` to a file opened for appending, so the file on
  disk always ends at a complete row (a torn last row, if ever, is cut off by ``--resume``).
- .parquet: a Parquet file is only readable once its footer is written, so rows are spooled to a hidden
  JSONL file beside the target (``.NAME.partial.jsonl``) and the Parquet file is written from it at the
  end, in row groups, to a temp file renamed into place. Ctrl-C and SIGTERM finish that step with the
  rows done so far; after kill -9 the target keeps its previous content and ``--resume`` picks up
  the spool.
``resume=True`` reads the paths already in the file (as 64-bit hashes: 8 bytes a row) so the run skips them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from array import array
from collections.abc import Iterator, Sequence

import numpy as np
from edgecnn.runtimes.preprocess import InvalidInputError

from edgecnn.errors import MissingDependencyError

FORMATS = (".csv", ".jsonl", ".parquet")
_ENC = ("utf-8", "surrogateescape")  # paths are bytes on POSIX; keep undecodable ones round-trippable


class PathSet:
    """Paths seen, as sorted 64-bit blake2b hashes (8 bytes each, collision odds ~1e-8 at a million paths)."""

    def __init__(self) -> None:
        self._buf, self._sorted = array("Q"), np.zeros(0, np.uint64)

    @staticmethod
    def _hash(path: str) -> int:
        return int.from_bytes(hashlib.blake2b(path.encode(*_ENC), digest_size=8).digest(), "little")

    def add(self, path: str) -> None:
        self._buf.append(self._hash(path))

    def freeze(self) -> PathSet:
        self._sorted = np.unique(np.frombuffer(self._buf, np.uint64)) if len(self._buf) else self._sorted
        self._buf = array("Q")
        return self

    def __contains__(self, path: str) -> bool:
        h = np.uint64(self._hash(path))
        i = int(np.searchsorted(self._sorted, h))
        return i < len(self._sorted) and self._sorted[i] == h

    def __len__(self) -> int:
        return len(self._sorted)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _lines(f) -> Iterator[tuple[bytes, int]]:
    """(line, offset after it) for each line of a binary file."""
    pos = 0
    for line in f:
        pos += len(line)
        yield line, pos


class _AppendTable:
    """A text table appended to in one write per batch; resume cuts a torn tail and reads the done paths."""

    def __init__(self, path: str, cols: Sequence[str], resume: bool):
        self.path, self.cols = path, list(cols)
        self.done = PathSet()
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        keep = self._scan(size) if resume and size else 0
        self.done.freeze()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.ftruncate(self.fd, keep)
        if keep == 0:
            _write_all(self.fd, self._header())

    def _scan(self, size: int) -> int:
        raise NotImplementedError

    def _header(self) -> bytes:
        return b""

    def _bad(self, where: str) -> InvalidInputError:
        return InvalidInputError(f"{self.path}: {where} is not a result row of this run's columns "
                                 f"({', '.join(self.cols)}); resume needs the same --top-k, or use --force")

    def write(self, rows: Sequence[dict]) -> None:
        if rows:
            _write_all(self.fd, self._encode(rows))

    def _encode(self, rows: Sequence[dict]) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


class CsvTable(_AppendTable):
    def _header(self) -> bytes:
        return self._encode([dict(zip(self.cols, self.cols, strict=True))])

    def _encode(self, rows: Sequence[dict]) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")  # quotes cells with commas, quotes or line breaks
        w.writerows([["" if r[c] is None else r[c] for c in self.cols] for r in rows])
        return buf.getvalue().encode(*_ENC)

    def _scan(self, size: int) -> int:
        good, state = 0, {"pos": 0, "nl": True}
        with open(self.path, "rb") as f:

            def text() -> Iterator[str]:
                for line, pos in _lines(f):
                    state["pos"], state["nl"] = pos, line.endswith(b"\n")
                    yield line.decode(*_ENC)

            try:
                for n, rec in enumerate(csv.reader(text(), strict=True)):
                    if not state["nl"]:
                        break  # a torn last record (every record this class writes ends in a newline)
                    if rec != self.cols if n == 0 else len(rec) != len(self.cols):
                        raise self._bad("the header" if n == 0 else f"record {n + 1}")
                    if n:
                        self.done.add(rec[0])
                    good = state["pos"]
            except csv.Error:  # an unterminated quote: torn at the end, or a damaged file
                if state["pos"] < size:
                    raise self._bad("a record") from None
        return good


class JsonlTable(_AppendTable):
    def _encode(self, rows: Sequence[dict]) -> bytes:
        return "".join(json.dumps({c: r[c] for c in self.cols}, ensure_ascii=False) + "\n"
                       for r in rows).encode(*_ENC)

    def _scan(self, size: int) -> int:
        good = 0
        with open(self.path, "rb") as f:
            for n, (line, pos) in enumerate(_lines(f)):
                try:
                    obj = json.loads(line.decode(*_ENC)) if line.endswith(b"\n") else None
                except ValueError:
                    obj = None
                if not isinstance(obj, dict) or list(obj) != self.cols:
                    if pos < size or line.endswith(b"\n"):
                        raise self._bad(f"line {n + 1}")
                    break  # a torn last line
                self.done.add(obj["path"])
                good = pos
        return good


def iter_table(path: str) -> Iterator[dict]:
    """The rows of a result file (.csv, .jsonl or .parquet); CSV cells come back as strings ('' for empty)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        pq = _pyarrow()[1]
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    elif ext == ".jsonl":
        with open(path, encoding=_ENC[0], errors=_ENC[1]) as f:
            for line in f:
                yield json.loads(line)
    else:
        with open(path, encoding=_ENC[0], errors=_ENC[1], newline="") as f:
            yield from csv.DictReader(f)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("pyarrow", "parquet", ".parquet output") from None
    return pa, pq


class ParquetTable:
    """Rows spooled to a hidden JSONL file, then written as Parquet row groups to a temp file renamed into place."""

    CHUNK = 65536  # rows per row group

    def __init__(self, path: str, cols: Sequence[str], resume: bool):
        self.pa, self.pq = _pyarrow()
        self.path, self.cols = path, list(cols)
        folder, name = os.path.split(path)
        self.spool_path = os.path.join(folder, f".{name}.partial.jsonl")
        self.schema = self.pa.schema([(c, self.pa.float64() if c.startswith("prob_") else self.pa.string())
                                      for c in self.cols])
        self.old = resume and os.path.isfile(path)
        if not resume:
            for p in (path, self.spool_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        self.spool = JsonlTable(self.spool_path, self.cols, resume)
        self.done = self.spool.done
        if self.old:
            try:
                f = self.pq.ParquetFile(path)
                if f.schema_arrow.names != self.cols:
                    raise self.spool._bad("its schema")
                for p in f.read(columns=["path"]).column("path").to_pylist():
                    self.done.add(p)
            except (OSError, self.pa.ArrowException) as e:
                raise InvalidInputError(f"{path}: not a readable Parquet file to resume ({e})") from None
            self.done._buf.extend(self.spool.done._sorted.tolist())
            self.done.freeze()

    def write(self, rows: Sequence[dict]) -> None:
        self.spool.write(rows)

    def close(self) -> None:
        """Write the Parquet file: previous rows (resume) + the spool, then drop the spool."""
        if self.spool.fd < 0:
            return
        self.spool.close()
        folder = os.path.dirname(self.path) or "."
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            with self.pq.ParquetWriter(tmp, self.schema) as w:
                if self.old:
                    for batch in self.pq.ParquetFile(self.path).iter_batches(self.CHUNK):
                        w.write_batch(batch)
                chunk: list[dict] = []
                for row in iter_table(self.spool_path):
                    row["path"] = row["path"].encode(*_ENC).decode("utf-8", "replace")  # Arrow wants valid UTF-8
                    chunk.append(row)
                    if len(chunk) == self.CHUNK:
                        w.write_table(self.pa.Table.from_pylist(chunk, self.schema))
                        chunk = []
                if chunk or not self.old:
                    w.write_table(self.pa.Table.from_pylist(chunk, self.schema))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            os.unlink(self.spool_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def open_table(path: str | os.PathLike, cols: Sequence[str], *, resume: bool = False, force: bool = False):
    """A writer for ``path`` by its suffix. An existing non-empty file needs ``resume`` or ``force``."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise InvalidInputError(f"{path}: output must end in {', '.join(FORMATS)}")
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise InvalidInputError(f"{path}: not a file in an existing folder")
    spool = os.path.join(folder, f".{os.path.basename(path)}.partial.jsonl")
    started = (os.path.isfile(path) and os.path.getsize(path) > 0) or (ext == ".parquet" and os.path.isfile(spool))
    if started and not (resume or force):
        raise InvalidInputError(f"{path}: exists (use --resume to skip the paths already in it, or --force to "
                                "replace it)")
    if ext == ".parquet":
        return ParquetTable(path, cols, resume)
    if force and not resume:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return (CsvTable if ext == ".csv" else JsonlTable)(path, cols, resume)
