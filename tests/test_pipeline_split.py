"""The pipeline sizes itself: decode workers and runtime threads chosen from what the first files cost."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from edgecnn.runtimes import pipeline as pl
from edgecnn.runtimes.pipeline import (
    Decoded,
    Split,
    choose_split,
    measure_split,
    plan_split,
    predict_rows,
    predicted_rate,
)
from PIL import Image

from edgecnn import bulk
from edgecnn.data import synthetic_dataset

NOTE = re.compile(r"^edgecnn: note: decoding on \d+ threads?, the model on \d+ threads? \(")
MS = 1e-3


# ------------------------------------------------------------------------------------------ choose_split
def test_decode_bound_gets_the_decode_workers():
    # measured on 2 cores: exact 640x480 JPEGs 4.9 ms/image, the Net 1.7 ms/image on 1 thread
    assert choose_split(4.9 * MS, 1.7 * MS, 2) == (2, 1)
    w, t = choose_split(4.9 * MS, 0.5 * MS, 8)
    assert t == 1 and w >= 6


def test_model_bound_gets_the_runtime_threads():
    # measured on 2 cores: 128x96 JPEGs 0.7 ms/image, the Net 1.7-2.0 ms/image on 1 thread
    assert choose_split(0.7 * MS, 2.0 * MS, 2) == (1, 2)
    w, t = choose_split(0.2 * MS, 5 * MS, 8)
    assert t >= 4 and w <= 4


def test_one_cpu_is_one_of_each():
    for d, m in [(5 * MS, 1 * MS), (1 * MS, 5 * MS), (2 * MS, 2 * MS)]:
        assert choose_split(d, m, 1) == (1, 1)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16])
def test_never_more_than_the_cpus_and_never_a_slower_split(cpus):
    grid = [0.05 * MS, 0.3 * MS, 1 * MS, 3 * MS, 10 * MS, 40 * MS]
    for d, m in itertools.product(grid, grid):
        w, t = choose_split(d, m, cpus)
        assert 1 <= w <= cpus and 1 <= t <= cpus
        # the choice is predicted within the near-tie margin of every other split for these CPUs
        best = max(predicted_rate(a, b, d, m, cpus) for a in range(1, cpus + 1) for b in range(1, cpus + 1))
        assert predicted_rate(w, t, d, m, cpus) >= best * (1 - pl.NEAR_TIE) - 1e-9
        # and no other split that fast uses fewer threads in all
        assert not any(predicted_rate(a, b, d, m, cpus) >= best * (1 - pl.NEAR_TIE) and a + b < w + t
                       for a in range(1, cpus + 1) for b in range(1, cpus + 1))


def test_what_is_given_wins():
    assert choose_split(4.9 * MS, 1.7 * MS, 2, workers=1)[0] == 1
    assert choose_split(0.7 * MS, 2.0 * MS, 2, threads=1)[1] == 1
    assert choose_split(0.7 * MS, 2.0 * MS, 2, workers=5) == (5, 2)  # more workers than CPUs, if asked
    assert choose_split(4.9 * MS, 1.7 * MS, 2, workers=3, threads=4) == (3, 4)
    # the model measured on 2 threads (-O threads=2): only the workers are chosen
    w, t = choose_split(4.9 * MS, 1.0 * MS, 2, threads=2, model_threads=2)
    assert t == 2 and w == 2


def test_unmeasured_is_the_decode_bound_default():
    assert choose_split(None, None, 4) == (4, 1)
    assert choose_split(3 * MS, None, 4) == (4, 1)  # nothing decoded: nothing known about the model
    assert choose_split(None, None, 4, workers=2, threads=3) == (2, 3)


def test_the_note_says_the_choice_and_the_figures():
    s = Split(2, 1, 2, ("workers", "threads"), 11.8 * MS, 0.6 * MS, 1, 8)
    assert s.note() == ("decoding on 2 threads, the model on 1 thread (2 usable CPUs; measured on 8 files: "
                        "decode 11.8 ms/image, model 0.60 ms/image on 1 thread)")
    s = Split(1, 2, 2, ("workers",), 2 * MS, 1 * MS, 2, 3)
    assert "runtime threads as given" in s.note() and "decoding on 1 thread," in s.note()
    d = s.as_dict()
    assert d["workers"] == 1 and d["threads"] == 2 and d["chosen"] == ["workers"] and d["decode_ms_per_image"] == 2.0


# ------------------------------------------------------------------------------------------ measuring
class FakeModel:
    """Probabilities from the pixels alone (a per-image function): any batching gives the same rows."""

    class_names = ("a", "b", "c")
    input_size = 16

    def __init__(self):
        self.batches: list[int] = []

    def probabilities_from_pixels(self, rgb: np.ndarray) -> np.ndarray:
        self.batches.append(len(rgb))
        s = rgb.reshape(len(rgb), -1, 3).mean(1).astype(np.float64) + 1.0
        return (s / s.sum(1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    """30 small images (JPEG and PNG) and 3 unreadable files, in a folder; (folder, sorted paths)."""
    root = tmp_path_factory.mktemp("split") / "imgs"
    root.mkdir()
    ds = synthetic_dataset(per_class=5, seed=11)
    for i, img in enumerate(ds.images):
        im = Image.fromarray(img).resize((80 + i, 60))
        im.save(root / f"i_{i:02d}.{'png' if i % 5 == 4 else 'jpg'}", **({} if i % 5 == 4 else {"quality": 80}))
    for i in range(3):
        (root / f"z_bad{i}.jpg").write_text("not a JPEG\n")
    return root, sorted(str(p) for p in root.iterdir())


def test_measure_split_decodes_the_first_files_once_and_times_both(images):
    _, paths = images
    it = iter(paths)
    model = FakeModel()
    head, d, m = measure_split(it, model, max_files=5, max_seconds=10)
    assert head.paths == paths[:5] and head.pixels.shape == (5, 16, 16, 3) and head.errors == [None] * 5
    assert head.measured == 5
    assert d > 0 and m > 0 and next(it) == paths[5]  # the iterator continues after the measured files
    assert measure_split(iter([]), model) == (None, None, None)
    head, d, m = measure_split(iter(paths[-3:]), model, max_files=8)  # unreadable: measured, no model figure
    assert len(head.paths) == 3 and all(head.errors) and d > 0 and m is None


def test_plan_split_edge_cases(images):
    _, paths = images
    model = FakeModel()
    it = iter(paths)
    s = plan_split(it, model, cpus=2, workers=2, threads=1)  # both given: nothing measured, nothing read
    assert (s.workers, s.threads, s.chosen, s.head) == (2, 1, (), None) and next(it) == paths[0]
    s = plan_split(iter([]), model, cpus=2, files_left=0)  # --resume with everything done
    assert (s.workers, s.threads, s.head) == (2, 1, None) and s.reason == "no files left"
    s = plan_split(iter(paths[:1]), model, cpus=2, files_left=1)  # one file: one batch, not measured
    assert s.head is None and "one batch or less" in s.reason and (s.workers, s.threads) == (2, 1)
    s = plan_split(iter(paths[-3:]), model, cpus=2, batch_size=2, files_left=3)  # all unreadable
    assert "could be read" in s.reason and (s.workers, s.threads) == (2, 1) and len(s.head.paths) == 2
    s = plan_split(iter(paths), model, cpus=2, batch_size=4, files_left=len(paths))
    assert len(s.head.paths) == 4 and s.decode_s > 0 and s.model_s > 0 and not s.reason  # at most one batch ahead
    it = iter(paths)
    s = plan_split(it, model, cpus=2, batch_size=16, files_left=len(paths))  # the rest of batch 1 decoded meanwhile
    assert s.head.paths == paths[:16] and s.head.errors == [None] * 16 and s.files == 8 and next(it) == paths[16]
    ref, _ = pl.decode_many(paths[:16], 16)
    assert np.array_equal(s.head.pixels, ref)
    s = plan_split(iter(paths), model, cpus=2, workers=1, batch_size=16, files_left=len(paths))  # --workers 1
    assert len(s.head.paths) == 8 and s.workers == 1  # no helper thread beside this one


@pytest.mark.parametrize("workers", [1, 3])
def test_first_files_and_pieces_give_the_same_batches_and_rows(images, workers):
    _, paths = images
    ref_model = FakeModel()
    ref = [r for rows in predict_rows(paths, ref_model, batch_size=7, workers=1, top_k=2) for r in rows]
    assert ref_model.batches == [7, 7, 7, 7, 2]  # the 3 unreadable files of the last batch are rows, not pixels
    for n in (0, 1, 5, 7):
        model = FakeModel()
        it = iter(paths)
        head = Decoded(*[paths[:n], *pl.decode_many(paths[:n], 16)]) if n else None
        if n:
            next(itertools.islice(it, n - 1, n))
        got = [r for rows in predict_rows(it, model, batch_size=7, workers=workers, top_k=2, first=head)
               for r in rows]
        assert got == ref and model.batches == ref_model.batches
    with pytest.raises(Exception, match="more than one batch"):
        next(predict_rows(iter([]), FakeModel(), batch_size=2, first=Decoded(paths[:3], *pl.decode_many(paths[:3], 16))))


def test_the_model_thread_decodes_pieces_nobody_started(images, monkeypatch):
    """With the workers stuck, the model's thread decodes every piece itself: the run still completes."""
    import threading

    _, paths = images
    gate = threading.Event()
    real = pl.decode_many
    main = threading.get_ident()

    def slow(ps, size, fast_jpeg=False):
        if threading.get_ident() != main:
            gate.wait(5)
        return real(ps, size, fast_jpeg)

    monkeypatch.setattr(pl, "decode_many", slow)
    monkeypatch.setattr(pl, "DECODE_CHUNK", 2)
    try:
        rows = [r for rs in predict_rows(paths, FakeModel(), batch_size=8, workers=1, steal=True) for r in rs]
    finally:
        gate.set()
    assert [r["path"] for r in rows] == paths


