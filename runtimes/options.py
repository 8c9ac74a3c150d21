"""Runtime options declared once per backend (name, type, default, help, allowed values): `-O` parsing,
validation, routing to the runtimes of a command, `--help` text and the `edgecnn runtimes` report all
come from these declarations. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from edgecnn.errors import InvalidInputError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One runtime option. ``type`` is bool, int, str or dict; ``choices`` lists the allowed values (for
    str, matched case-insensitively on the part before ``:``/``.`` when ``prefix`` is set); ``check``
    validates further and returns an error message or None."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple = ()
    minimum: int | None = None
    prefix: bool = False
    check: Callable[[object], str | None] | None = None
    metavar: str = ""

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", str: "str", dict: "KEY=VAL;..."}.get(self.type, self.type.__name__)

    def allowed(self) -> str:
        if self.choices:
            return "|".join(map(str, self.choices)) + ("[:...]" if self.prefix else "")
        if self.type is bool:
            return "true|false"
        if self.minimum is not None:
            return f">= {self.minimum}"
        return ""

    def convert(self, runtime: str, value: object) -> object:
        """The typed value, or InvalidInputError naming the runtime, the option and what it accepts."""

        def bad(why: str) -> InvalidInputError:
            return InvalidInputError(f"{runtime}: option {self.name}={value!r}: {why}")

        v = value
        if self.type is bool:
            if isinstance(v, str):
                low = v.strip().lower()
                if low not in _TRUE + _FALSE:
                    raise bad("expected true or false")
                v = low in _TRUE
            elif not isinstance(v, bool):
                raise bad("expected true or false")
        elif self.type is int:
            if isinstance(v, bool):
                raise bad("expected an integer")
            try:
                v = int(str(v).strip()) if isinstance(v, str) else v
            except ValueError:
                raise bad("expected an integer") from None
            if not isinstance(v, int):
                raise bad("expected an integer")
            if self.minimum is not None and v < self.minimum:
                raise bad(f"must be >= {self.minimum}")
        elif self.type is str:
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise bad("expected a string")
            v = str(v).strip()
            if not v:
                raise bad("empty value")
        elif self.type is dict:
            v = parse_mapping(v, bad)
        if self.choices:
            key = str(v).split(":")[0].split(".")[0] if self.prefix else str(v)
            match = [c for c in self.choices if str(c).lower() == key.lower()]
            if not match:
                raise bad(f"allowed: {self.allowed()}")
            if not self.prefix:
                v = match[0]
        if self.check is not None:
            why = self.check(v)
            if why:
                raise bad(why)
        return v


def parse_mapping(value: object, bad) -> dict[str, str]:
    """A dict, a JSON object, or 'k=v;k=v' -> {str: str}."""
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                items = json.loads(text)
            except ValueError as e:
                raise bad(f"not a JSON object ({e})") from None
            if not isinstance(items, dict):
                raise bad("expected a JSON object")
        else:
            items = {}
            for part in (p.strip() for p in text.split(";")):
                if not part:
                    continue
                k, sep, v = part.partition("=")
                if not sep or not k.strip():
                    raise bad(f"expected KEY=VALUE;KEY=VALUE or a JSON object, got {part!r}")
                items[k.strip()] = v.strip()
    else:
        raise bad("expected KEY=VALUE;KEY=VALUE or a JSON object")
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in items.items()}


def declared(cls) -> tuple[Option, ...]:
    """The options a runtime class declares (its ``option_specs``)."""
    return tuple(getattr(cls, "option_specs", ()) or ())


def allowed_keys(runtime: str, specs: Iterable[Option]) -> str:
    names = [o.name for o in specs]
    return f"{runtime} takes {', '.join(names)}" if names else f"{runtime} takes no options"


def validate(runtime: str, specs: Iterable[Option], given: Mapping[str, object]) -> dict[str, object]:
    """Typed options with defaults filled in; unknown or ill-typed ones raise before anything is built."""
    specs = tuple(specs)
    by_name = {o.name: o for o in specs}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise InvalidInputError(f"{runtime}: unknown option{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(unknown)} ({allowed_keys(runtime, specs)})")
    out = {o.name: o.default for o in specs}
    for k, v in given.items():
        out[k] = by_name[k].convert(runtime, v)
    return out


# ------------------------------------------------------------------------------------------ the command line
@dataclass(frozen=True)
class RawOption:
    """One `-O [RUNTIME.]KEY=VALUE` as typed (value still a string)."""

    scope: str | None
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.scope + '.' if self.scope else ''}{self.key}={self.value}"


def parse_cli(items: Iterable[str], known_runtimes: Iterable[str]) -> list[RawOption]:
    """`-O` strings -> RawOption; RUNTIME.KEY scopes a key to one runtime (RUNTIME must be registered)."""
    known = set(known_runtimes)
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInputError(f"-O expects [RUNTIME.]KEY=VALUE, got {item!r}")
        scope = None
        head, dot, tail = key.rpartition(".")
        if dot and head in known:
            scope, key = head, tail
        elif dot:
            raise InvalidInputError(f"-O {item}: {head!r} is not a runtime (known: {', '.join(sorted(known))})")
        out.append(RawOption(scope, key, raw.strip()))
    return out


def route(raw: Iterable[RawOption], runtimes: Iterable[str], specs_of: Callable[[str], tuple[Option, ...]],
          extra: Mapping[str, Option] | None = None) -> dict[str, dict[str, object]]:
    """Each runtime's typed options (only what was given; defaults stay the runtime's).

    A scoped option goes to its runtime, which must be one of ``runtimes`` and declare the key. An
    unscoped key goes to every runtime that declares it and is an error only if none does. ``extra``
    are options every runtime takes (e.g. threads)."""
    names = list(dict.fromkeys(runtimes))
    extra = dict(extra or {})
    out: dict[str, dict[str, object]] = {n: {} for n in names}

    def spec(rt: str, key: str) -> Option | None:
        return next((o for o in specs_of(rt) if o.name == key), None) or extra.get(key)

    for opt in raw:
        if opt.scope is not None:
            if opt.scope not in out:
                raise InvalidInputError(f"-O {opt}: runtime {opt.scope} is not in this command "
                                        f"({', '.join(names)})")
            o = spec(opt.scope, opt.key)
            if o is None:
                raise InvalidInputError(f"{opt.scope}: unknown option {opt.key} "
                                        f"({allowed_keys(opt.scope, (*specs_of(opt.scope), *extra.values()))})")
            out[opt.scope][opt.key] = o.convert(opt.scope, opt.value)
            continue
        takers = [n for n in names if spec(n, opt.key) is not None]
        if not takers:
            allowed = "; ".join(allowed_keys(n, (*specs_of(n), *extra.values())) for n in names)
            raise InvalidInputError(f"-O {opt}: no runtime of this command takes {opt.key} ({allowed})")
        for n in takers:
            out[n][opt.key] = spec(n, opt.key).convert(n, opt.value)
    return out


def help_table(rows: Iterable[tuple[str, tuple[Option, ...]]]) -> list[list[str]]:
    """[runtime, option, type, default, allowed, help] rows for a table."""
    out = []
    for runtime, specs in rows:
        for o in specs:
            default = "-" if o.default is None else str(o.default).lower() if isinstance(o.default, bool) else str(o.default)
            out.append([runtime, o.name, o.type_name, default or "-", o.allowed() or "-", o.help])
    return out


def _metavar(o: Option) -> str:
    if o.choices or o.type is bool:
        return o.allowed()
    return {int: "N", str: "TEXT", dict: "'K=V;K=V'"}.get(o.type, o.type_name)


def help_text(rows: Iterable[tuple[str, tuple[Option, ...]]]) -> str:
    """One paragraph for click's --help: every runtime's options."""
    parts = []
    for runtime, specs in rows:
        if specs:
            parts.append(f"{runtime}: " + ", ".join(f"{o.name}={o.metavar or _metavar(o)}" for o in specs))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ the registry
def registry_rows() -> list[tuple[str, tuple[Option, ...]]]:
    """(runtime, its declared options) for every registered runtime, plus ("every runtime", common)."""
    from .base import COMMON_OPTIONS, get_runtime_class, runtime_names

    return [(n, declared(get_runtime_class(n))) for n in runtime_names()] + [("every runtime", COMMON_OPTIONS)]


def route_registered(raw: Iterable[RawOption], runtimes: Iterable[str], *,
                     common: bool = True) -> dict[str, dict[str, object]]:
    """route() with the registered runtimes' declarations; ``common``: threads is an option too."""
    from .base import COMMON_OPTIONS, get_runtime_class

    names = [get_runtime_class(n).name for n in runtimes]  # unknown names fail here
    return route(raw, names, lambda n: declared(get_runtime_class(n)),
                 {o.name: o for o in COMMON_OPTIONS} if common else None)


def cli_help() -> str:
    """The -O help text of every command, generated from the declarations."""
    from .base import runtime_names

    return ("Runtime option [RUNTIME.]KEY=VALUE, repeatable. RUNTIME. scopes it to one runtime; an unscoped "
            "KEY goes to every runtime of the command that takes it. "
            + help_text(registry_rows()) + ". `edgecnn runtimes` describes each; runtimes: "
            + ", ".join(runtime_names()) + ".")
