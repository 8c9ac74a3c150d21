"""Read an ONNX file's metadata_props (class names, mean/std, precision, ...) with the onnx package."""

from __future__ import annotations

import os


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """key -> value of the model's metadata_props; external data is not loaded. Raises if unreadable."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
