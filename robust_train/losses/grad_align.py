"""GradAlign (Andriushchenko & Flammarion, NeurIPS 2020, "Understanding and improving fast adversarial training",
arXiv:2007.02617, code tml-epfl/understanding-fast-adv-training): the regulariser

    1 − mean_i cos(∇ₓℓ(x_i, y_i), ∇ₓℓ(x_i + η_i, y_i)),   η ~ U(−ε, ε)^d,

which keeps the loss locally linear inside the ε-ball, so that FGSM's linear approximation stays good and FGSM
training does not overfit catastrophically.

As in the reference code (train.py, utils.get_input_grad):
* the gradient at x is a constant (detached); the one at x + η is built with `create_graph=True`, so the
  regulariser's gradient reaches the weights by double backpropagation;
* cos is taken between flattened per-example gradients, and only examples whose two gradients are both non-zero
  enter the mean (0 when none does);
* the gradients are computed with the model in its current mode: the training step's train mode, BatchNorm on
  batch statistics (their running averages are updated by these forwards too, as in the reference).
Differences: ℓ is the summed, not the mean, cross-entropy (cos does not see the 1/N, and larger gradients keep
clear of float32 underflow); the caller clips η so that x + η ∈ [0, 1] (the reference does not clip this point),
see `uniform_noise`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks.base import random_start, upcast


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """∇ₓ Σ_i CE(f(x_i), y_i): row i is example i's own input gradient. `torch.autograd.grad` with respect to x
    only, so no parameter's `.grad` is touched; with `create_graph` the result is differentiable in the weights."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(upcast(model(x)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad


def alignment_penalty(grad_clean: torch.Tensor, grad_noisy: torch.Tensor) -> torch.Tensor:
    """1 − mean cos(g₁ᵢ, g₂ᵢ) over the examples whose two flattened gradients are both non-zero; in [0, 2].

    The zero rows are dropped before any norm is taken: a norm at 0 has an infinite derivative, which would turn
    the double backward into NaN even for a row that is masked out afterwards."""
    g1, g2 = grad_clean.flatten(1), grad_noisy.flatten(1)
    with torch.no_grad():
        keep = (g1.norm(dim=1) != 0) & (g2.norm(dim=1) != 0)
    if not keep.any():
        return (g2 * 0).sum()  # 0, still part of the graph so that a backward through it works
    g1, g2 = g1[keep], g2[keep]
    cos = (g1 * g2).sum(1) / (g1.norm(dim=1) * g2.norm(dim=1))
    return 1 - cos.mean()


def gradient_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """GradAlign's regulariser at the noise `eta` (see the module docstring): 1 − mean_i cos(∇ℓ(x_i), ∇ℓ(x_i + η_i)),
    differentiable in the model's weights through the second gradient only."""
    grad_clean = input_gradients(model, x, y).detach()
    grad_noisy = input_gradients(model, x + eta, y, create_graph=True)
    return alignment_penalty(grad_clean, grad_noisy)


def uniform_noise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """η ~ U(−ε, ε)^d, clipped so that x + η stays an image in [0, 1]."""
    return random_start(x, eps) - x