# ------------------------------------------------------------------------------------------ edgecnn predict
def _csv_rows(path: Path) -> list[dict]:
    from edgecnn.runtimes.tables import iter_table

    return list(iter_table(str(path)))


def test_predict_prints_one_note_and_the_split_does_not_change_rows(images, trained, run_cli, tmp_path):
    root, paths = images
    auto, fixed = tmp_path / "auto.csv", tmp_path / "fixed.csv"
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", auto, "--top-k", 2, "--batch-size", 4)
    assert r.exit_code == 1, r.output  # the 3 unreadable files
    notes = [ln for ln in r.stderr.splitlines() if NOTE.match(ln)]
    assert len(notes) == 1 and "measured on 4 files: decode " in notes[0] and "usable CPU" in notes[0], r.stderr
    w, t = (int(v) for v in re.match(r"edgecnn: note: decoding on (\d+) threads?, the model on (\d+)", notes[0]).groups())
    r2 = run_cli("predict", trained.onnx_dynamic, root, "-o", fixed, "--top-k", 2, "--batch-size", 4,
                 "--workers", 1 if w != 1 else 2, "-O", f"threads={t}")
    assert r2.exit_code == 1 and not [ln for ln in r2.stderr.splitlines() if NOTE.match(ln)], r2.stderr
    assert _csv_rows(auto) == _csv_rows(fixed)  # the same labels and probabilities, to the last digit


