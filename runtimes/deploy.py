"""What a deployable says to run: a model file, a deploy.json (`edgecnn tune`) or a bundle folder (`edgecnn package`).

One reader for every command and for the bundle's predict.py (shipped there as ``edgecnn_deploy.py``):
``resolve(source)`` gives the model file, runtime, precision, threads, backend options, serving name,
and whether the bundle's sha256 were checked. A bundle file whose sha256 differs from its manifest is
refused (``TamperedBundleError``, exit 2). Standard library only (torch-, numpy- and onnx-free).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgecnn.runtimes.preprocess import InvalidInputError

FORMAT = "edgecnn-deploy/1"
MANIFEST = "manifest.json"
DEFAULT_RUNTIME = "ort-cpu"
# A variant's name carries what it is (model.int8.ov.xml): the serving name is what is left.
_VARIANT_PARTS = {"onnx", "xml", "ov", "int8", "fp16", "bf16", "fp32", "relaxed", "tuned"}


class DeployableError(InvalidInputError):
    """A model file, deploy.json or bundle that cannot be run as it says (exit 2, one line)."""


class TamperedBundleError(DeployableError):
    """A bundle file whose sha256 differs from the bundle's manifest: refused, never run."""


@dataclass(frozen=True)
class Deployable:
    """What to run, and where each setting came from."""

    source: Path  # what the user named
    kind: str  # "model", "deploy.json" or "bundle"
    model: Path  # the model file to load (an .onnx, or an OpenVINO IR's .xml)
    runtime: str
    precision: str
    threads: int | None  # None: the runtime's default (the usable CPUs); capped at the usable CPUs here
    options: dict = field(default_factory=dict)  # backend options (hint=..., spinning=...): not precision/threads
    name: str = ""  # the name a server gives it (/v2/models/NAME)
    hashes_checked: bool = False  # bundle: its model (and labels) matched the manifest's sha256
    configured: frozenset = frozenset()  # which of runtime/precision/threads/options the config set
    manifest: dict | None = None  # a bundle's manifest, as read

    def load_kwargs(self) -> dict:
        """Keyword arguments for ``load_runtime(self.runtime, self.model, ...)`` and ``Classifier``."""
        kw: dict = {**self.options}
        if self.precision != "fp32" or "precision" in self.configured:
            kw["precision"] = self.precision
        if self.threads is not None:
            kw["threads"] = self.threads
        return kw

    def describe(self) -> str:
        """One line: what runs, and from which source."""
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        where = {"model": "", "deploy.json": f" (tuned: {self.source})", "bundle": f" (bundle {self.source}, "
                 + ("sha256 checked" if self.hashes_checked else "sha256 not checked") + ")"}[self.kind]
        return (f"{self.model.name} on {self.runtime} {self.precision} threads={self.threads or 'auto'}"
                + (f" {opts}" if opts else "") + where)

    def override(self, runtime: str | None = None, options: dict | None = None) -> tuple[Deployable, list[str]]:
        """The command line's choices over the config's: (the deployable to run, one note per override)."""
        notes: list[str] = []
        options = dict(options or {})
        d = self
        if runtime is not None and runtime != self.runtime:
            if self.kind != "model" and "runtime" in self.configured:
                dropped = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
                extra = "" if self.precision == "fp32" else f" (precision {self.precision})"
                notes.append(f"--runtime {runtime} overrides the {self.kind}'s runtime {self.runtime}"
                             + (f"; its {self.runtime} options {dropped}{extra} are not applied" if dropped or extra
                                else ""))
            d = replace(d, runtime=runtime, options={}, precision="fp32",
                        configured=d.configured - {"runtime", "options", "precision"})
        p = options.pop("precision", None)
        if p is not None:
            p = str(p)
            if p != d.precision and "precision" in d.configured:
                notes.append(f"-O precision={p} overrides the {self.kind}'s precision {d.precision}")
            d = replace(d, precision=p, configured=d.configured | {"precision"})
        t = options.pop("threads", None)
        if t is not None:
            t = int(t)
            if t != d.threads and "threads" in d.configured:
                notes.append(f"-O threads={t} overrides the {self.kind}'s threads={d.threads}")
            d = replace(d, threads=t, configured=d.configured | {"threads"})
        merged = dict(d.options)
        for k, v in options.items():
            if k in merged and merged[k] != v and "options" in d.configured:
                notes.append(f"-O {k}={v} overrides the {self.kind}'s {k}={merged[k]}")
            merged[k] = v
        return replace(d, options=merged), notes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def serving_name(filename: str) -> str:
    """model.int8.ov.xml -> model; model.onnx -> model; my.net.fp16.onnx -> my.net."""
    parts = filename.split(".")
    while len(parts) > 1 and parts[-1].lower() in _VARIANT_PARTS:
        parts.pop()
    return ".".join(parts) or filename


