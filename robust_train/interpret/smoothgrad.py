"""SmoothGrad (Smilkov et al., 2017): M = (1/n) Σ_s ∂y_c/∂x at x + ε_s, ε_s ~ N(0, σ²), then channel reduction.

Choices, and why:
* σ = noise_level·(x_max − x_min) with the range of pixel space [0, 1], so σ = noise_level; the noise is added
  in pixel space, before the model's own normalisation, so one σ means the same on every data set and matches
  the paper's "noise level" (10–20%; default 15%) and n = 50 (captum's default of 5 samples is too few).
* Noisy images are not clamped to [0, 1]: clamping would make the noise one-sided near 0 and 1 and bias the mean.
* The class is decided once, at the clean x, so every sample explains the same logit.
* abs=True takes |g| per sample before averaging (captum's NoiseTunnel over Saliency(abs=True)); the default
  abs=False averages signed gradients, which is what makes SmoothGrad = w on a linear model for any σ.
  Channels are reduced after averaging ("sum", "max", or None to keep them).
* Samples go through the model in chunks of about `internal_batch_size` rows (whole copies of the batch), so
  memory is bounded whatever n is. Pass a torch.Generator (on x's device) for reproducible noise.
* The gradients are detached unless `create_graph=True`, which keeps the averaged map differentiable with respect
  to x (double backpropagation, what AAI needs to attack it; through ReLU networks those second derivatives vanish
  almost everywhere, as for saliency). The noise is drawn anew on every call, so an attack sees a stochastic map.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret.registry import register_map
from robust_train.interpret.saliency import input_gradients, reduce_channels

ROWS_PER_PASS = 256  # default internal_batch_size


@register_map("smoothgrad")
def smoothgrad(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, samples: int = 50,
               noise_level: float = 0.15, abs: bool = False, reduce: str | None = "sum",
               generator: torch.Generator | None = None, internal_batch_size: int | None = None,
               create_graph: bool = False) -> torch.Tensor:
    """SmoothGrad maps (N, H_in, W_in) of `classes` (default: predicted at x) for images x in [0, 1]."""
    if samples < 1 or noise_level < 0:
        raise ConfigError(f"smoothgrad needs samples >= 1 and noise_level >= 0, got {samples} and {noise_level}")
    if not create_graph:
        x = x.detach()
    n = x.shape[0]
    if classes is None:
        with torch.no_grad():
            classes = model(x.detach()).argmax(1)
    per_pass = max(1, (internal_batch_size or ROWS_PER_PASS) // n)  # copies of the batch per forward pass
    total = torch.zeros_like(x)
    for start in range(0, samples, per_pass):
        k = min(per_pass, samples - start)
        noise = torch.randn((k, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + noise_level * noise).flatten(0, 1)
        grad, _ = input_gradients(model, noisy, classes.repeat(k), create_graph)
        grad = grad.reshape(k, *x.shape)
        total = total + (grad.abs() if abs else grad).sum(0)
    return reduce_channels(total / samples, abs=False, reduce=reduce)
