"""Interpretation maps by name: `interpretation_map("grad_cam", model, x, classes)`, one interface for all.

CAM is registered here rather than in cam.py, which predates the registry and stays free of it.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.interpret.cam import cam
from robust_train.registry import Registry

MAPS: Registry = Registry("interpretation map")
register_map = MAPS.register
register_map("cam")(cam)


def interpretation_map(name: str, model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
                       **kwargs):
    """The map `name` of `classes` (default: predicted) for images x in [0, 1]; kwargs go to the map."""
    return MAPS.get(name)(model, x, classes=classes, **kwargs)
