"""The contract every model keeps: images in [0, 1] (NCHW) in, logits out; normalisation inside the model, so an
attack's ε is in pixel units whatever the data set; `features(x)` gives the last feature map and `head` the linear
layer after global average pooling, which is what CAM and the interpretability methods need."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """Subclasses set `self.body` (normalised image -> last feature map) and `self.head` (an nn.Linear)."""

    body: nn.Module
    head: nn.Linear

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (N, C, H, W) for images x in [0, 1]."""
        return self.body(self.normalize(x))

    def logits_from_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(fmap.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))
