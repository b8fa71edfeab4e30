"""Class activation maps (Zhou et al., 2016) for GAP + linear classifiers.

CAM_c = Σ_k w_{c,k} A_k over the last feature map A, at feature resolution, signed and unnormalised, with no
bias: exactly what Boopathy et al.'s code trains and attacks. Because the head is linear after global average
pooling, logit_c = mean_ij CAM_c(i, j) + b_c, and the map is linear in the features, so it is differentiable
with respect to the input for free (what interpretability-aware training backpropagates through).
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.interpret.registry import register_map


def cam_from_features(fmap: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """All classes' CAMs (N, num_classes, H, W) from a feature map (N, K, H, W) and the linear head."""
    return torch.einsum("nkhw,ck->nchw", fmap, head.weight)


def select_classes(maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) per-class maps -> (N, H, W) maps of one class per image."""
    return maps[torch.arange(maps.shape[0], device=maps.device), classes]


def all_class_cams(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CAMs of every class (N, C, H, W), logits (N, C)) from one forward pass."""
    fmap = model.features(x)
    return cam_from_features(fmap, model.head), model.logits_from_features(fmap)


@register_map("cam")
def cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """CAM of `classes` (default: the predicted class) for images x in [0, 1]: (N, H, W), keeps the graph."""
    maps, logits = all_class_cams(model, x)
    if classes is None:
        classes = logits.argmax(1)
    return select_classes(maps, classes)