def test_given_workers_and_threads_win_and_the_summary_records_the_split(images, trained, tmp_path, monkeypatch):
    root, paths = images
    logs: list[str] = []
    out = tmp_path / "o.csv"
    s = bulk.run(trained.onnx_dynamic, [str(root)], str(out),
                 bulk.BulkOptions(batch_size=4, workers=1, force=True, progress=False), log=logs.append)
    assert s.split["workers"] == 1 and s.split["chosen"] == ["threads"] and s.split["threads"] >= 1
    assert len([m for m in logs if NOTE.match(m)]) == 1 and "--workers as given" in logs[-1]
    logs.clear()
    s = bulk.run(trained.onnx_dynamic, [str(root)], str(out),
                 bulk.BulkOptions(batch_size=4, workers=2, options={"threads": 1}, force=True, progress=False),
                 log=logs.append)
    assert (s.split["workers"], s.split["threads"], s.split["chosen"]) == (2, 1, []) and not logs
    ref = _csv_rows(out)
    # a model-bound choice reopens the runtime on the chosen threads; the rows stay the classifier's
    monkeypatch.setattr(pl, "choose_split", lambda *a, **k: (1, 2))
    s = bulk.run(trained.onnx_dynamic, [str(root)], str(out),
                 bulk.BulkOptions(batch_size=4, force=True, progress=False), log=logs.append)
    assert (s.split["workers"], s.split["threads"]) == (1, 2) and s.done == len(paths)
    got = _csv_rows(out)
    assert [r["label_1"] for r in got] == [r["label_1"] for r in ref]
    np.testing.assert_allclose([float(r["prob_1"] or 0) for r in got], [float(r["prob_1"] or 0) for r in ref],
                               rtol=1e-5, atol=1e-7)


