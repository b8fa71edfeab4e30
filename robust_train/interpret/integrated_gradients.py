"""Integrated Gradients (Sundararajan et al., 2017): IG_i = (x − x')_i ∫_0^1 ∂y_c(x' + α(x − x'))/∂x_i dα.

Per input channel, (N, C, H, W), like captum. The integral uses captum's quadratures with the same α's and
weights ("riemann_right" by default: Boopathy et al.'s rule, and captum's default "gausslegendre"), so results
match captum to rounding. "riemann_trapezoid" is the exact trapezoid rule (weights 1/(n − 1), halved at the
ends); captum's uses 1/n, whose weights sum to (n − 1)/n, so its attributions are ours times (n − 1)/n.
Defaults: baseline 0 (black image), 50 steps, y_c the logit, class decided at x. Unlike captum,
create_graph=True keeps the attribution differentiable with respect to x (for training losses; through ReLU nets
second derivatives vanish, hence Boopathy's softplus).
The α's go through the model in chunks of about `internal_batch_size` rows (default 256) to bound memory.
return_delta adds the per-example completeness error Σ_i IG_i − (y_c(x) − y_c(x')).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret.registry import register_map
from robust_train.interpret.saliency import input_gradients

ROWS_PER_PASS = 256
METHODS = ("riemann_right", "gausslegendre", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(α's, weights) on [0, 1], as captum's approximation_methods builds them, but for the trapezoid."""
    if method == "riemann_right":
        return torch.linspace(1 / steps, 1, steps).tolist(), [1 / steps] * steps
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ConfigError("riemann_trapezoid needs steps >= 2")
        weights = [1 / (steps - 1)] * steps  # nodes 1/(steps − 1) apart; captum uses 1/steps (sum ≠ 1)
        weights[0] /= 2
        weights[-1] /= 2
        return torch.linspace(0, 1, steps).tolist(), weights
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * w).tolist()
    raise ConfigError(f"unknown integration method {method!r}; use one of {', '.join(METHODS)}")


@register_map("integrated_gradients")
def integrated_gradients(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
                         baseline: torch.Tensor | float | None = None, steps: int = 50,
                         method: str = "riemann_right", create_graph: bool = False, return_delta: bool = False,
                         internal_batch_size: int | None = None):
    """IG (N, C, H, W) of `classes` (default: predicted at x); with return_delta, (IG, delta (N,))."""
    if steps < 1:
        raise ConfigError(f"integrated_gradients needs steps >= 1, got {steps}")
    alphas, weights = quadrature(method, steps)
    if not create_graph:
        x = x.detach()
    baseline = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype,
                                                                            device=x.device).expand_as(x)
    n = x.shape[0]
    grad_ctx = torch.enable_grad() if create_graph else torch.no_grad()
    if classes is None or return_delta:
        with grad_ctx:
            fx = model(x)
        if classes is None:
            classes = fx.argmax(1)
    diff = x - baseline
    per_pass = max(1, (internal_batch_size or ROWS_PER_PASS) // n)  # α's per forward pass
    total = torch.zeros_like(x)
    for start in range(0, steps, per_pass):
        a = torch.tensor(alphas[start:start + per_pass], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1, 1)
        w = torch.tensor(weights[start:start + per_pass], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1, 1)
        path = (baseline + a * diff).flatten(0, 1)
        grad, _ = input_gradients(model, path, classes.repeat(a.shape[0]), create_graph)
        total = total + (w * grad.reshape(a.shape[0], *x.shape)).sum(0)
    attr = diff * total
    if not return_delta:
        return attr
    with grad_ctx:
        fb = model(baseline)
    idx = classes.view(-1, 1)
    delta = attr.sum(dim=tuple(range(1, x.dim()))) - (fx.gather(1, idx) - fb.gather(1, idx)).squeeze(1)
    return attr, delta
