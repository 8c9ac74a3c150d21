"""Run a check in a child process, so a native crash in a runtime becomes an error message."""

from __future__ import annotations

import signal
import subprocess
import sys

from .errors import EXIT_BAD_INPUT


def run_child(cmd: list[str], what: str, timeout: float | None = None) -> int:
    """Run ``cmd``, pass its output through, and turn a death by signal into one line on stderr.

    Returns the exit code the parent should use: the child's own, or EXIT_BAD_INPUT (2) when the
    child was killed by a signal (segfault, abort) or timed out: the model is what crashed it.
    """
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"edgecnn: error: {what} did not finish within {timeout:g} s in the isolated process",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        print(f"edgecnn: error: the runtime crashed ({name}) while {what}; the parent process is unharmed",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return proc.returncode


def isolated_cli(args: list[str], what: str, timeout: float | None = None) -> int:
    """Re-run ``edgecnn ARGS`` (without --isolate) in a fresh interpreter."""
    return run_child([sys.executable, "-m", "edgecnn", *args], what, timeout)
