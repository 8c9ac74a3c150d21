"""Training the seed Net: reproducible from a seed, a progress bar, per-epoch loss and validation accuracy."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, save_checkpoint
from .data import Dataset, split
from .errors import InvalidInputError
from .model import Net


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    val_fraction: float = 0.2
    threads: int | None = None
    progress: bool = True
    norm: tuple[list[float], list[float]] | None = None  # (mean, std) given by the user; else measured


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    history: list[dict] = field(default_factory=list)
    val_accuracy: float = 0.0
    seconds: float = 0.0


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) of net on (x, y)."""
    net.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            out = net(x[i : i + batch])
            loss_sum += nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    return loss_sum / max(len(y), 1), correct / max(len(y), 1)


def train(ds: Dataset, cfg: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a Net on ``ds`` (split into train/validation) and return its checkpoint and history."""
    if cfg.epochs < 1:
        raise InvalidInputError("epochs must be >= 1")
    if cfg.batch_size < 1:
        raise InvalidInputError("batch size must be >= 1")
    log = log or (lambda s: print(s, file=sys.stderr))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_ds, val_ds, note = split_for_training(ds, cfg.val_fraction, cfg.seed)
    if note:
        log(note)
    mean, std = cfg.norm or train_ds.mean_std()
    xt = torch.from_numpy(train_ds.tensors(mean, std))
    yt = torch.from_numpy(train_ds.labels)
    xv = torch.from_numpy(val_ds.tensors(mean, std))
    yv = torch.from_numpy(val_ds.labels)

    net = Net(len(ds.class_names))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = one_cycle(opt, cfg.lr, cfg.epochs * ((len(yt) + cfg.batch_size - 1) // cfg.batch_size))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        perm = torch.randperm(len(yt), generator=gen)
        total, seen = 0.0, 0
        bar = _progress(range(0, len(yt), cfg.batch_size), f"epoch {epoch}/{cfg.epochs}", cfg.progress)
        for i in bar:
            idx = perm[i : i + cfg.batch_size]
            xb, yb = xt[idx], yt[idx]
            if torch.rand(1, generator=gen).item() < 0.5:  # horizontal flip: classes are mirror-invariant
                xb = xb.flip(3)
            loss = nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / seen:.4f}")
        val_loss, val_acc = evaluate(net, xv, yv)
        row = {"epoch": epoch, "train_loss": total / seen, "val_loss": val_loss, "val_accuracy": val_acc}
        history.append(row)
        log(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
            f"val accuracy {val_acc * 100:.2f}%")
    seconds = time.perf_counter() - t0
    ckpt = make_checkpoint(net, ds, mean, std, cfg, history, len(yt), len(yv), seconds)
    return TrainResult(ckpt, history, history[-1]["val_accuracy"], seconds)


def one_cycle(opt, lr: float, steps: int):
    """OneCycleLR over ``steps`` optimizer steps, or a constant rate when there are too few for its phases.

    OneCycleLR divides by the length of its warm-up phase (pct_start * steps - 1): with pct_start 0.25 and
    4 steps (a tiny folder for one epoch) that is 0 and it raises ZeroDivisionError; under 8 steps its
    phases are too short to mean anything anyway.
    """
    if steps >= 8:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def split_for_training(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset, str]:
    """The stratified split; with too few images for one (e.g. one image per class), validate on the
    training images and say so, rather than refusing."""
    if len(ds) == 0:
        raise InvalidInputError("no images to train on")
    train_ds, val_ds = split(ds, val_fraction, seed)
    if len(train_ds) == 0 or len(val_ds) == 0:
        return ds, ds, (f"note: {len(ds)} image(s) are too few for a validation split; validation accuracy "
                        "is measured on the training images (it says nothing about new images)")
    return train_ds, val_ds, ""


def make_checkpoint(net: nn.Module, ds: Dataset, mean, std, cfg: TrainConfig, history: list[dict],
                    n_train: int, n_val: int, seconds: float, **extra) -> Checkpoint:
    """The trained weights plus the metadata every checkpoint carries (one place for both trainers)."""
    net.eval()
    return Checkpoint(
        state_dict={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        num_classes=len(ds.class_names), class_names=list(ds.class_names), mean=mean, std=std,
        summary={"val_accuracy": history[-1]["val_accuracy"], "epochs": cfg.epochs, "seed": cfg.seed,
                 "train_images": n_train, "val_images": n_val, "seconds": round(seconds, 1),
                 "history": history, "val_fraction": cfg.val_fraction, **extra},
    )


def train_to_file(ds: Dataset, cfg: TrainConfig, out: str | os.PathLike, log=None) -> TrainResult:
    res = train(ds, cfg, log)
    save_checkpoint(res.checkpoint, Path(out))
    return res


def _progress(it, desc: str, enabled: bool):
    """A bar over one epoch's batches on a terminal (the per-epoch lines say the rest, in a log too)."""
    from .progress import bar, on_terminal

    return bar(it, desc=desc, unit="batch", enabled=enabled and on_terminal())


def train_command(data, epochs: int, batch_size: int, lr: float, seed: int, per_class: int, val_fraction: float,
                  threads: int | None, output, progress: bool, norm=None, log=None) -> TrainResult:
    """`edgecnn train`: check the numbers, load the data (built-in set or DIR/<class>/<image>), train in this
    process or as one rank of a torchrun DDP job, write the checkpoint."""
    from .data import load_dataset

    log = log or (lambda s: None)

    out = Path(output)
    if out.suffix.lower() not in (".pt", ".pth"):
        raise InvalidInputError(f"{out}: the checkpoint file must end in .pt")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--per-class", per_class)):
        if value < 1:
            raise InvalidInputError(f"{name} must be >= 1, got {value}")
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInputError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    ds = load_dataset(data, per_class=per_class, seed=seed)
    if os.environ.get("RANK", "0") == "0":
        log(f"data: {len(ds)} images, {len(ds.class_names)} classes ({', '.join(ds.class_names)})")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, val_fraction=val_fraction,
                      threads=threads, progress=progress, norm=norm)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one rank of a DDP job
        from .distributed import train_ddp

        return train_ddp(ds, cfg, out, log=log)
    return train_to_file(ds, cfg, out, log=log)
