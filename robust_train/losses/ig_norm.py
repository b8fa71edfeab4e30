"""The IG-Norm regulariser (Chen et al., NeurIPS 2019, "Robust attribution regularization"), as Boopathy et al.
(ICML 2020, Tables 1 and 3) train it: integrated gradients of the loss along the straight path from the clean x to
the adversarial x', by the 5-point right Riemann sum of the authors' code (AkhilanB/Proper-Interpretability,
train.py::train_ig):

    IG(x, x') = (x' − x) ⊙ (1/m)·Σ_{k=1..m} ∇_z ℓ(z_k, y),   z_k = x + (k/m)(x' − x),   ℓ = cross-entropy
    penalty   = ‖IG(x, x')‖₁ per example

By completeness IG sums to about ℓ(x') − ℓ(x); its L1 norm also counts the pixels whose contributions cancel.
The gradients are per example (of the summed per-example losses); the authors differentiate the batch-mean loss,
which divides every IG by the batch size: the methods carry that factor in λ (robust_train.methods.ig_norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.errors import ConfigError


def path_integrated_gradients(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                              points: int = 5, create_graph: bool = False) -> torch.Tensor:
    """IG(x, x') of the per-example cross-entropy, shape of x, by the right Riemann sum with `points` points.

    With create_graph=True the result is differentiable with respect to x' (through the factor x' − x and through
    the path points z_k, a second-order term: what the inner attack ascends) and to the weights (double backprop:
    what the outer loss trains). With create_graph=False it comes back detached.

    The m path points go through the model as one batch of m·N rows: a model with BatchNorm in train mode would
    normalise over all of them (the small CNNs of the paper have none; the attacks run in eval mode).
    """
    if isinstance(points, bool) or int(points) != points or points < 1:
        raise ConfigError(f"points={points} must be a whole number >= 1 (the Riemann sum's path points)")
    points = int(points)
    if not create_graph:
        x, x_adv = x.detach(), x_adv.detach()
    with torch.enable_grad():
        diff = x_adv - x
        alphas = torch.arange(1, points + 1, device=x.device, dtype=diff.dtype) / points
        alphas = alphas.view(-1, *([1] * x.dim()))
        z = (x.unsqueeze(0) + alphas * diff.unsqueeze(0)).flatten(0, 1)  # (m·N, ...), point-major
        if not z.requires_grad:
            z.requires_grad_(True)  # a fresh leaf; otherwise z is a function of x' and its gradient stays one too
        logits = model(z)
        if logits.dtype in (torch.float16, torch.bfloat16):  # under autocast: the loss in float32, as the attacks do
            logits = logits.float()
        losses = F.cross_entropy(logits, y.repeat(points), reduction="none")
        (grad,) = torch.autograd.grad(losses.sum(), z, create_graph=create_graph)
        ig = diff * grad.reshape(points, *x.shape).mean(0)
    return ig if create_graph else ig.detach()


def ig_norm_penalty(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, points: int = 5,
                    create_graph: bool = False) -> torch.Tensor:
    """‖IG(x, x')‖₁ per example, shape (N,): the IG-Norm regulariser before the batch mean and λ."""
    return path_integrated_gradients(model, x, x_adv, y, points, create_graph).flatten(1).abs().sum(1)

