"""Multi-process training on PyTorch DistributedDataParallel, launched by torchrun (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from edgecnn.runtimes.cpu import usable_cpus

from .checkpoint import save_checkpoint
from .data import Dataset, split
from .errors import InvalidInputError, RuntimeUnavailableError
from .model import Net
from .train import TrainConfig, TrainResult, _progress, make_checkpoint


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def under_torchrun() -> bool:
    """True inside a process torchrun started with more than one process in the job."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> DistInfo:
    """Join the job torchrun set up (env:// rendezvous): nccl when this process has a GPU, else gloo."""
    if not dist.is_available():
        raise RuntimeUnavailableError("this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend, device = "nccl", torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif dist.is_gloo_available():
        backend, device = "gloo", torch.device("cpu")
    else:
        raise RuntimeUnavailableError("torch.distributed has neither nccl (with a GPU) nor gloo here")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


class _Indices:
    """A sized stand-in dataset for DistributedSampler: the sampler only needs len()."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _all_sum(info: DistInfo, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def train_ddp(ds: Dataset, cfg: TrainConfig, out: str | os.PathLike, log: Callable[[str], None] | None = None
              ) -> TrainResult:
    """One rank of a DDP job: the same split, normalization and schedule as ``train``; rank 0 writes ``out``.

    Every rank builds the same data set from the seed; a DistributedSampler gives each rank a
    disjoint shard of the training split every epoch. The per-process batch is
    ceil(batch_size / world_size), so the global batch, the number of optimizer steps and the
    learning-rate schedule match a one-process run. Validation is sharded and summed with all_reduce.
    """
    if cfg.epochs < 1:
        raise InvalidInputError("epochs must be >= 1")
    if cfg.batch_size < 1:
        raise InvalidInputError("batch size must be >= 1")
    info = init_process_group()
    try:
        return _train_rank(info, ds, cfg, Path(out), log)
    finally:
        dist.destroy_process_group()


def _train_rank(info: DistInfo, ds: Dataset, cfg: TrainConfig, out: Path, log) -> TrainResult:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from .train import evaluate, one_cycle

    main = info.rank == 0
    say = (log or (lambda s: print(s, file=sys.stderr))) if main else (lambda s: None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_ds, val_ds = split(ds, cfg.val_fraction, cfg.seed)
    if len(train_ds) < info.world_size or len(val_ds) == 0:
        raise InvalidInputError("not enough images to split across the processes and a validation set")
    mean, std = cfg.norm or train_ds.mean_std()
    xt = torch.from_numpy(train_ds.tensors(mean, std))
    yt = torch.from_numpy(train_ds.labels)
    shard = slice(info.rank, None, info.world_size)  # validation: every rank a disjoint part
    xv = torch.from_numpy(val_ds.tensors(mean, std)[shard]).to(info.device)
    yv = torch.from_numpy(val_ds.labels[shard]).to(info.device)

    net = Net(len(ds.class_names)).to(info.device)
    ddp = DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    batch = math.ceil(cfg.batch_size / info.world_size)
    sampler = DistributedSampler(_Indices(len(yt)), num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)  # pads to equal shards
    steps_per_epoch = math.ceil(len(sampler) / batch)
    opt = torch.optim.Adam(ddp.parameters(), lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * info.rank)
    say(f"distributed: {info.world_size} processes, backend {info.backend}, device {info.device.type}, "
        f"{len(sampler)} training images per process, batch {batch} per process ({batch * info.world_size} global)")
    history: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        ddp.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)
        total, seen = 0.0, 0
        bar = _progress(range(0, len(order), batch), f"epoch {epoch}/{cfg.epochs}", cfg.progress and main)
        for i in bar:
            idx = order[i : i + batch]
            xb, yb = xt[idx].to(info.device), yt[idx].to(info.device)
            if torch.rand(1, generator=gen).item() < 0.5:  # horizontal flip, as in one-process training
                xb = xb.flip(3)
            loss = nn.functional.cross_entropy(ddp(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of all ranks here
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        val_loss, val_acc = evaluate(net, xv, yv) if len(yv) else (0.0, 0.0)
        t_sum, t_n, v_loss, v_ok, v_n = _all_sum(info, total, seen, val_loss * len(yv), val_acc * len(yv), len(yv))
        row = {"epoch": epoch, "train_loss": t_sum / t_n, "val_loss": v_loss / v_n, "val_accuracy": v_ok / v_n}
        history.append(row)
        say(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"val accuracy {row['val_accuracy'] * 100:.2f}%")
    seconds = time.perf_counter() - t0
    ckpt = make_checkpoint(net, ds, mean, std, cfg, history, len(yt), len(val_ds), seconds,
                           distributed={"world_size": info.world_size, "backend": info.backend,
                                        "batch_per_process": batch})
    if main:
        save_checkpoint(ckpt, out)  # once, by rank 0 (atomic: temp file, then rename)
    dist.barrier()  # nobody reports success before the checkpoint exists
    return TrainResult(ckpt, history, history[-1]["val_accuracy"], seconds)


def launch(nproc: int, train_args: Sequence[str]) -> int:
    """``edgecnn train --nproc N``: run ``torchrun --standalone --nproc_per_node N -m edgecnn train ...``."""
    if nproc < 1:
        raise InvalidInputError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "edgecnn", "train", *train_args]
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # share the cores instead of every process taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // nproc))
    return subprocess.run(cmd, env=env).returncode
