"""The seed Net, with the course material's attribute names and layer order (state_dicts load as is)."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 64
FEATURES = 64 * 16 * 16

# name -> shape for everything but the classifier's class count ("C").
EXPECTED_SHAPES: dict[str, tuple] = {
    "feature_extractor.0.weight": (32, 3, 3, 3),
    "feature_extractor.0.bias": (32,),
    "feature_extractor.3.weight": (64, 32, 3, 3),
    "feature_extractor.3.bias": (64,),
    "classifier.weight": ("C", FEATURES),
    "classifier.bias": ("C",),
}


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1),
            nn.ELU(),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ELU(),
            nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_extractor(x)
        x = self.classifier(x)
        return x


def check_state_dict(sd: dict) -> int:
    """Return the class count of a Net state_dict, or a message of what does not fit (ValueError)."""
    from .labels import format_list

    missing = [k for k in EXPECTED_SHAPES if k not in sd]
    if missing:
        raise ValueError(f"missing {format_list(missing)}")
    extra = [k for k in sd if k not in EXPECTED_SHAPES]
    if extra:
        raise ValueError(f"unexpected keys {format_list(extra, 4)}")
    num_classes = None
    for k, want in EXPECTED_SHAPES.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.layout != torch.strided:
            raise ValueError(f"{k} is not a dense float tensor")
        got = tuple(t.shape)
        if len(got) != len(want):
            raise ValueError(f"{k} has shape {list(got)}, expected {list(want)}")
        for g, w in zip(got, want, strict=True):
            if w == "C":
                if num_classes is None:
                    num_classes = g
                if g != num_classes or g < 1:
                    raise ValueError(f"{k} has shape {list(got)}: class counts disagree")
            elif g != w:
                raise ValueError(f"{k} has shape {list(got)}, expected {[num_classes if x == 'C' else x for x in want]}")
    for k in EXPECTED_SHAPES:
        if not bool(torch.isfinite(sd[k]).all()):
            raise ValueError(f"tensor {k} holds NaN or Inf")
    return int(num_classes)
