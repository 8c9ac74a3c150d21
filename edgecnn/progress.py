"""Progress on stderr: a tqdm bar on a terminal only; in a log (stderr not a terminal) no bar fragments."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _NoBar:
    def __init__(self, it=None):
        self._it = it

    def __iter__(self):
        return iter(self._it or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def set_description_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool | None = None):
    """A tqdm bar (leave=False) when ``enabled`` (None: stderr is a terminal) and tqdm is installed; else a
    stand-in with the same methods that prints nothing."""
    if enabled is None:
        enabled = on_terminal()
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                        dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar(iterable)


class Stages:
    """Named steps of a long command: a bar over them on a terminal, else one line per step as it starts
    (with the time the previous one took), so a log shows where the time went and that nothing hung."""

    def __init__(self, names: list[str], desc: str, log: Callable[[str], None] | None = None):
        self.names, self.desc, self.log = names, desc, log or (lambda s: None)
        self.i = -1
        self.t = time.perf_counter()
        self._bar = bar(total=len(names), desc=desc, unit="step")
        self.terminal = not isinstance(self._bar, _NoBar)

    def step(self, name: str) -> None:
        now = time.perf_counter()
        if self.i >= 0:
            self._bar.update(1)
        took = f" (previous step {now - self.t:.1f} s)" if self.i >= 0 else ""
        self.i += 1
        self.t = now
        if self.terminal:
            self._bar.set_description_str(f"{self.desc}: {name}")
        else:
            self.log(f"{self.desc} [{self.i + 1}/{len(self.names)}] {name}{took}")

    def close(self) -> None:
        self._bar.update(1)
        self._bar.close()
