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


def _ort_packages() -> dict[str, str | None]:
    from edgecnn.runtimes import _deps

    return {d: _deps.dist_version(d) for d in (_deps.ort_distributions() or ["onnxruntime"])}


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort

        return [p.replace("ExecutionProvider", "") for p in ort.get_available_providers()]
    except Exception:  # noqa: BLE001 - a probe
        return []


def _probe(name: str, cls) -> tuple[dict[str, str | None], list[str]]:
    """Package versions and devices a runtime sees, without importing torch."""
    from edgecnn.runtimes import _deps

    if name.startswith("ort-"):
        return _ort_packages(), _ort_providers()
    if name == "openvino":
        import openvino as ov

        core = ov.Core()
        return ({"openvino": _deps.dist_version("openvino")},
                [f"{d} ({core.get_property(d, 'FULL_DEVICE_NAME')})" for d in core.available_devices])
    if name == "torch":
        return {"torch": _deps.dist_version("torch")}, ["CPU"]
    versions = getattr(cls, "versions", None)
    devices = getattr(cls, "devices_seen", None)
    return (versions() if callable(versions) else {}), (devices() if callable(devices) else [])


def runtime_report() -> list[RuntimeStatus]:
    """One entry per registered runtime. Never raises for a broken runtime: it shows as not usable."""
    from edgecnn.runtimes import get_runtime_class, runtime_names

    out = []
    for name in runtime_names():
        cls = get_runtime_class(name)
        ok, why = cls.available()
        try:
            packages, devices = _probe(name, cls)
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
