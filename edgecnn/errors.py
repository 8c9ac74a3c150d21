"""One error hierarchy; the CLI maps each class to a one-line message and an exit code."""

from __future__ import annotations

# Exit codes, documented in the README and shared by every command.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # parity / accuracy gate / hash check failed
EXIT_BAD_INPUT = 2  # bad file, bad image, bad option (click usage errors use 2 as well)
EXIT_UNAVAILABLE = 3  # runtime or optional dependency not usable here
EXIT_INTERNAL = 70  # a bug in edgecnn: please report


class EdgeCNNError(Exception):
    """Base class: a message meant for the user, and the exit code the CLI returns."""

    exit_code = EXIT_BAD_INPUT


class InvalidInputError(EdgeCNNError):
    """An input array, image or option is not acceptable."""


class InvalidModelError(EdgeCNNError):
    """A checkpoint or ONNX file is missing, corrupt, unsafe or of another architecture."""


class ParityError(EdgeCNNError):
    """Two computations disagree beyond the stated tolerance."""

    exit_code = EXIT_CHECK_FAILED


class IntegrityError(EdgeCNNError):
    """A file does not match the sha256 its manifest records (altered, missing or unexpected)."""

    exit_code = EXIT_CHECK_FAILED


class RuntimeUnavailableError(EdgeCNNError):
    """A runtime (or the device it was asked for) cannot be used here."""

    exit_code = EXIT_UNAVAILABLE


class UnknownRuntimeError(InvalidInputError, RuntimeUnavailableError):
    """A runtime name that no backend registered: a bad option (exit 2), not an unusable runtime."""

    exit_code = EXIT_BAD_INPUT


class MissingDependencyError(RuntimeUnavailableError):
    """An optional package is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str, what: str = ""):
        self.package = package
        self.extra = extra
        purpose = f" for {what}" if what else ""
        super().__init__(
            f"{package} is not installed{purpose}: pip install 'edgecnn[{extra}]'"
        )
