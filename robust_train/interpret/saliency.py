"""Saliency (Simonyan et al., 2014): S = |∂y_c/∂x|, y_c the logit of class c, at input resolution.

Choices: the logit, not the softmax probability, is differentiated (as captum and jacobgil do), so a map does
not vanish when the model is confident. Channels are reduced by max of |g| (Simonyan et al.) by default, or by
"sum"; `reduce=None` keeps captum's per-channel output. Gradients come from torch.autograd.grad on a batch-first
sum of the selected logits (one backward for the batch, exact because examples do not interact; BatchNorm in
train mode breaks that, so attribute in eval mode), never from .backward(), so parameter .grad is left alone.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret.registry import register_map

REDUCTIONS = ("max", "sum", None)


def input_gradients(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
                    create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂y_c/∂x (N, C, H, W), classes (N,)): classes=None picks the prediction at x from the same forward pass.

    With create_graph the gradient stays a function of x (and of the parameters) for double backpropagation.
    """
    with torch.enable_grad():
        xg = x if create_graph else x.detach()
        if not xg.requires_grad:
            xg = xg.detach().requires_grad_(True)
        logits = model(xg)
        if classes is None:
            classes = logits.argmax(1)
        y = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(y, xg, create_graph=create_graph)
    return grad, classes


def reduce_channels(maps: torch.Tensor, abs: bool, reduce: str | None) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W) by max or sum over channels (after |.| when abs); reduce=None keeps channels."""
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown channel reduction {reduce!r}; use 'max', 'sum' or None")
    if abs:
        maps = maps.abs()
    if reduce is None:
        return maps
    return maps.amax(1) if reduce == "max" else maps.sum(1)


@register_map("saliency")
def saliency(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, abs: bool = True,
             reduce: str | None = "max", create_graph: bool = False) -> torch.Tensor:
    """Saliency maps (N, H_in, W_in) of `classes` (default: predicted) for images x in [0, 1]."""
    grad, _ = input_gradients(model, x, classes, create_graph)
    return reduce_channels(grad, abs, reduce)
