"""Interpretation maps by name: `interpretation_map("grad_cam", model, x, classes)`, one interface for all, and
`differentiable_map`, the one place where a map is made fit for an attack to descend through it (AAI)."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

from robust_train.registry import Registry

MapFn = Callable[..., torch.Tensor]  # map_fn(model, x, classes) -> (N, ...) maps
MAPS: Registry = Registry("interpretation map")
register_map = MAPS.register


def interpretation_map(name: str, model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
                       **kwargs):
    """The map `name` of `classes` (default: predicted) for images x in [0, 1]; kwargs go to the map."""
    return MAPS.get(name)(model, x, classes=classes, **kwargs)


def differentiable_map(map_fn: str | MapFn) -> MapFn:
    """The map (a registered name or a function) in the form an attack can differentiate with respect to x.

    Gradient-based maps (Grad-CAM, saliency, SmoothGrad, IG, ...) detach their result unless asked for
    `create_graph=True`; maps built from the model's own layers (CAM, attention, prototype) keep the graph as
    they are."""
    fn = MAPS.get(map_fn) if isinstance(map_fn, str) else map_fn
    if isinstance(fn, functools.partial) and fn.keywords.get("create_graph"):
        return fn
    try:
        takes_graph = "create_graph" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_graph = False
    return functools.partial(fn, create_graph=True) if takes_graph else fn
