"""Bulk prediction: folders to result tables, bad files as rows, kill + --resume, Ray, the bundle's predict.py."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from edgecnn.runtimes import Classifier
from edgecnn.runtimes.pipeline import columns, iter_paths
from edgecnn.runtimes.tables import CsvTable, JsonlTable, iter_table, open_table
from PIL import Image

from edgecnn.data import synthetic_dataset
from edgecnn.errors import InvalidInputError

RTOL, ATOL = 1e-3, 1e-6  # fp32 tolerance on probabilities
TOP_K = 3
GOOD, BAD = "good", "bad"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Nested folders of JPEGs and PNGs plus a corrupt JPEG, a text file named .jpg and awkward names.
    Returns the folder and {path: GOOD | BAD} for every image file in it (paths as the pipeline names them)."""
    root = tmp_path_factory.mktemp("bulk") / "photos"
    ds = synthetic_dataset(per_class=4, seed=7)
    kinds: dict[str, str] = {}
    for i, img in enumerate(ds.images):
        sub = root / ("" if i < 8 else f"set{i % 3}") / ("" if i % 5 else "deeper")
        sub.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img).resize((96 + i, 72))
        if i % 4 == 3:
            p = sub / f"img_{i:02d}.png"
            im.save(p)
        else:
            p = sub / f"img_{i:02d}.jpg"
            im.save(p, quality=70 + i)
        kinds[str(p)] = GOOD
    odd = root / "set1" / 'comma, "quote"\nnewline.jpg'  # a name that must not break a CSV row
    Image.fromarray(ds.images[0]).save(odd, quality=90)
    kinds[str(odd)] = GOOD
    whole = (root / "img_01.jpg").read_bytes()
    (root / "set2" / "corrupt.jpg").write_bytes(whole[: len(whole) // 2])  # truncated JPEG
    (root / "set0" / "deeper" / "notes.jpg").write_text("I am text, not a JPEG\n")
    (root / "set0" / "readme.md").write_text("not an image suffix: not a row\n")
    (root / ".hidden.jpg").write_bytes(whole)  # hidden: not a row
    kinds[str(root / "set2" / "corrupt.jpg")] = BAD
    kinds[str(root / "set0" / "deeper" / "notes.jpg")] = BAD
    return root, kinds


def _rows(path: Path) -> list[dict]:
    rows = list(iter_table(str(path)))
    for r in rows:  # CSV cells are strings: make them comparable with JSONL / Parquet rows
        for k, v in r.items():
            if v == "":
                r[k] = None
            elif k.startswith("prob_") and v is not None:
                r[k] = float(v)
    return rows


def assert_same_rows(a: list[dict], b: list[dict], top_k: int, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Two engines' result rows: the same paths in the same order, the same labels and errors, and
    probabilities equal within the fp32 tolerance."""
    assert [x["path"] for x in a] == [x["path"] for x in b]  # same rows, same order
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("prob_")} == \
               {k: v for k, v in y.items() if not k.startswith("prob_")}
        if x["error"] is None:
            np.testing.assert_allclose([x[f"prob_{i}"] for i in range(1, top_k + 1)],
                                       [y[f"prob_{i}"] for i in range(1, top_k + 1)], rtol=rtol, atol=atol)


def _check_against_classifier(rows: list[dict], kinds: dict[str, str], model: Path) -> None:
    assert sorted(r["path"] for r in rows) == sorted(kinds)  # one row per file, each once
    good = [p for p, k in kinds.items() if k == GOOD]
    with Classifier(model) as clf:
        ref = dict(zip(good, clf.classify(good, top_k=TOP_K), strict=True))
    for r in rows:
        if kinds[r["path"]] == BAD:
            # reasons in words: a truncated JPEG says so, a text file named .jpg is not an image
            want = "truncated JPEG file" if r["path"].endswith("corrupt.jpg") else "not an image file"
            assert r["error"] and want in r["error"] and "Error" not in r["error"], r
            assert all(r[f"label_{i}"] is None and r[f"prob_{i}"] is None for i in range(1, TOP_K + 1))
            continue
        assert r["error"] is None, r
        want = ref[r["path"]]
        assert [r[f"label_{i}"] for i in range(1, TOP_K + 1)] == [lab for lab, _ in want]
        np.testing.assert_allclose([r[f"prob_{i}"] for i in range(1, TOP_K + 1)], [p for _, p in want],
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fmt", [".csv", ".jsonl", ".parquet"])
def test_folder_to_table_one_row_per_file_errors_in_rows(folder, trained, run_cli, tmp_path, fmt):
    root, kinds = folder
    out = tmp_path / f"pred{fmt}"
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", out, "--top-k", TOP_K, "--batch-size", 5)
    assert r.exit_code == 1, r.output
    assert f"{len(kinds)} images" in r.stderr and "2 failed" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgecnn: error: 2 of") and "Traceback" not in r.stderr
    rows = _rows(out)
    assert list(rows[0]) == columns(TOP_K)
    _check_against_classifier(rows, kinds, trained.onnx_dynamic)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no spool or temp file left behind
    if fmt == ".csv":  # the raw CSV: the odd name is one quoted cell, the file parses to exactly the rows
        with open(out, newline="") as f:
            assert sum(1 for _ in csv.reader(f)) == len(kinds) + 1


def test_fixed_batch_model_and_stdout_lines(folder, trained, run_cli):
    """A model with a fixed batch of 1 gives the same rows; without -o the rows are lines on stdout."""
    root, kinds = folder
    r = run_cli("predict", trained.onnx, root / "set0", "--top-k", "2", "--workers", "1")
    assert r.exit_code == 1  # set0 holds notes.jpg
    lines = r.stdout.strip().splitlines()
    in_set0 = [p for p in kinds if p.startswith(str(root / "set0"))]
    assert len(lines) == len(in_set0)
    with Classifier(trained.onnx) as clf:
        for line in lines:
            path, rest = line.split(": ", 1)
            if kinds[path] == BAD:
                assert rest.startswith("error: not an image file")
            else:
                (a, pa), (b, pb) = clf.classify(path, top_k=2)[0]
                assert rest == f"{a} {pa:.4f}, {b} {pb:.4f}"
    stderr = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(stderr) == 1 and stderr[0].startswith("edgecnn: error: 1 of")


def test_inputs_lists_globs_missing_files(folder, trained, run_cli, tmp_path):
    root, kinds = folder
    good = sorted(p for p, k in kinds.items() if k == GOOD)[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("# photos to label\n" + "\n".join([*good, str(tmp_path / "vanished.jpg")]) + "\n\n")
    assert list(iter_paths([listing])) == [*good, str(tmp_path / "vanished.jpg")]
    pattern = str(root / "set*" / "*.png")
    assert list(iter_paths([pattern])) == sorted(p for p in kinds if p.endswith(".png") and "/set" in p
                                                 and Path(p).parent.name.startswith("set"))
    out = tmp_path / "o.jsonl"
    r = run_cli("predict", trained.onnx_dynamic, listing, pattern, "-o", out)
    assert r.exit_code == 1
    rows = _rows(out)
    assert [x["path"] for x in rows[:4]] == [*good, str(tmp_path / "vanished.jpg")]
    assert rows[3]["error"] == "no such image file"
    # only unreadable files: exit 2; a glob matching nothing and an unknown suffix: exit 2, no file written
    r = run_cli("predict", trained.onnx_dynamic, tmp_path / "vanished.jpg")
    assert r.exit_code == 2 and r.stderr.startswith("edgecnn: error: 1 of 1")
    for args in ([str(root / "nothing*.jpg"), "-o", tmp_path / "x.csv"], [str(root), "-o", tmp_path / "x.xlsx"]):
        r = run_cli("predict", trained.onnx_dynamic, *args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("edgecnn: error:")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.xlsx").exists()
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", out)  # exists: needs --resume or --force
    assert r.exit_code == 2 and "--resume" in r.stderr and _rows(out) == rows


def test_torn_last_row_is_cut_and_resume_reads_done_paths(tmp_path):
    cols = columns(1)
    rows = [{"path": p, "label_1": "circle", "prob_1": 0.5, "error": None} for p in ("a.jpg", 'b,"x"\ny.jpg')]
    for cls, name in ((CsvTable, "t.csv"), (JsonlTable, "t.jsonl")):
        path = tmp_path / name
        t = cls(str(path), cols, resume=False)
        t.write(rows)
        t.close()
        whole = path.read_bytes()
        for cut in (1, 5, 12):  # a write torn anywhere inside the last row
            path.write_bytes(whole[:-cut])
            t = cls(str(path), cols, resume=True)
            assert "a.jpg" in t.done and rows[1]["path"] not in t.done and len(t.done) == 1
            t.write(rows[1:])
            t.close()
            assert path.read_bytes() == whole
        with pytest.raises(InvalidInputError, match="--top-k"):
            cls(str(path), columns(2), resume=True)
    with pytest.raises(InvalidInputError, match="exists"):
        open_table(tmp_path / "t.csv", cols)


def _photo_folder(root: Path, n: int) -> list[str]:
    """n 640x480 JPEGs (decoding one takes milliseconds): hardlinks to 8 distinct files."""
    root.mkdir()
    ds = synthetic_dataset(per_class=2, seed=1)
    srcs = []
    for i in range(8):
        srcs.append(root / f"src_{i}.jpg")
        Image.fromarray(ds.images[i]).resize((640, 480), Image.BICUBIC).save(srcs[-1], quality=90)
    paths = [str(p) for p in srcs]
    for i in range(n - len(srcs)):
        p = root / f"link_{i:04d}.jpg"
        os.link(srcs[i % len(srcs)], p)
        paths.append(str(p))
    return sorted(paths)


@pytest.mark.parametrize("fmt,sig", [(".csv", signal.SIGKILL), (".parquet", signal.SIGKILL),
                                     (".parquet", signal.SIGTERM)])
def test_killed_midway_then_resume_completes_every_path_once(trained, tmp_path, fmt, sig):
    paths = _photo_folder(tmp_path / "many", 400)
    out = tmp_path / f"out{fmt}"
    spool = tmp_path / f".out{fmt}.partial.jsonl"
    watch = spool if fmt == ".parquet" else out
    cmd = [sys.executable, "-m", "edgecnn", "predict", str(trained.onnx_dynamic), str(tmp_path / "many"), "-o", str(out)]
    proc = subprocess.Popen(cmd + ["--batch-size", "4", "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if watch.exists() and watch.read_bytes().count(b"\n") >= 9:  # >= 2 batches written
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    if fmt == ".parquet" and sig == signal.SIGKILL:
        assert not out.exists()  # no footer was ever written; the rows are in the spool
        before = list(iter_table(str(spool)))
    else:
        before = list(iter_table(str(out)))  # a valid file: every row complete
        if fmt == ".parquet":
            assert "--resume" in err and not spool.exists()
    assert 8 <= len(before) < len(paths), "the run was not interrupted midway"
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(before):,} already in" in r.stderr
    rows = list(iter_table(str(out)))
    assert sorted(x["path"] for x in rows) == paths  # every path exactly once
    assert not spool.exists()
    assert all(not x["error"] for x in rows)


def test_without_the_extras_the_error_names_them(folder, trained, run_cli, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
    monkeypatch.setitem(sys.modules, "ray", None)
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", tmp_path / "o.parquet")
    assert r.exit_code == 3 and "pip install 'edgecnn[parquet]'" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("predict", trained.onnx_dynamic, root, "--engine", "ray", "-o", tmp_path / "o.csv")
    assert r.exit_code == 3 and "pip install 'edgecnn[ray]'" in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bulk_predict_runs_where_torch_cannot_be_imported(folder, trained, tmp_path):
    root, kinds = folder
    out = tmp_path / "o.csv"
    script = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
              "from edgecnn.cli import main\n"
              f"sys.argv = ['edgecnn', 'predict', {str(trained.onnx_dynamic)!r}, {str(root)!r}, '-o', {str(out)!r},"
              f" '--top-k', '{TOP_K}']\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    _check_against_classifier(_rows(out), kinds, trained.onnx_dynamic)


def test_bundle_predict_py_takes_a_folder_and_writes_the_same_rows(folder, trained, run_cli, tmp_path):
    from edgecnn.package import build_bundle

    root, kinds = folder
    bundle = tmp_path / "bundle"
    build_bundle([trained.onnx_dynamic], bundle)
    out = tmp_path / "bundle_rows.jsonl"
    r = subprocess.run([sys.executable, str(bundle / "predict.py"), str(root), "-o", str(out), "--top-k", str(TOP_K)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "notes.jpg" in r.stderr and "Traceback" not in r.stderr
    _check_against_classifier(_rows(out), kinds, trained.onnx_dynamic)
    assert run_cli("package", "--check", bundle).exit_code == 0  # the run left the bundle as listed


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance started by the test itself: 2 CPUs, no dashboard; shut down afterwards."""
    import ray  # the ray extra is installed by CI: if this import breaks, the test fails

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_engine_writes_the_same_rows_as_the_local_engine(folder, trained, run_cli, tmp_path, local_ray):
    root, kinds = folder
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", local, "--top-k", TOP_K)
    assert r.exit_code == 1, r.output
    r = run_cli("predict", trained.onnx_dynamic, root, "-o", remote, "--top-k", TOP_K, "--engine", "ray",
                "--batch-size", 8)
    assert r.exit_code == 1, r.output
    assert local_ray.is_initialized()  # the engine used the running instance and left it running
    a, b = _rows(local), _rows(remote)
    assert_same_rows(a, b, TOP_K)
    _check_against_classifier(b, kinds, trained.onnx_dynamic)
    json.dumps(b)  # plain values, no numpy scalars


def test_a_model_a_ray_worker_cannot_open_is_one_error(folder, tmp_path, local_ray):
    """As on a cluster whose nodes lack the model's path: the workers' exception, in one line, exit 3."""
    from edgecnn import ray_engine
    from edgecnn.bulk import BulkOptions
    from edgecnn.errors import RuntimeUnavailableError

    root, kinds = folder
    with pytest.raises(RuntimeUnavailableError) as e:
        list(ray_engine.predict_rows(sorted(kinds)[:3], str(tmp_path / "absent.onnx"), BulkOptions(engine="ray"),
                                     {"threads": 1}))
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert str(e.value).startswith("the run on Ray failed: InvalidModelError: ") and "absent.onnx" in str(e.value)
    assert local_ray.is_initialized()


def test_fast_jpeg_decodes_at_reduced_scale_close_to_the_exact_path(tmp_path):
    from edgecnn.runtimes.preprocess import to_rgb_uint8

    ds = synthetic_dataset(per_class=1, seed=4)
    big = Image.fromarray(ds.images[2]).resize((640, 480), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    exact = to_rgb_uint8(tmp_path / "big.jpg", 64).astype(int)
    fast = to_rgb_uint8(tmp_path / "big.jpg", 64, fast_jpeg=True).astype(int)
    assert not np.array_equal(exact, fast)  # the draft path really decoded at another scale
    assert np.abs(exact - fast).mean() < 2.0  # and lands close to the exact pixels
    png = tmp_path / "big.png"  # draft mode is JPEG only: other formats take the exact path
    assert np.array_equal(to_rgb_uint8(png, 64), to_rgb_uint8(png, 64, fast_jpeg=True))


def test_a_successful_ray_run_prints_only_edgecnns_own_lines(trained, tmp_path):
    """Its own local Ray instance, started and stopped by the engine: no token warning, no core_worker line."""
    import ray  # noqa: F401 - the ray extra is installed by CI: a broken install fails here

    root = tmp_path / "imgs"
    root.mkdir()
    from edgecnn.data import synthetic_dataset

    for i, img in enumerate(synthetic_dataset(2, seed=9).images):
        Image.fromarray(img).save(root / f"{i}.png")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgecnn.cli", "predict", str(trained.onnx_dynamic), str(root),
                        "--engine", "ray", "--workers", "1", "-o", str(tmp_path / "o.csv")],
                       capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("edgecnn:") for ln in lines), r.stderr
    # Ray's start-up and shutdown (seconds: a new local instance) are said apart, and not in the rate
    m = re.search(r"(\d+) images in ([\d.]+) s \(([\d,]+) img/s\).*Ray start-up and shutdown ([\d.]+) s more, "
                  r"not in the rate", lines[-1])
    assert m, lines[-1]
    n, run_s, rate, ray_s = int(m[1]), float(m[2]), float(m[3].replace(",", "")), float(m[4])
    assert n == len(list(root.glob("*.png"))) and ray_s >= 0.5 and run_s + ray_s <= wall
    # over the run's own seconds, not Ray's: shown to 0.1 s, and the rate to a whole image/s
    assert n / (run_s + 0.05) - 0.5 <= rate <= n / max(run_s - 0.05, 1e-3) + 0.5
