"""The Runtime interface every backend implements, and the name -> class registry."""

from __future__ import annotations

import difflib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgecnn.errors import InvalidInputError, InvalidModelError, RuntimeUnavailableError

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
        raise RuntimeUnavailableError(
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

    Subclasses set ``precisions`` and implement ``available``, ``_load`` and ``_run``; ``run``
    validates the input and splits batches for models whose batch axis is fixed.
    """

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    suffixes: ClassVar[tuple[str, ...]] = (".onnx",)

    def __init__(self, model_path: str | os.PathLike, *, precision: str = "fp32",
                 threads: int | None = None, **options):
        path = Path(model_path)
        if not path.is_file():
            what = "is a directory, not a model file" if path.is_dir() else "no such model file"
            raise InvalidModelError(f"{path}: {what}")
        if path.suffix.lower() not in self.suffixes:
            raise InvalidModelError(
                f"{path}: runtime {self.name} reads {'/'.join(self.suffixes)} files, not {path.suffix or 'this file'}"
            )
        if precision not in self.precisions:
            raise InvalidInputError(
                f"runtime {self.name} supports precision {', '.join(self.precisions)}, not {precision!r}"
            )
        if threads is not None and threads < 1:
            raise InvalidInputError(f"threads must be >= 1, got {threads}")
        self.model_path = path
        self.precision = precision
        self.threads = threads
        self.options = options
        # Filled by _load: (batch or None, C, H, W), the model's metadata, its output width.
        self.input_shape: tuple[int | None, int, int, int] = (None, 3, 64, 64)
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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources."""

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

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W), normalized -> logits (N, C)."""
        x = self._validate(x)
        fixed = self.input_shape[0]
        if fixed is None or fixed == x.shape[0]:
            return self._run(x)
        if fixed == 1:
            return np.concatenate([self._run(x[i : i + 1]) for i in range(x.shape[0])], axis=0)
        raise InvalidInputError(f"model has a fixed batch of {fixed}; got a batch of {x.shape[0]}")

    def _validate(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InvalidInputError(f"input must be a numpy array, got {type(x).__name__}")
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} {self.model_path.name}>"
