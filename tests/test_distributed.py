"""DistributedDataParallel training: 2 processes on CPU (gloo) via torchrun and via `edgecnn train --nproc`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edgecnn.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")

ARGS = ["--per-class", "100", "--epochs", "3", "--lr", "0.002", "--seed", "0", "--no-progress"]


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    r = subprocess.run([sys.executable, "-m", "edgecnn", "train", "--nproc", "2", *ARGS, "-o", str(out)],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


def test_two_processes_train_and_rank0_writes_once(ddp_run):
    out, log = ddp_run
    assert "distributed: 2 processes, backend gloo" in log
    assert "240 training images per process, batch 16 per process (32 global)" in log
    assert log.count("epoch 3/3:") == 1 and log.count("wrote ") == 1  # only rank 0 reports
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp.pt"]  # no temp files left behind
    ck = load_checkpoint(out)
    assert ck.summary["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 16}
    assert len(ck.summary["history"]) == 3 and ck.summary["train_images"] == 480


def test_same_accuracy_as_one_process_within_noise(ddp_run, tmp_path):
    from edgecnn.data import synthetic_dataset
    from edgecnn.train import TrainConfig, train

    one = train(synthetic_dataset(per_class=100, seed=0), TrainConfig(epochs=3, lr=2e-3, progress=False, seed=0),
                log=lambda s: None)
    ddp = load_checkpoint(ddp_run[0]).summary["val_accuracy"]
    assert one.val_accuracy > 0.4 and ddp > 0.4  # both learn (6 classes: chance is 17%; 3 short epochs)
    assert abs(ddp - one.val_accuracy) <= 0.12, (ddp, one.val_accuracy)  # 120 validation images


def test_checkpoint_exports_and_passes_verify(ddp_run, run_cli, tmp_path):
    onnx = tmp_path / "ddp.onnx"
    r = run_cli("export", ddp_run[0], "-o", onnx)
    assert r.exit_code == 0, r.output
    r = run_cli("verify", onnx, "--against", ddp_run[0], "--runtime", "ort-cpu")
    assert r.exit_code == 0, r.output
    assert "pass" in r.output and "reference  PyTorch eager" in r.output


def test_torchrun_module_form(tmp_path):
    out = tmp_path / "tr.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgecnn", "train", "--per-class", "20", "--epochs", "1", "--no-progress", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: 2 processes" in r.stderr
    assert load_checkpoint(out).summary["distributed"]["world_size"] == 2


def test_nproc_refuses_bad_output_before_launching(run_cli, tmp_path):
    r = run_cli("train", "--nproc", "2", "-o", tmp_path / "model.onnx")
    assert r.exit_code == 2 and ".pt" in r.output
    r = run_cli("train", "--nproc", "0", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2
