"""Universal adversarial perturbations (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, CVPR 2017, arXiv:1610.08401):
one image-agnostic v, ‖v‖_p ≤ ε, that changes the model's decision on most images x when added to them.

Algorithm 1 of the paper, with k the model's own clean prediction (no labels are needed) and P_{p,ε} the projection
onto the ε-ball of the norm:
    v ← 0
    repeat (one pass = the training images once, in a fresh random order):
        for each x_i with k(x_i + v) = k(x_i):
            Δv_i ← DeepFool's minimal perturbation sending x_i + v across the boundary of k(x_i)
            v ← P_{p,ε}(v + Δv_i)
    until the fooling rate on the training images reaches `target_fooling` (1 − δ in the paper) or `max_passes`.
Here x + v always means clip(x + v, 0, 1) (`apply_perturbation`): DeepFool starts from the clipped image; v itself
is not clipped to [0, 1], only bounded by ε. As in the paper (its eq. for Δv_i minimises ‖r‖₂) and the authors' code,
Δv_i is DeepFool's L2 perturbation whatever the norm of v (`deepfool_norm="linf"` or None uses the L∞ one), with 10
iterations and overshoot 0.02, and a Δv_i DeepFool did not find within its iterations is left out; δ = 0.2.

Where this differs from the paper:
- Batching: `batch_size` images are handled per update. The still-unfooled ones among them all get their Δv_i at
  the same v (one batched DeepFool) and v ← P_{p,ε}(v + Σ_i Δv_i): the paper's sequential update, except that the
  images of a mini-batch each see the v of the mini-batch's start instead of the one their predecessors just
  updated, and v is projected once per mini-batch instead of once per image. `batch_size=1` is the paper's loop.
- At most `max_passes` passes (the paper loops until the target is met), and the v returned is the one with the
  highest fooling rate on the training images at the end of a pass, not the last one: once v sits on the ε-sphere
  the still-unfooled images pull it back and forth, and on MNIST a later pass is often worse than an earlier one.

The fooling rate is the share of images whose prediction under clip(x + v) differs from the one on x (the paper's
definition), whether or not that prediction was right.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from robust_train.attacks.base import Norm, _expand, _per_example, check_eps, upcast
from robust_train.attacks.deepfool import deepfool
from robust_train.attacks.minimal import check_gradients_possible
from robust_train.errors import ConfigError
from robust_train.modes import model_mode


class UniversalResult(NamedTuple):
    """v: the perturbation, shaped like one image (C, H, W), ‖v‖ ≤ ε in its norm; fooling_rate_train: the share of
    the images it was computed on whose prediction clip(x + v) changes; passes: passes made over them."""

    v: torch.Tensor
    fooling_rate_train: float
    passes: int


def apply_perturbation(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """clip(x + v, 0, 1): v (C, H, W) added to every image of x (N, C, H, W), or to the one image x (C, H, W)."""
    return (x + v).clamp(0.0, 1.0)


def project_perturbation(v: torch.Tensor, eps: float, norm: Norm = "linf") -> torch.Tensor:
    """P_{p,ε}: the closest point to v (one perturbation, any shape) of the ε-ball of the norm, v not clipped to
    [0, 1] (unlike `attacks.base.project`, which projects an image)."""
    if norm == "linf":
        return v.clamp(-eps, eps)
    if norm == "l2":
        size = v.norm()
        return v * (eps / size) if size > eps else v
    raise ConfigError(f"unknown norm {norm!r}: use 'linf' or 'l2'")


def perturbation_norm(v: torch.Tensor, norm: Norm = "linf") -> torch.Tensor:
    """‖v‖ of each perturbation of a batch (N, ...) in the norm: (N,)."""
    flat = _per_example(v)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)


def random_like(v_shape: Sequence[int] | torch.Tensor, eps: float, norm: Norm = "linf",
                generator: torch.Generator | None = None, *, n: int | None = None, device=None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Random noise of exactly the norm ε, the baseline of a universal perturbation: L∞, random signs × ε (the same
    L∞ norm as v and the largest L2 norm any perturbation of that L∞ norm has); L2, a Gaussian scaled to ε (a uniform
    direction). v_shape: one perturbation's shape (or a tensor whose shape, device and dtype are taken); n: that many
    independent draws, (n, *v_shape), each of norm ε. Drawn on the generator's device (CPU by default), then moved."""
    if torch.is_tensor(v_shape):
        device = v_shape.device if device is None else device
        dtype = v_shape.dtype if dtype is None else dtype
        v_shape = v_shape.shape
    if norm not in ("linf", "l2"):
        raise ConfigError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
    eps = check_eps(eps, norm)
    shape = (1 if n is None else n, *v_shape)
    where = generator.device if generator is not None else "cpu"
    if norm == "linf":
        noise = torch.randint(0, 2, shape, generator=generator, device=where).float().mul(2).sub(1) * eps
    else:
        noise = torch.randn(shape, generator=generator, device=where)
        noise = noise * _expand(eps / perturbation_norm(noise, "l2").clamp_min(1e-12), noise)
    noise = noise.to(device=device, dtype=dtype or torch.float32)
    return noise[0] if n is None else noise


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Predicted classes (N,) in eval mode without gradients, `batch_size` images at a time."""
    if not len(x):
        return torch.zeros(0, dtype=torch.long, device=x.device)
    with model_mode(model, "eval", grad=False):
        return torch.cat([upcast(model(x[i:i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])


def fooled(model: nn.Module, x: torch.Tensor, v: torch.Tensor, clean_pred: torch.Tensor | None = None,
           batch_size: int = 250) -> torch.Tensor:
    """Per image (N,) bool: does the prediction on clip(x + v) differ from clean_pred (default: the one on x)?
    v: one perturbation (C, H, W) for every image, or one per image (N, C, H, W)."""
    if clean_pred is None:
        clean_pred = predict(model, x, batch_size)
    return predict(model, apply_perturbation(x, v), batch_size) != clean_pred.to(x.device)


def _check(eps, norm, max_passes, target_fooling, deepfool_steps, overshoot, batch_size) -> float:
    if norm not in ("linf", "l2"):
        raise ConfigError(f"unknown norm {norm!r} for a universal perturbation: use 'linf' or 'l2'")
    eps = check_eps(eps, norm)
    for name, value in (("max_passes", max_passes), ("deepfool_steps", deepfool_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a whole number >= 1")
    if isinstance(target_fooling, bool) or not isinstance(target_fooling, numbers.Real) \
            or not 0 <= target_fooling <= 1:
        raise ConfigError(f"target_fooling={target_fooling!r} must be a fooling rate in [0, 1] (the paper: 0.8)")
    if isinstance(overshoot, bool) or not isinstance(overshoot, numbers.Real) or not math.isfinite(overshoot) \
            or overshoot < 0:
        raise ConfigError(f"overshoot={overshoot!r} is out of range: use a finite number >= 0 (the paper uses 0.02)")
    return eps


def universal_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float,
                           norm: Norm = "linf", max_passes: int = 5, target_fooling: float = 0.8,
                           deepfool_steps: int = 10, overshoot: float = 0.02, deepfool_norm: Norm | None = "l2",
                           batch_size: int = 16, generator: torch.Generator | None = None,
                           progress: bool = False) -> UniversalResult:
    """A universal perturbation of the images x (N, C, H, W) in [0, 1] (Algorithm 1 of the paper, batched: see the
    module docstring), usable without Lightning.

    y is ignored (the paper needs no labels: an image counts as fooled when the model's prediction changes); it is
    accepted so that the call reads like an attack's. deepfool_norm: the norm of the per-image minimal perturbations
    Δv_i, L2 as in the paper and its code whatever the norm of v (None: `norm`). batch_size: images per update of v
    (1: the paper's sequential loop). generator: the order of each pass (seeded: the same v every time). The model
    runs in eval mode and comes back in its own modes, its parameters' `.grad` untouched.

    Example: ``v, rate, passes = universal_perturbation(model, x_train, eps=0.2)``
    """
    eps = _check(eps, norm, max_passes, target_fooling, deepfool_steps, overshoot, batch_size)
    deepfool_norm = norm if deepfool_norm is None else deepfool_norm
    if deepfool_norm not in ("linf", "l2"):
        raise ConfigError(f"deepfool_norm={deepfool_norm!r}: use 'l2' (the paper's), 'linf' or None (the norm of v)")
    check_gradients_possible("universal_perturbation")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    x = upcast(x.detach())
    v = torch.zeros_like(x[0])
    if not len(x) or eps == 0:
        return UniversalResult(v, 0.0, 0)
    eval_batch = max(batch_size, 250)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_passes, desc="universal perturbation", unit="pass")
    with model_mode(model, "eval"):
        clean_pred = predict(model, x, eval_batch)
        best_v, best_rate, passes = v, -1.0, 0  # the first pass's v, then only a strictly better one
        while passes < max_passes and best_rate < target_fooling:
            order = torch.randperm(len(x), generator=generator, device=generator.device if generator else "cpu")
            for rows in order.to(x.device).split(batch_size):
                xv = apply_perturbation(x[rows], v)
                k = clean_pred[rows]
                unfooled = predict(model, xv, len(rows)) == k
                if not unfooled.any():
                    continue
                start = xv[unfooled]
                found = deepfool(model, start, k[unfooled], norm=deepfool_norm, overshoot=overshoot,
                                 steps=deepfool_steps)
                if found.success.any():  # as the authors' code, only the Δv_i DeepFool found within its steps
                    v = project_perturbation(v + (found.x_adv - start)[found.success].sum(0), eps, norm)
            passes += 1
            rate = fooled(model, x, v, clean_pred, eval_batch).float().mean().item()
            if rate > best_rate:
                best_v, best_rate = v.clone(), rate
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"fooling rate {rate:.3f}")
    if bar is not None:
        bar.close()
    return UniversalResult(best_v.detach(), best_rate, passes)
