"""Class names and normalization a user gives (--labels, --mean, --std), and lists in messages. Torch-free."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidInputError

LABEL_FILE_SUFFIXES = {".txt", ".names", ".labels", ".csv", ".lst"}


def format_list(items: Sequence, limit: int = 8) -> str:
    """``a, b, c``; past ``limit`` items: ``a, b, …, z (+N more, M in all)``; never cut silently."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    head = items[: limit - 1]
    return f"{', '.join(head)}, …, {items[-1]} (+{len(items) - limit} more, {len(items)} in all)"


def folder_classes(folder: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder, as torchvision gives them: its sub-folders, sorted by name."""
    root = Path(folder)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def parse_labels(value: str) -> list[str]:
    """--labels: a file with one name a line, a folder (ImageFolder: sorted class folders), or ``a,b,c``."""
    value = str(value)
    p = Path(value)
    if p.is_dir():
        names = folder_classes(p)
        if not names:
            raise InvalidInputError(f"--labels {value}: the folder has no class folders (DIR/<class>/<image>)")
        where = f"--labels {value} (class folders)"
    elif p.is_file():
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"--labels {value}: cannot read it as a text file ({type(e).__name__})") from None
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not names:
            raise InvalidInputError(f"--labels {value}: the file has no names (one name a line)")
        where = f"--labels {value}"
    elif "," not in value and (os.sep in value or "/" in value or p.suffix.lower() in LABEL_FILE_SUFFIXES):
        raise InvalidInputError(f"--labels {value}: no such file or folder (give FILE, DIR or a comma list a,b,c)")
    else:
        names = [v.strip() for v in value.split(",")]
        if any(not n for n in names):
            raise InvalidInputError(f"--labels {value!r}: an empty name in the comma list")
        where = "--labels"
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidInputError(f"{where}: duplicate names {format_list(dup)}")
    if any("\n" in n or "\r" in n for n in names):
        raise InvalidInputError(f"{where}: a name contains a line break")
    return names


def parse_triple(value: str, option: str, positive: bool = False) -> list[float]:
    """--mean / --std: three comma-separated numbers (R,G,B, on the 0..1 pixel scale)."""
    try:
        vals = [float(v) for v in str(value).split(",")]
    except ValueError:
        raise InvalidInputError(f"{option} {value!r}: expected three numbers R,G,B, e.g. 0.485,0.456,0.406") from None
    if len(vals) != 3:
        raise InvalidInputError(f"{option} {value!r}: expected three numbers R,G,B, got {len(vals)}")
    from edgecnn.runtimes.preprocess import check_norm

    return list(check_norm(vals, option, positive))
