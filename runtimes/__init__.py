"""edgecnn.runtimes: the torch-free device package (numpy, Pillow and the runtime being loaded)."""

from . import openvino, ort, ort_gpu, torch_ref  # noqa: F401 - register the built-in backends
from .base import Runtime, get_runtime_class, load_runtime, register, runtime_names
from .classifier import Classifier, ModelInfo
from .preprocess import preprocess, softmax, to_rgb_uint8

__all__ = [
    "Classifier", "ModelInfo", "Runtime", "get_runtime_class", "load_runtime", "preprocess",
    "register", "runtime_names", "softmax", "to_rgb_uint8",
]
