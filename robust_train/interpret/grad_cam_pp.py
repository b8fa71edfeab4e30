"""Grad-CAM++ (Chattopadhay et al., 2018) exactly as jacobgil/pytorch-grad-cam computes it:

    a_ij = g² / (2g² + (Σ_ab A_ab)·g³ + 1e-6),  a_ij = 0 where g == 0,   g = ∂y_c/∂A_k(i, j), y_c the logit,
    w_k = Σ_ij a_ij·ReLU(g_ij),   map = ReLU(Σ_k w_k A_k)   at feature resolution.

(Σ_ab A_ab) multiplies g³ once per channel (the correct Eq. 19, not the common per-pixel Σ A·g³ bug). Eq. 19
assumes an exponential output; we follow jacobgil and use the logit anyway, so maps match that reference. No
normalisation or resizing, for the same reasons as Grad-CAM; `relu=False` returns the signed map.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.interpret.grad_cam import feature_gradients
from robust_train.interpret.registry import register_map

EPS = 1e-6  # jacobgil's constant in the denominator


@register_map("grad_cam_pp")
def grad_cam_pp(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, relu: bool = True,
                create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM++ maps (N, H, W) of `classes` (default: predicted) for images x in [0, 1]."""
    fmap, g = feature_gradients(model, x, classes, create_graph)
    g2 = g * g
    a = g2 / (2 * g2 + fmap.sum(dim=(2, 3), keepdim=True) * g2 * g + EPS)
    a = torch.where(g != 0, a, torch.zeros_like(a))
    weights = (a * g.relu()).sum(dim=(2, 3))
    maps = torch.einsum("nk,nkhw->nhw", weights, fmap)
    return maps.relu() if relu else maps
