"""The PyTorch reference runtime: runs an edgecnn checkpoint (.pt). torch is imported in _load only."""

from __future__ import annotations

import numpy as np

from ._deps import has_module
from .base import Runtime, register


@register("torch")
class TorchReference(Runtime):
    """The checkpoint in eager PyTorch, fp32, under inference_mode: the ground truth for parity."""

    suffixes = (".pt", ".pth")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not has_module("torch"):
            return False, "torch is not installed (pip install 'edgecnn[cpu]')"
        return True, ""

    @classmethod
    def versions(cls) -> dict[str, str | None]:
        from ._deps import dist_version

        return {"torch": dist_version("torch")}

    @classmethod
    def devices_seen(cls) -> list[str]:
        return ["CPU"]

    def _load(self) -> None:
        import torch

        from edgecnn.checkpoint import load_checkpoint

        self._torch = torch
        ckpt = load_checkpoint(self.model_path)
        self.net = ckpt.build_model()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.input_shape = (None, 3, ckpt.input_size, ckpt.input_size)
        self._metadata = ckpt.onnx_metadata()

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.net(self._torch.from_numpy(x)).numpy()
