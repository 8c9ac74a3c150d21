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
    options: list[dict] = field(default_factory=list)  # declared options: name, type, default, allowed, help

    def as_dict(self) -> dict:
        return asdict(self)


def runtime_report() -> list[RuntimeStatus]:
    """One entry per registered runtime. Never raises for a broken runtime: it shows as not usable."""
    from edgecnn.runtimes import get_runtime_class, runtime_names
    from edgecnn.runtimes.options import declared, help_table

    out = []
    for name in runtime_names():
        cls = get_runtime_class(name)
        ok, why = cls.available()
        try:  # each backend reports its own packages and devices (adding one needs no change here)
            packages, devices = cls.versions(), cls.devices_seen()
        except Exception as e:  # noqa: BLE001 - a probe must not take the report down
            packages, devices = {}, [f"probe failed: {e}"]
        opts = [dict(zip(("name", "type", "default", "allowed", "help"), row[1:], strict=True))
                 for row in help_table([(name, declared(cls))])]
        out.append(RuntimeStatus(name, ok, why, list(cls.precisions), packages, devices, opts))
    return out


def report_table(rows: list[RuntimeStatus]) -> str:
    """The status table, then every runtime's options (generated from their declarations)."""
    from edgecnn.runtimes.base import COMMON_OPTIONS
    from edgecnn.runtimes.options import help_table

    from .report import table

    return _status_table(rows) + "\n\noptions (-O [RUNTIME.]KEY=VALUE; Classifier/load_runtime keyword arguments):\n" + table(
        ["runtime", "option", "type", "default", "allowed", "help"],
        [[r.runtime, o["name"], o["type"], o["default"], o["allowed"], o["help"]] for r in rows for o in r.options]
        + help_table([("every runtime", COMMON_OPTIONS)]))


def _status_table(rows: list[RuntimeStatus]) -> str:
    from .report import table

    return table(
        ["runtime", "usable", "precisions", "packages", "devices seen", "why not"],
        [[r.runtime, "yes" if r.usable else "no", ",".join(r.precisions),
          ", ".join(f"{k} {v or '-'}" for k, v in r.packages.items()) or "-",
          ", ".join(r.devices) or "-", r.why_not] for r in rows],
    )
