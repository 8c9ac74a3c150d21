"""The edgecnn command line: demo, train, export, verify, bench, predict, runtimes."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import (
    EXIT_INTERNAL,
    EdgeCNNError,
    InvalidInputError,
    MissingDependencyError,
    RuntimeUnavailableError,
)

# optional package -> the pip extra that installs it
_EXTRA_FOR = {"torch": "cpu", "onnx": "cpu", "tqdm": "cpu", "onnxruntime": "device", "openvino": "openvino",
              "nncf": "quantize", "matplotlib": "plot"}


def _clear_progress() -> None:
    """Close every live tqdm bar (they write to stderr with leave=False, so closing clears the line)."""
    mod = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(mod, "tqdm", None), "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a broken bar must not hide the error line
            pass


class _Group(click.Group):
    """Turns every EdgeCNNError into one line on stderr and its exit code; never a traceback.

    click's own usage errors (a missing required option, a bad value, an unknown option or command)
    become one ``edgecnn: error:`` line with exit code 2 too, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.ClickException as e:
            _clear_progress()
            msg = " ".join(e.format_message().split())
            where = getattr(getattr(e, "ctx", None), "command_path", None)
            hint = f" (see '{where} --help')" if isinstance(e, click.UsageError) and where else ""
            click.echo(f"edgecnn: error: {msg}{hint}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        except click.exceptions.Abort:
            _clear_progress()
            click.echo("edgecnn: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeCNNError as e:
            _clear_progress()
            click.echo(f"edgecnn: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            _clear_progress()
            click.echo("edgecnn: interrupted", err=True)
            ctx.exit(130)
        except ModuleNotFoundError as e:
            # An optional dependency this command needs is missing (e.g. `export` on the torch-free
            # device install): name the extra that brings it, exit 3 like any unavailable runtime.
            top = (e.name or "").split(".")[0]
            if top not in _EXTRA_FOR:
                raise
            err = MissingDependencyError(top, _EXTRA_FOR[top], f"`{ctx.invoked_subcommand}`")
            _clear_progress()
            click.echo(f"edgecnn: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("EDGECNN_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _clear_progress()
            click.echo(f"edgecnn: internal error: {type(e).__name__}: {first[:200]} "
                       f"(set EDGECNN_DEBUG=1 for a traceback and report it)", err=True)
            ctx.exit(EXIT_INTERNAL)


def _csv_ints(ctx, param, value):
    if value is None:
        return None
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter("values must be >= 1")
    return out


def _csv(ctx, param, value):
    if value is None:
        return None
    if isinstance(value, tuple):
        value = ",".join(value)
    return [v.strip() for v in value.split(",") if v.strip()]


def _options(ctx, param, value) -> list:
    """-O [RUNTIME.]KEY=VALUE (repeatable) -> RawOption list; typed and routed per runtime by the command
    (edgecnn.runtimes.options: each runtime declares its options once)."""
    from edgecnn.runtimes import runtime_names
    from edgecnn.runtimes.options import parse_cli

    return parse_cli(value or (), runtime_names())


def _option_help() -> str:
    from edgecnn.runtimes.options import cli_help

    return cli_help()


_OPTION_HELP = _option_help()


def _judge_options(f):
    """--data / --rtol / --atol, declared once for the commands that run the judge (export, verify)."""
    f = click.option("--atol", type=float, default=None, help="Override the precision's default atol.")(f)
    f = click.option("--rtol", type=float, default=None, help="Override the precision's default rtol.")(f)
    return click.option("--data", type=click.Path(), default=None,
                        help="Image folder root/<class>/<image> for the judge's data-set inputs [default: the "
                             "built-in set].")(f)


def _stated_options(f):
    """--labels / --mean / --std, declared once: what export records, and what verify/package check against
    where the checkpoint carries none (a bare state_dict)."""
    f = click.option("--std", default=None, metavar="R,G,B", help="Normalization std on the 0..1 scale, e.g. "
                     "0.229,0.224,0.225 [default: the checkpoint's; export: else 0.25,0.25,0.25].")(f)
    f = click.option("--mean", default=None, metavar="R,G,B", help="Normalization mean on the 0..1 scale, e.g. "
                     "0.485,0.456,0.406 [default: the checkpoint's; export: else 0.5,0.5,0.5].")(f)
    return click.option("--labels", default=None, metavar="FILE|a,b,c|DIR",
                        help="Class names: a file with one name a line, a comma list, or an ImageFolder (its "
                             "sorted class folders) [default: the checkpoint's; export: else class_0..].")(f)


def _stated(labels, mean, std) -> dict:
    """The parsed --labels/--mean/--std (None where not given); bad values fail here (exit 2)."""
    from .labels import parse_labels, parse_triple

    return {"class_names": parse_labels(labels) if labels is not None else None,
            "mean": parse_triple(mean, "--mean") if mean is not None else None,
            "std": parse_triple(std, "--std", positive=True) if std is not None else None}


def _write_json(path: str, obj) -> None:
    from ._io import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
    click.echo(f"wrote {path}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgecnn")
def cli():
    """Train, export, verify, benchmark and deploy a small CNN image classifier."""
    warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------- train
@cli.command()
@click.option("--data", type=click.Path(), default=None, help="Image folder root/<class>/<image>; default: built-in synthetic set.")
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--per-class", type=int, default=2000, show_default=True, help="Built-in set: images per class.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads.")
@click.option("-o", "--output", type=click.Path(), default="model.pt", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--nproc", type=int, default=None,
              help="Train with N processes (DistributedDataParallel via torchrun; gloo on CPU, nccl on GPU).")
@click.option("--mean", default=None, metavar="R,G,B", help="Normalization mean (0..1 scale) [default: measured "
              "on the training images].")
@click.option("--std", default=None, metavar="R,G,B", help="Normalization std [default: measured on the training images].")
def train(data, epochs, batch_size, lr, seed, per_class, val_fraction, threads, output, progress, nproc, mean, std):
    """Train the seed Net and write a checkpoint with its metadata (class names: the --data class folders)."""
    from .labels import parse_triple

    if (mean is None) != (std is None):
        raise InvalidInputError("give --mean and --std together")
    norm = (parse_triple(mean, "--mean"), parse_triple(std, "--std", positive=True)) if mean is not None else None
    if nproc is not None and not os.environ.get("RANK"):
        from .distributed import launch

        if Path(output).suffix.lower() not in (".pt", ".pth"):
            raise InvalidInputError(f"{output}: the checkpoint file must end in .pt")
        if data is not None and not Path(data).is_dir():
            raise InvalidInputError(f"{data}: no such file or folder")
        args = ["--epochs", epochs, "--batch-size", batch_size, "--lr", lr, "--seed", seed, "--per-class", per_class,
                "--val-fraction", val_fraction, "-o", output, "--progress" if progress else "--no-progress"]
        args += (["--data", data] if data else []) + (["--threads", threads] if threads else [])
        args += ["--mean", mean, "--std", std] if norm else []
        rc = launch(nproc, [str(a) for a in args])
        if rc != 0:
            click.echo(f"edgecnn: error: distributed training failed (torchrun exit code {rc})", err=True)
            sys.exit(1)
        return
    res = _train(data, epochs, batch_size, lr, seed, per_class, val_fraction, threads, output, progress, norm)
    if os.environ.get("RANK", "0") != "0":
        return
    click.echo(f"validation accuracy {res.val_accuracy * 100:.2f}% after {len(res.history)} epochs "
               f"({res.seconds:.0f} s); wrote {output}")


def _train(data, epochs, batch_size, lr, seed, per_class, val_fraction, threads, output, progress, norm=None):
    from .train import train_command

    return train_command(data, epochs, batch_size, lr, seed, per_class, val_fraction, threads, output, progress,
                         norm, log=lambda s: click.echo(s, err=True))


# ---------------------------------------------------------------------------------------------- export
@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Default: the checkpoint's name with .onnx.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis symbolic (default: fixed 1x3x64x64).")
@click.option("--check/--no-check", default=True, show_default=True, help="Parity check against PyTorch on ort-cpu.")
@_judge_options
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Apply the exact graph passes (bit-identical logits), e.g. Elu->MaxPool to MaxPool->Elu.")
@click.option("--embed-preprocessing", is_flag=True,
              help="Input uint8 RGB [N,64,64,3]; cast, /255, mean/std and layout change inside the graph.")
@click.option("--embed-softmax", is_flag=True, help="With --embed-preprocessing: output probabilities, not logits.")
@_stated_options
def export(checkpoint, output, opset, dynamic_batch, check, data, rtol, atol, optimize, embed_preprocessing,
           embed_softmax, labels, mean, std):
    """Export a checkpoint (edgecnn's or a bare Net state_dict) to ONNX, checked against PyTorch."""
    given = _stated(labels, mean, std)
    res = _export(checkpoint, output, opset, dynamic_batch, check, data, rtol, atol, optimize,
                  embed_preprocessing=embed_preprocessing, embed_softmax=embed_softmax, **given)
    if res.note:
        click.echo(res.note, err=True)
    for name, detail in res.passes:
        click.echo(f"graph pass {name}: {detail}")
    if not optimize:
        click.echo("graph passes: off (--no-optimize)")
    if res.verdict is not None:
        click.echo(res.verdict.text(per_class=False))
    n = 'batch' if res.dynamic_batch else 1
    spec = f"uint8 [{n},64,64,3]" if embed_preprocessing else f"[{n},3,64,64]"
    click.echo(f"wrote {res.path} (opset {res.opset}, input {spec})")


def _export(checkpoint, output, opset, dynamic_batch, check, data, rtol, atol, optimize=True, **embed):
    from edgecnn.exporters.onnx import export as do_export

    return do_export(checkpoint, output, opset=opset, dynamic_batch=dynamic_batch, check=check, data=data,
                     rtol=rtol, atol=atol, optimize=optimize, **embed)


# ---------------------------------------------------------------------------------------------- verify
@cli.command()
@click.argument("model", type=click.Path())
@click.option("--against", "against", type=click.Path(), required=True, help="The PyTorch checkpoint (.pt): the reference.")
@click.option("--runtime", "runtimes", default="ort-cpu", show_default=True, callback=_csv,
              help="Comma-separated runtimes that run MODEL, or 'all' (every runtime x every precision it supports).")
@click.option("--precision", default=None,
              help="Compute precision for an fp32 graph: fp32, fp16, bf16 [default: fp32; with --runtime all: every "
                   "one]. An int8/fp16 graph is judged at its own precision, read from the graph.")
@click.option("--max-drop", type=float, default=None, help="Override the top-1 accuracy drop allowed (points).")
@_judge_options
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the verdict as JSON.")
@click.option("--confusion", type=click.Path(), default=None,
              help="Also draw the confusion matrices (reference and each row) as a PNG (needs matplotlib).")
@click.option("--isolate", is_flag=True, help="Run the check in a child process (untrusted models: a crash becomes an error).")
@click.option("-O", "--option", "options", multiple=True, callback=_options, help=_OPTION_HELP)
@_stated_options
def verify(model, against, runtimes, precision, rtol, atol, max_drop, data, json_out, confusion, isolate, options,
           labels, mean, std):
    """Judge MODEL against the PyTorch checkpoint on each runtime; exit 1 on any failure."""
    if isolate:
        from .isolate import isolated_cli

        args = ["verify", str(model), "--against", str(against), "--runtime", ",".join(runtimes)]
        for flag, val in (("--precision", precision), ("--rtol", rtol), ("--atol", atol), ("--max-drop", max_drop),
                          ("--data", data), ("--json", json_out), ("--confusion", confusion), ("--labels", labels),
                          ("--mean", mean), ("--std", std)):
            if val is not None:
                args += [flag, str(val)]
        for o in options:
            args += ["-O", str(o)]
        sys.exit(isolated_cli(args, f"verifying {model}"))

    verdict = _verify(model, against, runtimes, precision, rtol, atol, data, options, max_drop,
                      _stated(labels, mean, std))
    click.echo(verdict.text())
    if json_out:
        _write_json(json_out, verdict.as_dict())
    if confusion:
        from .verify import confusion_plot

        confusion_plot(verdict, confusion)
        click.echo(f"wrote {confusion}", err=True)
    verdict.raise_for_status()


def _verify(model, against, runtimes, precision, rtol, atol, data, options=None, max_drop=None, stated=None):
    from .verify import judge

    every = runtimes == ["all"]
    per_runtime = None
    if options:  # typed and routed before any runtime is loaded: a bad option fails here (exit 2)
        from edgecnn.runtimes import get_runtime_class, runtime_names
        from edgecnn.runtimes.options import route_registered

        names = runtime_names() if every else [get_runtime_class(n).name for n in runtimes]
        per_runtime = route_registered(options, names)
    return judge(model, against, runtimes=None if every else runtimes, precision=precision,
                 rtol=rtol, atol=atol, max_drop=max_drop, data=data, per_runtime_options=per_runtime, stated=stated)


# ---------------------------------------------------------------------------------------------- bench
@cli.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--runtime", "runtimes", default="ort-cpu", show_default=True, callback=_csv,
              help="Comma-separated runtimes (ort-cpu, openvino, torch, ort-cuda, ...), or 'all' (those not "
                   "usable here are listed as skipped, with the reason).")
@click.option("--precision", "precisions", default="fp32", show_default=True, callback=_csv,
              help="Comma-separated: fp32, bf16, fp16, int8 (int8 uses MODEL's .int8 sibling or quantizes it).")
@click.option("--batch", "batches", default="1,8,64", show_default=True, callback=_csv_ints)
@click.option("--threads", default=None, callback=_csv_ints, help="Comma-separated thread counts (default: the runtime's).")
@click.option("--min-time", type=float, default=1.0, show_default=True, help="Seconds of timed runs per cell.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--roofline/--no-roofline", default=True, show_default=True, help="Measure the fp32 peak for the roofline line.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write every number as JSON.")
@click.option("--csv", "csv_out", type=click.Path(), default=None, help="Write the rows as CSV.")
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="Draw throughput and latency (PNG).")
@click.option("-O", "--option", "options", multiple=True, callback=_options, help=_OPTION_HELP)
def bench(model, runtimes, precisions, batches, threads, min_time, warmup, roofline, json_out, csv_out, plot_out,
          options):
    """Latency percentiles and throughput, swept over runtime x precision x threads x batch.

    MODEL: an .onnx (or a deploy.json from `edgecnn tune`); without it, a freshly exported default Net.
    Each configuration runs in its own process: cold start and peak memory are its own.
    """
    from . import sweep as sw
    from ._io import write_text_atomic

    if plot_out:
        from edgecnn.runtimes._deps import has_module

        if not has_module("matplotlib"):
            from .errors import MissingDependencyError

            raise MissingDependencyError("matplotlib", "plot", "--plot")
    model, runtimes, precisions, threads, per_runtime = sw.resolve(
        model, runtimes, precisions, threads, options, log=lambda s: click.echo(s, err=True))
    cells = len(runtimes) * len(precisions) * len(threads) * len(batches)
    bar = _bar(cells)
    res = sw.sweep(model, runtimes, precisions, batches, threads, min_time=min_time, warmup=warmup,
                   roofline=roofline, log=lambda s: click.echo(s, err=True), progress=lambda r: bar.update(1),
                   options=per_runtime)
    bar.close()
    click.echo(sw.table(res))
    if json_out:
        _write_json(json_out, {"model": str(model) if model else "default Net (random weights)", **res.as_dict()})
    if csv_out:
        write_text_atomic(csv_out, sw.to_csv(res))
        click.echo(f"wrote {csv_out}", err=True)
    if plot_out:
        sw.plot(res, plot_out)
        click.echo(f"wrote {plot_out}", err=True)
    if not res.rows and not res.failed:
        raise RuntimeUnavailableError("no configuration could run here: " +
                                      "; ".join(f"{s['runtime']} {s['precision']}: {s['reason']}" for s in res.skipped))
    if res.failed:
        click.echo(f"edgecnn: error: {len(res.failed)} configuration(s) failed (their errors are in the table"
                   f"{' and the outputs' if json_out or csv_out else ''}); the other rows were measured", err=True)
        sys.exit(1)


def _bar(total: int):
    """bench's bar over its cells: on a terminal only (never bar fragments in a log)."""
    from .progress import bar

    return bar(total=total, desc="bench", unit="cell")


# ---------------------------------------------------------------------------------------------- quantize
@cli.command()
@click.argument("model", type=click.Path())
@click.option("--precision", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True)
@click.option("--backend", type=click.Choice(["ort", "openvino"]), default="ort", show_default=True,
              help="ort: ONNX Runtime QDQ .onnx; openvino: NNCF -> OpenVINO IR .xml/.bin.")
@click.option("--calib", default="builtin", show_default=True,
              help="Calibration images: a folder of your own images at any depth (labels come from class folders "
                   "named like the model's classes, if any; a held-out split is kept apart), or 'builtin' (the "
                   "demo's six classes only).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="ONNX Runtime calibration method [default: minmax].")
@click.option("--calib-samples", type=int, default=256, show_default=True)
@click.option("--heldout", default=None,
              help="Images for the accuracy report: a folder (labelled when its class folders are the model's "
                   "classes) or 'builtin' "
                   "[default: a held-out split of --calib, or the built-in set's held-out seed].")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Refuse (exit 1, nothing written) when held-out top-1 accuracy drops more (points).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Default: MODEL's name with .int8.onnx / .fp16.onnx (.xml for openvino).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the accuracy report as JSON.")
def quantize(model, precision, backend, calib, calib_method, calib_samples, heldout, max_drop, output, json_out):
    """Quantize an fp32 .onnx to int8 or fp16; an accuracy report on held-out images gates the output."""
    from edgecnn.exporters.quantize import quantize as do_quantize

    try:
        res = do_quantize(model, output, precision=precision, backend=backend, calib=calib,
                          calib_method=calib_method, calib_samples=calib_samples, max_drop=max_drop,
                          heldout=heldout, log=lambda s: click.echo(s, err=True))
    except EdgeCNNError as e:
        rep = getattr(e, "report", None)
        if rep is not None:
            click.echo(rep.table())
            if json_out:
                _write_json(json_out, rep.as_dict())
        raise
    for name, detail in res.passes:
        click.echo(f"graph pass {name}: {detail}")
    click.echo(res.report.table())
    for note in res.notes:
        click.echo(f"note: {note}")
    if json_out:
        _write_json(json_out, res.report.as_dict())
    rt = "openvino" if backend == "openvino" else "ort-cpu"
    click.echo(f"wrote {res.path}" + (f" and {Path(res.path).with_suffix('.bin').name}" if backend == "openvino" else "")
               + f" ({precision}; run it with --runtime {rt})")


# ---------------------------------------------------------------------------------------------- tune
@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Folder for the variants and deploy.json "
              "(default: MODEL's name + .tuned/).")
@click.option("--max-drop", type=float, default=1.0, show_default=True, help="Accuracy gate, in top-1 points.")
@click.option("--calib", default="builtin", show_default=True, help="Calibration/held-out data: a folder of images at any depth "
              "(labelled by class folders named like the model's classes, if any), or builtin (the demo's classes).")
@click.option("--runtime", "runtimes", default="ort-cpu,openvino", show_default=True, callback=_csv)
@click.option("--threads", default=None, callback=_csv_ints, help="Thread counts to try (default: 1 and all cores).")
@click.option("--batch", type=int, default=64, show_default=True, help="Batch the throughput objective is timed at.")
@click.option("--objective", type=click.Choice(["throughput", "latency"]), default="throughput", show_default=True)
@click.option("--int8/--no-int8", default=True, show_default=True, help="Try int8 variants (quantized here).")
@click.option("--min-time", type=float, default=1.0, show_default=True)
def tune(model, output, max_drop, calib, runtimes, threads, batch, objective, int8, min_time):
    """Try runtimes x precisions x threads x options; keep those passing the accuracy gate; write the fastest
    as deploy.json (load it with Classifier("deploy.json") or `edgecnn bench deploy.json`)."""
    from .report import table
    from .tune import final_line
    from .tune import table as tune_table
    from .tune import tune as do_tune

    cfg, cands = do_tune(model, output, max_drop=max_drop, calib=calib, threads=threads, batch=batch,
                         objective=objective, min_time=min_time, runtimes=runtimes, int8=int8,
                         log=lambda s: click.echo(s, err=True))
    click.echo(table(*tune_table(cands, batch)))
    click.echo("* the winner: deploy.json's configuration, re-timed alone in a fresh process")
    where = Path(output) if output else Path(model).with_name(Path(model).stem + ".tuned")
    click.echo(final_line(cfg, where / "deploy.json"))


# ---------------------------------------------------------------------------------------------- predict
@cli.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--top-k", type=int, default=1, show_default=True)
@click.option("--runtime", default=None, help="Runtime [default: the deploy.json's or bundle's, else ort-cpu].")
@click.option("--isolate", is_flag=True, help="Run in a child process (untrusted models: a crash becomes an error).")
@click.option("-O", "--option", "options", multiple=True, callback=_options, help=_OPTION_HELP)
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Write the rows to FILE: .csv, .jsonl or .parquet (the parquet extra). Default: lines on stdout.")
@click.option("--resume", is_flag=True, help="Continue -o FILE: skip the paths already in it.")
@click.option("--force", is_flag=True, help="Replace an existing -o FILE.")
@click.option("--fast-decode", is_flag=True,
              help="Decode JPEGs at reduced scale (Pillow draft mode): several times faster, top-1 agreement in README.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per runtime call.")
@click.option("--workers", type=int, default=None, help="Decode threads (ray: local CPUs) [default: one per core].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: Ray Data on a local Ray instance (the ray extra), or the cluster of --address.")
@click.option("--address", "--ray-address", "ray_address", default=None, metavar="HOST:PORT",
              help="Join this existing Ray cluster (HOST:PORT of `ray start --head`, ray://HOST:10001 or auto); "
                   "implies --engine ray (with --engine local: an error).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: on a terminal].")
def predict(model, images, top_k, runtime, isolate, options, output, resume, force, fast_decode, batch_size,
            workers, engine, ray_address, progress):
    """Classify images, folders (recursive), globs or .txt lists of paths: one row per file."""
    from . import bulk

    if ray_address:
        from click.core import ParameterSource

        explicit = click.get_current_context().get_parameter_source("engine") is not ParameterSource.DEFAULT
        if engine == "local" and explicit:
            raise InvalidInputError("--address joins a Ray cluster: it runs with --engine ray, not --engine local")
        engine = "ray"
    if isolate:
        from .isolate import isolated_cli

        args = ["predict", str(model), *map(str, images), "--top-k", str(top_k), "--batch-size", str(batch_size),
                "--engine", engine] + (["--runtime", runtime] if runtime else [])
        for o in options:
            args += ["-O", str(o)]
        args += (["-o", str(output)] if output else []) + (["--workers", str(workers)] if workers else [])
        args += [flag for flag, on in (("--resume", resume), ("--force", force), ("--fast-decode", fast_decode),
                                       ("--progress", progress), ("--no-progress", progress is False)) if on]
        args += ["--address", ray_address] if ray_address else []
        sys.exit(isolated_cli(args, f"running {model}"))

    def shown(text: str) -> str:  # one line per file: control characters in names and labels are escaped
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

    def echo(row: dict) -> None:
        name = shown(row["path"])
        if row["error"] is not None:
            click.echo(f"{name}: error: {shown(row['error'])}")
            return
        click.echo(f"{name}: " + ", ".join(f"{shown(row[f'label_{i}'])} {row[f'prob_{i}']:.4f}"
                                           for i in range(1, top_k + 1) if row[f"label_{i}"] is not None))

    from edgecnn.runtimes.deploy import resolve
    from edgecnn.runtimes.options import route_registered

    target = runtime or resolve(model).runtime  # the deploy config's or bundle's runtime takes the options
    typed = route_registered(options, [target])[target]  # typed before any model is loaded (exit 2)
    opts = bulk.BulkOptions(top_k=top_k, runtime=runtime, options=typed, batch_size=batch_size, workers=workers,
                            fast_jpeg=fast_decode, engine=engine, ray_address=ray_address, resume=resume,
                            force=force, progress=progress)
    try:
        s = bulk.run(model, list(images), output, opts, echo, log=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        where = f"; the rows done are in {output} (--resume continues)" if output else ""
        click.echo(f"edgecnn: interrupted{where}", err=True)
        sys.exit(130)
    if output or progress:
        skipped = f", {s.skipped:,} already in {output}" if s.skipped else ""
        ray = (f"; Ray start-up and shutdown {s.ray_overhead_seconds:.1f} s more, not in the rate"
               if s.ray_overhead_seconds >= 0.05 else "")
        click.echo(f"edgecnn: {s.done:,} images in {s.seconds:.1f} s ({s.rate:,.0f} img/s), {s.failed:,} failed"
                   f"{skipped}" + (f" -> {output}" if output else "") + ray, err=True)
    if s.failed:
        first = "; ".join(s.failures[:3]).replace("\n", "\\n").replace("\r", "\\r")
        click.echo(f"edgecnn: error: {s.failed:,} of {s.done:,} images could not be read ({first}"
                   f"{', ...' if s.failed > 3 else ''})", err=True)
        sys.exit(2 if s.failed == s.done else 1)  # 2: nothing could be read at all


# ---------------------------------------------------------------------------------------------- package
@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="The bundle folder to write.")
@click.option("--check", "check_only", is_flag=True, help="Re-verify the sha256 of every file of the bundle PATH.")
@click.option("--against", type=click.Path(), default=None,
              help="Checkpoint (.pt): verify every model against it on ort-cpu and record the rows.")
@click.option("--verify-json", type=click.Path(), default=None, help="Record this `edgecnn verify --json` output.")
@click.option("--bench-json", type=click.Path(), default=None, help="Record this `edgecnn bench --json` summary.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
@_stated_options
def package(paths, output, check_only, against, verify_json, bench_json, force, labels, mean, std):
    """Write a device bundle (models, labels, manifest, requirements, predict.py), or --check one."""
    from . import package as pkg

    if check_only:
        if len(paths) != 1 or output:
            raise InvalidInputError("usage: edgecnn package --check BUNDLE_DIR")
        manifest = pkg.check_bundle(paths[0])
        click.echo(f"ok: {len(manifest['files'])} files in {paths[0]} match {pkg.MANIFEST}")
        return
    if not output:
        raise InvalidInputError("give the bundle folder with -o/--output")
    stated = _stated(labels, mean, std)
    if any(v is not None for v in stated.values()) and not against:
        raise InvalidInputError("--labels/--mean/--std state what --against's checkpoint lacks: give --against too")
    manifest = pkg.build_bundle(list(paths), output, against=against, verify_json=verify_json,
                                bench_json=bench_json, force=force, stated=stated)
    for name in sorted(manifest["files"]) + [pkg.MANIFEST]:
        click.echo(f"  {name}")
    if manifest["verify"]:
        click.echo("verify: " + ", ".join(f"{r.get('model', '')} {r.get('runtime')} {r.get('status')}"
                                          for r in manifest["verify"]))
    click.echo(f"wrote {output}/ ({len(manifest['files']) + 1} files); on the device: "
               f"pip install -r requirements.txt && python predict.py IMAGE...")


# ---------------------------------------------------------------------------------------------- runtimes
@cli.command("runtimes")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write the report as JSON.")
def runtimes_cmd(json_out):
    """List every registered runtime: usable here or why not, package versions, devices seen."""
    from edgecnn.runtimes.cpu import defaults_for, describe_cpu

    from .doctor import report_table, runtime_report

    rows = runtime_report()
    cpu = describe_cpu()
    d = defaults_for(cpu)
    click.echo(f"CPU: {cpu.text()}\ndefaults on this CPU (runtimes/cpu.py; -O overrides): threads={d.threads}, "
               f"ort-cpu spinning={str(d.spinning).lower()}, openvino hint={d.openvino_hint}, openvino hyper_threading="
               f"{str(d.openvino_hyper_threading).lower()}, tune tries bf16: "
               f"{'yes' if d.bf16_candidates else 'no (not native here)'}, serve on ort-cpu: "
               + (f"{d.serve_instances} single-thread instances, {d.serve_call_rows} rows a call" if d.serve_instances > 1
                  else "1 instance") + "\n")
    click.echo(report_table(rows))
    if json_out:
        _write_json(json_out, [r.as_dict() for r in rows])


cli.add_command(runtimes_cmd, "doctor")


# ---------------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("-o", "--output", type=click.Path(), default="edgecnn-demo", show_default=True,
              help="Folder for the demo's artefacts.")
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--per-class", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(output, epochs, per_class, seed, progress):
    """Train on the built-in set, export, verify, benchmark; print one summary table."""
    from .demo import run_demo

    if not run_demo(output, epochs, per_class, seed, progress, out=click.echo, log=lambda s: click.echo(s, err=True)):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- serve
@cli.command()
@click.argument("model", type=click.Path())
@click.option("--runtime", default=None, help="Runtime [default: the deploy.json's, else ort-cpu].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0: any free port, printed).")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="Most rows per model call (1: no batching, one request at a time).")
@click.option("--max-delay-ms", type=float, default=0.0, show_default=True,
              help="With --instances > 1: longest a free instance waits for more rows while another runs "
                   "(a lone request always runs at once; batches form while the model is busy).")
@click.option("--instances", type=int, default=None,
              help="Batches that may run at once, each on its own thread, the usable CPUs split between them "
                   "(a lone request still runs on all of them) [default: per CPU kind, see `edgecnn runtimes`: "
                   "1, or 2 single-thread instances on amd-epyc-avx512-bf16 with 2 CPUs; 1 for a runtime other "
                   "than ort-cpu or a pinned thread count].")
@click.option("--call-rows", type=int, default=None,
              help="Most queued rows one model call takes, at most --max-batch, so that several instances all "
                   "get work [default: --max-batch; per CPU kind with --instances > 1, see `edgecnn runtimes`].")
@click.option("--name", default=None, help="Model name in the URLs [default: the model file's stem].")
@click.option("--max-body-mb", type=float, default=16.0, show_default=True, help="Larger request bodies get 413.")
@click.option("--max-queue", type=int, default=None,
              help="Most rows waiting for the model; past it requests get 503 with Retry-After [default: 8 x --max-batch].")
@click.option("--max-concurrency", type=int, default=256, show_default=True,
              help="Most inference requests read, parsed, decoded, queued or run at once; past it 503 with Retry-After.")
@click.option("--read-timeout-s", type=float, default=10.0, show_default=True,
              help="A connection idle this long, or slower than this to send its headers or a body chunk, is closed.")
@click.option("--relax-batch/--no-relax-batch", default=True, show_default=True,
              help="Serve a fixed-batch ONNX model through a copy with a symbolic batch axis (else row by row).")
@click.option("-O", "--option", "options", multiple=True, callback=_options, help=_OPTION_HELP)
def serve(model, runtime, host, port, max_batch, max_delay_ms, instances, call_rows, name, max_body_mb, max_queue,
          max_concurrency, read_timeout_s, relax_batch, options):
    """Serve MODEL (file, deploy.json or bundle folder) over the KServe v2 protocol with dynamic batching."""
    from edgecnn.runtimes.cpu import current_defaults, usable_cpus
    from edgecnn.runtimes.deploy import resolve
    from edgecnn.runtimes.serve import ServeConfig, ServedModel
    from edgecnn.runtimes.serve import serve as run_server

    cfg = ServeConfig(host=host, port=port, max_batch=max_batch, max_delay_ms=max_delay_ms,
                      instances=1 if instances is None else instances, call_rows=call_rows,
                      max_body_bytes=int(max_body_mb * (1 << 20)), max_queue=max_queue,
                      max_concurrency=max_concurrency, read_timeout_s=read_timeout_s)
    cfg.check()
    typed: dict = {}
    d = resolve(model)
    target = runtime or d.runtime  # a deploy.json's or bundle's runtime takes the options
    if options:  # typed and checked against the runtime that will serve, before any model is loaded (exit 2)
        from edgecnn.runtimes.options import route_registered

        typed = route_registered(options, [target])[target]
    kind = current_defaults()
    if instances is None and target == "ort-cpu" and "threads" not in typed and d.threads is None:
        cfg.instances = kind.serve_instances  # measured per CPU kind (runtimes/cpu.py MEASURED["serve_instances"])
    if call_rows is None and cfg.instances > 1:
        cfg.call_rows = kind.serve_call_rows
    lone_threads = None
    if cfg.instances > 1 and "threads" not in typed:
        # N batches run at once on one model: split the usable CPUs between them, never more threads than
        # CPUs; a call that runs alone (nothing else running or queued) still gets every usable CPU
        lone_threads = usable_cpus()
        typed["threads"] = max(1, lone_threads // cfg.instances)
    adaptive = False
    if "spinning" not in typed:
        # ORT's intra-op spinning: back to back it cuts a batch-1 call by about a third and raises req/s at
        # 32 clients; after a call it spins ~50 ms, so at 50 req/s it burns a core (24.5 ms of CPU per request
        # against 2.6 without). Serving on ort-cpu, unless -O spinning=... or the deploy.json/bundle sets it,
        # runs a spinning twin while calls come back to back and the non-spinning session after a pause.
        if target == "ort-cpu" and "spinning" not in (d.options or {}):
            typed["spinning"] = False
            adaptive = True
    served = ServedModel(model, runtime=runtime, name=name, relax=relax_batch, adaptive_spinning=adaptive,
                         lone_threads=lone_threads, **typed)
    try:
        counts = run_server(served, cfg, log=lambda s: click.echo(s, err=True))
    finally:
        served.close()
    if counts.get("died"):
        sys.exit(1)


def main() -> None:
    cli(prog_name="edgecnn")


if __name__ == "__main__":
    main()