def test_small_empty_unreadable_and_resumed_runs_stay_quiet_and_work(images, trained, tmp_path):
    root, paths = images
    opts = dict(force=True, progress=False)
    logs: list[str] = []
    out = tmp_path / "o.csv"
    s = bulk.run(trained.onnx_dynamic, [paths[0]], str(out), bulk.BulkOptions(**opts), log=logs.append)  # one file
    assert s.done == 1 and s.failed == 0 and "one batch or less" in s.split["reason"] and not logs
    s = bulk.run(trained.onnx_dynamic, [str(root)], str(out), bulk.BulkOptions(**opts), log=logs.append)  # < 1 batch
    assert s.done == len(paths) and s.failed == 3 and not logs
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(10):
        (bad / f"b{i}.jpg").write_text("no\n")
    s = bulk.run(trained.onnx_dynamic, [str(bad)], str(tmp_path / "b.csv"), bulk.BulkOptions(batch_size=4, **opts),
                 log=logs.append)
    assert s.done == 10 and s.failed == 10 and "could be read" in s.split["reason"] and not logs
    s = bulk.run(trained.onnx_dynamic, [str(root)], str(out), bulk.BulkOptions(batch_size=4, resume=True,
                                                                               progress=False), log=logs.append)
    assert s.done == 0 and s.skipped == len(paths) and s.split["reason"] == "no files left" and not logs
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no image files"):
        bulk.run(trained.onnx_dynamic, [str(tmp_path / "empty")], str(tmp_path / "e.csv"), bulk.BulkOptions(**opts))


def test_bundle_predict_py_sizes_itself_and_writes_the_same_rows(images, trained, tmp_path):
    import subprocess
    import sys

    from edgecnn.package import build_bundle

    root, paths = images
    bundle = tmp_path / "bundle"
    build_bundle([trained.onnx_dynamic], bundle)
    auto, fixed = tmp_path / "auto.csv", tmp_path / "fixed.csv"
    cmd = [sys.executable, str(bundle / "predict.py"), str(root), "--batch-size", "4", "--top-k", "2"]
    r = subprocess.run([*cmd, "-o", str(auto)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # 2: the unreadable files
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("predict.py: note: decoding on ")]
    assert len(notes) == 1 and "measured on 4 files" in notes[0], r.stderr
    t = re.match(r"predict.py: note: decoding on \d+ threads?, the model on (\d+)", notes[0]).group(1)
    r = subprocess.run([*cmd, "-o", str(fixed), "--workers", "1", "--threads", t], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "note: decoding" not in r.stderr, r.stderr
    assert _csv_rows(auto) == _csv_rows(fixed)
