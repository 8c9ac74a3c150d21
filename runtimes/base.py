"""The Runtime interface every backend implements, and the name -> class registry."""

from __future__ import annotations

import difflib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgecnn.errors import InvalidInputError, InvalidModelError, RuntimeUnavailableError, UnknownRuntimeError

from .options import Option, validate

# Options every runtime takes as keyword arguments of its own (not in option_specs).
COMMON_OPTIONS: tuple[Option, ...] = (
    Option("threads", int, None, "intra-op threads (default: one per CPU this process may use: affinity mask "
           "and cgroup quota)", minimum=1),
)

_REGISTRY: dict[str, type[Runtime]] = {}


def register(name: str):
    """Class decorator: make a Runtime subclass reachable by ``name``; duplicate names are refused."""

    def deco(cls: type[Runtime]) -> type[Runtime]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"runtime {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def runtime_names() -> list[str]:
    return sorted(_REGISTRY)


def get_runtime_class(name: str) -> type[Runtime]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownRuntimeError(
            f"unknown runtime {name!r}{hint}; known: {', '.join(runtime_names())}"
        ) from None


def load_runtime(name: str, model_path: str | os.PathLike, **kwargs) -> Runtime:
    """Create the runtime ``name`` for ``model_path``; raises if it is not usable here."""
    cls = get_runtime_class(name)
    ok, why = cls.available()
    if not ok:
        raise RuntimeUnavailableError(f"runtime {name} is not usable here: {why}")
    return cls(model_path, **kwargs)


