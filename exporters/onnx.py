"""PyTorch checkpoint -> ONNX: fixed 1x3x64x64 input (or a symbolic batch), metadata, full check, parity."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from edgecnn._io import atomic_path
from edgecnn.checkpoint import Checkpoint, load_checkpoint
from edgecnn.errors import InvalidInputError, MissingDependencyError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 21


@dataclass
class ExportResult:
    path: Path
    opset: int
    dynamic_batch: bool
    parity: list = field(default_factory=list)  # VerifyRow per parity check that ran
    verdict: object = None  # edgecnn.verify.Verdict of the check
    passes: list = field(default_factory=list)  # graph passes applied (name, detail)
    note: str | None = None  # which labels / normalization were assumed, and how to set them


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("onnx", "cpu", "export") from None
    return onnx


def torch_to_onnx(ckpt: Checkpoint, path: Path, opset: int, dynamic_batch: bool) -> None:
    """Trace the checkpoint's Net into ``path`` (TorchScript exporter: compact Flatten/Gemm graph)."""
    import torch

    net = ckpt.build_model()
    dummy = torch.zeros(1, 3, ckpt.input_size, ckpt.input_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False)


def add_metadata(model, meta: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *, opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = False, check: bool = True, data: str | os.PathLike | None = None,
           rtol: float | None = None, atol: float | None = None, optimize: bool = True,
           embed_preprocessing: bool = False, embed_softmax: bool = False, class_names: list[str] | None = None,
           mean: list[float] | None = None, std: list[float] | None = None) -> ExportResult:
    """Export ``checkpoint`` to ONNX at ``out`` (default: beside it, .onnx).

    The file is written to a temp path, checked with onnx.checker (full_check), compared with
    PyTorch on ONNX Runtime CPU, and only then renamed into place. ``optimize`` applies the exact
    graph passes of edgecnn.exporters.passes (recorded in ``result.passes``). ``embed_preprocessing``
    makes the input raw uint8 RGB (N, H, W, 3) with the normalization inside the graph
    (edgecnn.exporters.embed); ``embed_softmax`` also ends the graph in Softmax. ``class_names``,
    ``mean``, ``std`` replace what the checkpoint carries (or the defaults it would get: then
    ``result.note`` says what was assumed).
    """
    if embed_softmax and not embed_preprocessing:
        raise InvalidInputError("--embed-softmax needs --embed-preprocessing")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidInputError(f"opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    onnx = _import_onnx()
    from edgecnn.checkpoint import assumption_note, with_overrides

    ckpt = with_overrides(load_checkpoint(checkpoint), class_names, mean, std)
    out = Path(out) if out is not None else Path(checkpoint).with_suffix(".onnx")
    if out.suffix.lower() != ".onnx":
        raise InvalidInputError(f"{out}: the output file must end in .onnx")
    result = ExportResult(out, opset, dynamic_batch, note=assumption_note(ckpt))
    with atomic_path(out) as tmp:
        torch_to_onnx(ckpt, tmp, opset, dynamic_batch)
        model = onnx.load(str(tmp))
        add_metadata(model, ckpt.onnx_metadata())
        model.producer_name = "edgecnn"
        if optimize:
            from .passes import optimize as run_passes

            result.passes = [(p.name, p.detail) for p in run_passes(model)]
        if embed_preprocessing:
            from . import embed

            result.passes.append(("embed-preprocessing", embed.embed_preprocessing(
                model, ckpt.mean, ckpt.std, softmax=embed_softmax)))
            add_metadata(model, embed.embedded_metadata(embed_softmax))
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        if check:
            from edgecnn.verify import judge

            result.verdict = judge(tmp, ckpt, runtimes=["ort-cpu"], precision="fp32", rtol=rtol, atol=atol, data=data,
                                   name=out.name)
            result.parity = result.verdict.rows
            result.verdict.raise_for_status(f"; {out} was not written")
    return result
