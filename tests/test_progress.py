"""Progress: bars on a terminal only; a log gets lines, never bar fragments (carriage returns)."""

from __future__ import annotations

import subprocess
import sys

from edgecnn.progress import Stages, bar


def test_stages_in_a_log_are_one_line_each_with_the_previous_steps_time(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    lines: list[str] = []
    st = Stages(["a", "b"], "quantize int8", lines.append)
    st.step("reading")
    st.step("calibrating")
    st.close()
    assert lines[0] == "quantize int8 [1/2] reading"
    assert lines[1].startswith("quantize int8 [2/2] calibrating (previous step ") and lines[1].endswith(" s)")
    assert type(bar(total=3)).__name__ == "_NoBar"


def test_bench_writes_no_bar_fragments_into_a_log(trained, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgecnn.cli", "bench", str(trained.onnx), "--batch", "1",
                        "--min-time", "0.05", "--no-roofline"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "cell/s" not in r.stderr and "cells/s" not in r.stderr, r.stderr