class Runtime(ABC):
    """One loaded model on one backend.

    Subclasses set ``precisions`` and ``option_specs`` (the options they take, declared once: see
    options.py) and implement ``available``, ``_load`` and ``_run``; ``run`` validates the input and
    splits batches for models whose batch axis is fixed. Options are validated and typed before
    ``_load`` runs; ``self.options`` holds every declared option with the value applied.
    """

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    suffixes: ClassVar[tuple[str, ...]] = (".onnx",)
    option_specs: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, model_path: str | os.PathLike, *, precision: str = "fp32",
                 threads: int | None = None, **options):
        path = Path(model_path)
        if not path.is_file():
            what = "is a directory, not a model file" if path.is_dir() else "no such model file"
            raise InvalidModelError(f"{path}: {what}")
        if path.suffix.lower() not in self.suffixes:
            others = [n for n, c in sorted(_REGISTRY.items()) if path.suffix.lower() in c.suffixes]
            hint = f"; use --runtime {others[0]}" if others else ""
            raise InvalidModelError(
                f"{path}: runtime {self.name} reads {'/'.join(self.suffixes)} files, not {path.suffix or 'this file'}"
                + hint
            )
        if path.suffix.lower() == ".onnx":
            from .artifact import describe
            from .onnx_guard import check_external_data

            check_external_data(path)  # before any runtime opens the file
            bad = describe(path).nonfinite
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise InvalidModelError(f"{path}: weights {', '.join(bad[:3])}{more} contain NaN or Inf; refused")
        if precision not in self.precisions:
            raise InvalidInputError(
                f"runtime {self.name} supports precision {', '.join(self.precisions)}, not {precision!r}"
            )
        if threads is not None:
            threads = COMMON_OPTIONS[0].convert(self.name, threads)
        # Unknown or ill-typed options fail here, before any session is built.
        self.options: dict[str, object] = validate(self.name, self.option_specs, options)
        self.model_path = path
        self.precision = precision
        self.threads = threads
        self.closed = False
        # Filled by _load: (batch or None, C, H, W), the model's metadata, its output width.
        self.input_shape: tuple[int | None, int, int, int] = (None, 3, 64, 64)
        # "NCHW": float32, normalized; "NHWC-uint8": raw RGB pixels, preprocessing inside the graph.
        # input_shape stays (N, C, H, W) either way; a backend calls _set_input_spec to fill both.
        self.input_layout: str = "NCHW"
        self._metadata: dict[str, str] = {}
        self._load()

    # ---- what a backend provides -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here?, why not). Never raises."""

    @abstractmethod
    def _load(self) -> None:
        """Open the model; set input_shape and _metadata."""

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """x already validated: float32, C-contiguous, batch matching the model."""

    @classmethod
    def versions(cls) -> dict[str, str | None]:
        """Package versions this backend runs on (for `edgecnn runtimes`). Never raises."""
        return {}

    @classmethod
    def devices_seen(cls) -> list[str]:
        """The devices this backend can see here (for `edgecnn runtimes`). Never raises."""
        return []

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Drop the backend's sessions and buffers (host and device)."""

    def close(self) -> None:
        """Release the backend's resources; run() afterwards raises. Closing twice is harmless."""
        if not getattr(self, "closed", False):
            self._release()
        self.closed = True

    # ---- shared behaviour ----------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where the model really runs, as the backend reported it."""
        return "CPU"

    def describe(self) -> str:
        return f"{self.name} ({self.device}, {self.precision})"

    def metadata(self) -> dict[str, str]:
        """The model's metadata (class names, mean/std, ...), as read by the runtime."""
        return dict(self._metadata)

    def _set_input_spec(self, shape: tuple, dtype: str) -> None:
        """From the model's input (shape with None for symbolic axes, "float32"/"uint8"): layout and input_shape."""
        shape = tuple(shape)
        if len(shape) == 4 and any(d is not None and not 0 < d <= 8192 for d in shape[1:]):
            raise InvalidModelError(f"{self.model_path}: input dimensions {list(shape)} are out of range (1..8192)")
        if dtype == "float32" and len(shape) == 4 and shape[1] != 3:
            raise InvalidModelError(f"{self.model_path}: the input has {shape[1]} channels; the Net takes 3 (RGB)")
        if dtype == "uint8" and len(shape) == 4 and None not in shape[1:] and shape[3] == 3:
            self.input_layout = "NHWC-uint8"
            self.input_shape = (shape[0], shape[3], shape[1], shape[2])
        elif dtype == "float32" and len(shape) == 4 and None not in shape[1:]:
            self.input_layout = "NCHW"
            self.input_shape = (shape[0], shape[1], shape[2], shape[3])
        else:
            dims = ",".join("?" if d is None else str(d) for d in shape)
            raise InvalidModelError(
                f"{self.model_path}: expected a float32 input (N,3,H,W) or a uint8 image input (N,H,W,3), "
                f"got {dtype} [{dims}]"
            )

    def dummy_input(self, n: int = 1) -> np.ndarray:
        """An all-zero input batch of n that this model accepts (its dtype and layout)."""
        _, c, h, w = self.input_shape
        if self.input_layout == "NHWC-uint8":
            return np.zeros((n, h, w, c), np.uint8)
        return np.zeros((n, c, h, w), np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W), normalized -> logits (N, C); uint8 (N, H, W, 3) for NHWC-uint8 models."""
        if self.closed:
            raise InvalidInputError(f"runtime {self.name} was closed; load the model again to run it")
        x = self._validate(x)
        fixed = self.input_shape[0]
        if fixed is None or fixed == x.shape[0]:
            out = self._run(x)
        elif fixed == 1:
            out = np.concatenate([self._run(x[i : i + 1]) for i in range(x.shape[0])], axis=0)
        else:
            raise InvalidInputError(f"model has a fixed batch of {fixed}; got a batch of {x.shape[0]}")
        if not np.isfinite(out).all():  # exit 0 must mean a finite, meaningful answer
            raise InvalidModelError(f"{self.model_path}: the model gave NaN or Inf for a finite input; "
                                    "its weights or graph are broken")
        return out

    def _validate(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InvalidInputError(f"input must be a numpy array, got {type(x).__name__}")
        if self.input_layout == "NHWC-uint8":
            return self._validate_uint8(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidInputError(
                f"input must be float32 (normalized), got {x.dtype}; use Classifier.classify for raw images"
            )
        _, c, h, w = self.input_shape
        if x.ndim != 4 or x.shape[1:] != (c, h, w):
            raise InvalidInputError(f"input must have shape (N, {c}, {h}, {w}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InvalidInputError("empty batch (N = 0)")
        if not np.isfinite(x).all():
            raise InvalidInputError("input contains NaN or Inf")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _validate_uint8(self, x: np.ndarray) -> np.ndarray:
        _, c, h, w = self.input_shape
        if x.dtype != np.uint8:
            raise InvalidInputError(
                f"this model takes raw uint8 RGB pixels (N, {h}, {w}, {c}), got {x.dtype}; "
                "its preprocessing is inside the graph"
            )
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise InvalidInputError(f"input must have shape (N, {h}, {w}, {c}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InvalidInputError("empty batch (N = 0)")
        return np.ascontiguousarray(x)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} {self.model_path.name}>"
