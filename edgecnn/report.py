"""Plain-text tables for the CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .verify import Verdict


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def verify_table(rows) -> str:
    out = []
    for r in rows:
        p = r.result
        if p is None:
            out.append([r.runtime, r.precision, r.device, "-", "-", "-", "-", "-", r.status, r.note])
        else:
            out.append([r.runtime, r.precision, r.device, f"{p.max_abs:.3g}", f"{p.max_rel:.3g}", f"{p.rel_l2:.3g}",
                        f"{p.cosine:.6f}", f"{p.agreement * 100:.2f}%", r.status, r.note])
    return table(["runtime", "precision", "device", "max abs", "max rel", "rel L2", "cosine", "top-1 agree",
                  "verdict", "note"], out)


def bench_table(rows) -> str:
    return table(["runtime", "device", "precision", "batch", "iters", "p50 ms", "p90 ms", "p99 ms", "img/s",
                  "load s", "note"],
                 [[r.runtime, r.device, r.precision, r.batch, r.iterations, r.p50_ms, r.p90_ms, r.p99_ms,
                   r.throughput, r.load_s, r.note] for r in rows])


def _metadata_line(verdict: Verdict) -> str:
    """What the metadata check found: failures, or what matched, what was absent and what was NOT checked."""
    bad = verdict.metadata_failures
    if bad:
        return "; ".join(m.line() for m in bad)
    parts = []
    ok = [m.field for m in verdict.metadata if m.status == "ok"]
    if ok:
        parts.append(f"{', '.join(ok)}: match")
    parts += [m.line() for m in verdict.not_checked]
    absent = [m.field for m in verdict.metadata if m.status == "absent"]
    if absent:
        parts.append(f"absent: {', '.join(absent)}")
    return "; ".join(parts)


def verdict_text(verdict: Verdict, per_class: bool = True) -> str:
    """The judge's report as the CLI prints it: model, reference, inputs, metadata, notes, rows, per class,
    and a last line with the verdict, repeating what was not checked."""
    v = verdict
    lines = [f"model      {v.name} ({v.model.format}, {v.model.precision} read from the "
             f"graph: {v.model.precision_evidence}; sha256 {v.model.sha256[:12]})",
             f"reference  {v.reference}",
             f"inputs     {v.inputs}",
             "metadata   " + _metadata_line(v)]
    lines += [f"note       {n}" for n in v.notes]
    lines.append(verify_table(v.rows))
    stats = [r for r in v.ran if r.result is not None and r.result.per_class]
    if per_class and stats and v.reference_stats is not None:
        ref = v.reference_stats
        heads = ["class", "n", "reference P/R"] + [f"{r.runtime} {r.precision} P/R" for r in stats]
        body = []
        for i, c in enumerate(ref.per_class):
            body.append([c.name, c.support, f"{c.precision_ref * 100:.1f}/{c.recall_ref * 100:.1f}"] +
                        [f"{r.result.per_class[i].precision_out * 100:.1f}/{r.result.per_class[i].recall_out * 100:.1f}"
                         for r in stats])
        body.append(["top-1 accuracy", sum(c.support for c in ref.per_class), f"{ref.acc_ref * 100:.2f}%"] +
                    [f"{r.result.acc_out * 100:.2f}%" for r in stats])
        lines.append("\nper class (precision/recall %, data-set images):\n" + table(heads, body))
    word = "PASS" if v.passed else ("FAIL" if v.metadata_failures or v.ran else "NOT RUN")
    unchecked = [m.field for m in v.not_checked]
    lines.append(f"verdict    {word}" + (f": {v.reason()}" if not v.passed and v.reason() else "")
                 + (f" (not checked: {', '.join(unchecked)}; state them with --labels/--mean/--std)"
                    if unchecked else ""))
    return "\n".join(lines)


def confusion_plot(verdict: Verdict, path: str | os.PathLike) -> None:
    """One confusion matrix per row that ran (and the reference), as a PNG (matplotlib, the `plot` extra)."""
    from ._io import atomic_path
    from .errors import MissingDependencyError

    ref = verdict.reference_stats
    if ref is None:
        raise InvalidInputError("no labels for a confusion matrix: the data set's classes are not the model's")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "--confusion") from None
    panels = [("reference (PyTorch)", ref.confusion)] + [
        (f"{r.runtime} {r.precision}", r.result.confusion) for r in verdict.ran if r.result.confusion is not None]
    names = [c.name for c in ref.per_class]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, cm) in zip(axes[0], panels, strict=True):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
