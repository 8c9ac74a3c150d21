"""Plain-text tables for the CLI."""

from __future__ import annotations

from collections.abc import Sequence


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
