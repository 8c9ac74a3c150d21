"""`edgecnn runtimes` / `doctor`: every registered runtime, whether it is usable here and why not, versions, devices."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RuntimeStatus:
    runtime: str
    usable: bool
    why_not: str
    precisions: list[str]
    packages: dict[str, str | None] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def runtime_report() -> list[RuntimeStatus]:
    """One entry per registered runtime. Never raises for a broken runtime: it shows as not usable."""
    from edgecnn.runtimes import get_runtime_class, runtime_names

    out = []
    for name in runtime_names():
        cls = get_runtime_class(name)
        ok, why = cls.available()
        try:  # each backend reports its own packages and devices (adding one needs no change here)
            packages, devices = cls.versions(), cls.devices_seen()
        except Exception as e:  # noqa: BLE001 - a probe must not take the report down
            packages, devices = {}, [f"probe failed: {e}"]
        out.append(RuntimeStatus(name, ok, why, list(cls.precisions), packages, devices))
    return out


def report_table(rows: list[RuntimeStatus]) -> str:
    from .report import table

    return table(
        ["runtime", "usable", "precisions", "packages", "devices seen", "why not"],
        [[r.runtime, "yes" if r.usable else "no", ",".join(r.precisions),
          ", ".join(f"{k} {v or '-'}" for k, v in r.packages.items()) or "-",
          ", ".join(r.devices) or "-", r.why_not] for r in rows],
    )
