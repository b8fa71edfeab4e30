"""The attention map of an attentional-pooling model (Girdhar & Ramanan, NIPS 2017;
`robust_train.models.attention_pool`): a_c ⊙ b, the product of the class's top-down map and the class-agnostic
bottom-up map, at feature resolution, signed and unnormalised. It is the map the model scores with,
logit_c = mean_ij map_c(i, j) exactly, so it plays the role CAM plays for a GAP + linear model (and for
AttentionPoolClassifier it is numerically the same as `cam`, see the model's docstring).

Registered as "attention": `interpretation_map("attention", model, x, classes)`, `evaluate --map attention`,
`map_stability.map: attention`, or `AAI(eps, map_fn=attention_map)`. Linear in the top-down weights and built
from ordinary layers, so it keeps the graph and is differentiable with respect to x (what AAI descends through).
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret.cam import select_classes
from robust_train.interpret.registry import register_map


@register_map("attention")
def attention_map(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention map (N, H, W) of `classes` (default: the predicted class) for images x in [0, 1]; keeps the graph.

    The model must have `attention_maps(x) -> (N, num_classes, H, W)` whose spatial mean is its logits (the
    attention-pooling contract); the prediction is read from that mean, so one forward pass serves both."""
    attention_maps = getattr(model, "attention_maps", None)
    if not callable(attention_maps):
        raise ConfigError(f"the 'attention' map needs an attention-pooling model (one with `attention_maps`, e.g. "
                          f"arch attention_pool); {type(model).__name__} has none: use map 'cam' or 'grad_cam'")
    maps = attention_maps(x)
    if classes is None:
        classes = maps.mean(dim=(2, 3)).argmax(1)
    return select_classes(maps, classes.to(maps.device))
