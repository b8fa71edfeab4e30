"""Adversarial weight perturbation, AWP (Wu, Xia & Wang, NeurIPS 2020, arXiv:2004.05884): besides the worst input,
train at the worst nearby weights, which flattens the loss landscape in weight space and narrows the robust
generalisation gap (robust overfitting) of PGD training.

    v_l = γ · ‖w_l‖ · g_l / ‖g_l‖,   g_l = ∇_{w_l} L(w; x, y, x')     (one ascent step, per layer, relative size γ)
    w ← w − η · ∇_w L(w + v; x, y, x'),  i.e. the gradient at w + v, the step applied to w

The reference code (csdongxian/AWP) finds v with one SGD step of a proxy copy of the model and normalises the
difference per layer; that difference is a multiple of the gradient, so v above is the same vector without the
copy. As there, only weights with more than one dimension (convolution and linear matrices) are perturbed, never
biases or normalisation parameters, and L is the method's own training loss (cross-entropy at x' for PGD-AT,
TRADES' loss for TRADES-AWP), so any method can turn it on.
"""
from __future__ import annotations

import torch
from torch import nn


def perturbed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights AWP moves: trainable tensors of dimension > 1."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def weight_perturbation(params: list[nn.Parameter], loss: torch.Tensor, gamma: float) -> list[torch.Tensor]:
    """v for each of `params`: γ·‖w‖ along the gradient of `loss` (zero where the loss does not depend on w)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(torch.zeros_like(p))
        else:
            out.append(gamma * p.detach().norm() * g / (g.norm() + 1e-20))
    return out


@torch.no_grad()
def shift_weights(params: list[nn.Parameter], v: list[torch.Tensor], sign: float) -> None:
    """w ← w + sign·v in place (sign −1 undoes +1 up to rounding)."""
    for p, d in zip(params, v):
        p.add_(d, alpha=sign)