def _threads(value, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DeployableError(f"{where}: threads must be a positive integer, got {value!r}")
    # Tuned on another machine, perhaps: never more threads than the CPUs this process may use here.
    from edgecnn.runtimes.cpu import usable_cpus

    return min(value, usable_cpus())


def _inside(folder: Path, name, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise DeployableError(f"{where}: the model entry must be a file name, got {name!r}")
    p = (folder / name).resolve()
    if folder.resolve() not in p.parents:
        raise DeployableError(f"{where}: the model path {name!r} leaves the folder; refused")
    return p


def _settings(cfg: dict, where: str) -> tuple[str, str, int | None, dict, frozenset]:
    """runtime, precision, threads, options and which were set, from a deploy.json or a bundle's deploy entry."""
    runtime = cfg.get("runtime", DEFAULT_RUNTIME)
    precision = cfg.get("precision") or "fp32"
    options = cfg.get("options") or {}
    if not isinstance(runtime, str) or not isinstance(precision, str) or not isinstance(options, dict):
        raise DeployableError(f"{where}: runtime and precision must be names and options an object")
    configured = frozenset(k for k in ("runtime", "precision", "threads", "options") if cfg.get(k) is not None)
    return runtime, precision, _threads(cfg.get("threads"), where), dict(options), configured


def resolve(source: str | os.PathLike, model: str | None = None) -> Deployable:
    """A model file, a deploy.json or a bundle folder -> the one description of what to run.

    ``model`` picks another model of a bundle than its default. Raises DeployableError (exit 2)
    for anything unreadable, and TamperedBundleError when a bundle's model or labels were altered.
    """
    p = Path(source)
    if p.is_dir():
        return _bundle(p, model)
    if p.suffix.lower() == ".json":
        return _deploy_json(p)
    return Deployable(p, "model", p, DEFAULT_RUNTIME, "fp32", None, {}, p.stem)


def _deploy_json(path: Path) -> Deployable:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeployableError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DeployableError(f"{path}: not a readable deploy config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("model"), str):
        raise DeployableError(f"{path}: not an edgecnn deploy config (format {FORMAT})")
    model = _inside(path.parent, cfg["model"], str(path))
    runtime, precision, threads, options, configured = _settings(cfg, str(path))
    folder = path.parent.resolve().name
    name = cfg.get("name") if isinstance(cfg.get("name"), str) and cfg.get("name") else (
        folder[: -len(".tuned")] if folder.endswith(".tuned") and len(folder) > 6 else serving_name(model.name))
    return Deployable(path, "deploy.json", model, runtime, precision, threads, options, name,
                      configured=configured)


def read_manifest(folder: Path) -> dict:
    """A bundle's manifest, with the keys a run needs checked (one line naming what is wrong)."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise DeployableError(f"{folder}: a folder, but not an edgecnn bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DeployableError(f"{mf}: not a readable bundle manifest ({type(e).__name__})") from None
    if not isinstance(manifest, dict):
        raise DeployableError(f"{mf}: not a bundle manifest (not a JSON object)")
    for key, kind in (("default_model", str), ("models", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise DeployableError(f"{mf}: the manifest has no valid {key!r} ({kind.__name__}); rebuild the bundle "
                                  "with `edgecnn package`")
    if not all(isinstance(m, dict) and isinstance(m.get("file"), str) for m in manifest["models"]):
        raise DeployableError(f"{mf}: every entry of 'models' needs a 'file'")
    return manifest


def check_files(folder: Path, manifest: dict, names) -> None:
    """Each named bundle file must exist and match the manifest's sha256, else TamperedBundleError."""
    bad = []
    for name in names:
        want = manifest["files"].get(name)
        p = folder / name
        if want is None:
            bad.append(f"{name} is not in {MANIFEST}")
        elif not p.is_file():
            bad.append(f"{name} is missing")
        elif sha256_file(p) != want:
            bad.append(f"{name} was altered after packaging (sha256 differs from {MANIFEST})")
    if bad:
        raise TamperedBundleError(f"{folder}: refused: " + "; ".join(bad) + " (rebuild it with `edgecnn package`)")


def _bundle(folder: Path, model: str | None) -> Deployable:
    manifest = read_manifest(folder)
    name = model or manifest["default_model"]
    entries = {m["file"]: m for m in manifest["models"]}
    if name not in entries:
        raise DeployableError(f"{folder}: no model {name!r} in this bundle; it has {', '.join(entries)}")
    entry = entries[name]
    path = _inside(folder, name, str(folder / MANIFEST))
    files = [name] + ([entry["weights"]] if isinstance(entry.get("weights"), str) else [])
    if (folder / "labels.txt").exists() or "labels.txt" in manifest["files"]:
        files.append("labels.txt")
    check_files(folder, manifest, files)
    deploy = manifest.get("deploy") or {}
    if not isinstance(deploy, dict):
        raise DeployableError(f"{folder / MANIFEST}: 'deploy' must be an object")
    deploy = {"runtime": manifest.get("runtime"), **{k: v for k, v in deploy.items() if v is not None}}
    runtime, precision, threads, options, configured = _settings(deploy, str(folder / MANIFEST))
    return Deployable(folder, "bundle", path, runtime or DEFAULT_RUNTIME, precision, threads, options,
                      serving_name(name), hashes_checked=True, configured=configured, manifest=manifest)
