"""Shared fixtures: one small trained model per test session (real weights, real exports)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@dataclass
class TrainedModel:
    folder: Path
    pt: Path  # edgecnn checkpoint
    onnx: Path  # fixed 1x3x64x64
    onnx_dynamic: Path  # symbolic batch axis
    val_accuracy: float


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedModel:
    """The seed Net trained briefly on the built-in set (about 15 s), exported twice."""
    from edgecnn.exporters.onnx import export

    from edgecnn.data import synthetic_dataset
    from edgecnn.train import TrainConfig, train_to_file

    folder = tmp_path_factory.mktemp("trained")
    ds = synthetic_dataset(per_class=300, seed=0)
    res = train_to_file(ds, TrainConfig(epochs=3, progress=False, seed=0), folder / "model.pt", log=lambda s: None)
    fixed = export(folder / "model.pt", folder / "model.onnx").path
    dyn = export(folder / "model.pt", folder / "model_dynamic.onnx", dynamic_batch=True).path
    return TrainedModel(folder, folder / "model.pt", fixed, dyn, res.val_accuracy)


@pytest.fixture()
def run_cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from edgecnn.cli import cli

    def _run(*args: str):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return _run


@pytest.fixture()
def run_threads():
    """run_threads(n, work): call work(i) for i in range(n), all at once in n threads; returns their exceptions."""

    def _run(n: int, work) -> list[BaseException]:
        errors: list[BaseException] = []

        def wrap(i: int) -> None:
            try:
                work(i)
            except BaseException as e:  # noqa: BLE001 - reported to the test
                errors.append(e)

        threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    return _run
