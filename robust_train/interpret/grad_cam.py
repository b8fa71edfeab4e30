"""Grad-CAM (Selvaraju et al., 2017): α_k = mean_ij ∂y_c/∂A_k(i, j), map = ReLU(Σ_k α_k A_k), at feature
resolution.

A is the model's last feature map (`model.features`), y_c the logit (jacobgil's default target). Unlike jacobgil
we stay in torch, batch-first, and do not min-max normalise or resize: the raw map is what a loss or a metric
needs, and callers can upsample. `relu=False` gives the signed map, which for a GAP + linear head equals
CAM/(H·W). Gradients come from torch.autograd.grad (never .backward(), so parameter .grad is untouched); with
create_graph=True the map stays differentiable with respect to x.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.interpret.registry import register_map


def feature_gradients(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
                      create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, ∂y_c/∂A), both (N, K, H, W); classes=None picks the prediction from the same forward pass."""
    with torch.enable_grad():
        if create_graph:
            fmap = model.features(x)
        else:  # only the head needs a graph: A is a leaf, and the body's graph is never built
            with torch.no_grad():
                fmap = model.features(x)
        if not fmap.requires_grad:
            fmap = fmap.detach().requires_grad_(True)
        logits = model.logits_from_features(fmap)
        if classes is None:
            classes = logits.argmax(1)
        y = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(y, fmap, create_graph=create_graph)
    if not create_graph:
        fmap = fmap.detach()
    return fmap, grad


@register_map("grad_cam")
def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, relu: bool = True,
             create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) of `classes` (default: predicted) for images x in [0, 1]."""
    fmap, grad = feature_gradients(model, x, classes, create_graph)
    maps = torch.einsum("nk,nkhw->nhw", grad.mean(dim=(2, 3)), fmap)
    return maps.relu() if relu else maps
