"""What every attack shares: the threat model (projection, random start), the loss it ascends, and the
guarantee that the model comes back exactly as it was handed over (mode, BatchNorm statistics, `.grad`).

Inputs are images in [0, 1]; normalisation lives inside the model, so ε means the same for every model.
Gradients are taken with `torch.autograd.grad` with respect to the current iterate itself, never through a
clamp, so a pixel sitting on the 0 or 1 border still gets a gradient and can move back inside.

Mixed precision: an attack may run inside `torch.autocast` (bf16; Lightning's `--trainer.precision bf16-mixed` wraps
the whole training step in it). The model's forward then runs in bf16, but the loss is always computed from float32
logits, and x, the iterate, its gradient (autograd returns it in x's dtype), the step, the projection and the
clamp to [0, 1] stay float32, so x' is in the ε-ball and in [0, 1] exactly, whatever the autocast state. A bf16 or
fp16 x is promoted to float32 (x' comes back float32). fp16 autocast ("16-mixed") is not scaled here: its attack
gradients may underflow, so prefer bf16. Attacks also take channels_last inputs (every operation here is
elementwise or per example, layout-agnostic).
"""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.errors import ConfigError
from robust_train.modes import model_mode

Norm = Literal["linf", "l2"]
LossName = Literal["ce", "margin"]
BNMode = Literal["eval", "train"]


def check_eps(eps: float, norm: str = "linf") -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0 or (norm == "linf" and eps > 1):
        bound = "[0, 1] (images live in [0, 1])" if norm == "linf" else "[0, inf)"
        raise ConfigError(f"eps={eps} is out of range for the {norm} threat model: use a value in {bound}")
    return eps


def check_positive(name: str, value, allow_zero: bool = False):
    """`value` if it is a finite number > 0 (>= 0 with allow_zero), else a ConfigError naming `name`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not (number >= 0 if allow_zero else number > 0):
        raise ConfigError(f"{name}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")
    return value


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (what a forward under autocast returns) -> float32; float32 and float64 pass unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: LossName = "ce",
                target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example loss that the attack *ascends*.

    Untargeted: cross-entropy of the true class, or the margin max_{j≠y} z_j − z_y (Carlini-Wagner).
    Targeted: −cross-entropy of the target, or the margin z_t − max_{j≠t} z_j.
    """
    cls = y if target is None else target
    logits = upcast(logits)  # under autocast the logits are bf16: the loss (and its comparisons) in float32
    if loss == "ce":
        ce = F.cross_entropy(logits, cls, reduction="none")
        return ce if target is None else -ce
    if loss == "margin":
        own = logits.gather(1, cls[:, None]).squeeze(1)
        others = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
        return others - own if target is None else own - others
    raise ConfigError(f"unknown attack loss {loss!r}: use 'ce' or 'margin'")


def objective_gradient(objective, x_adv: torch.Tensor):
    """Gradient of the summed per-example loss of `objective(x) -> (logits, losses)` with respect to the iterate
    itself; returns (grad, logits, losses), detached."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits, losses = objective(x_adv)
    (grad,) = torch.autograd.grad(losses.sum(), x_adv)
    return grad, logits.detach(), losses.detach()


def logits_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossName = "ce",
                    target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-example attack loss) at x; the logits in float32 (or float64) whatever the autocast state."""
    logits = upcast(model(x))
    return logits, attack_loss(logits, y, loss, target)


def input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: LossName = "ce",
                   target: torch.Tensor | None = None):
    """Gradient of the summed per-example loss with respect to the iterate; returns (grad, logits, loss)."""
    return objective_gradient(lambda x: logits_and_loss(model, x, y, loss, target), x_adv)


def _per_example(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm = "linf") -> torch.Tensor:
    """Closest point to x_adv inside the ε-ball around x, then clipped to [0, 1] (stays in the ball)."""
    if norm == "linf":
        # Box then [0, 1] is one clamp to [clip(x − ε), clip(x + ε)]: the same numbers in fewer elementwise ops.
        return torch.clamp(x_adv, (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0))
    if norm == "l2":
        delta = x_adv - x
        norms = _per_example(delta).norm(dim=1).clamp_min(1e-12)
        # x + (x' − x) need not round back to x' bit for bit: a point already inside the ball is kept as given.
        x_adv = torch.where(_expand(norms <= eps, x_adv), x_adv, x + delta * _expand(eps / norms, delta))
    else:
        raise ConfigError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
    return x_adv.clamp(0.0, 1.0)


class Projector:
    """`project` onto one fixed threat set: the L∞ box [clip(x − ε), clip(x + ε)] is built once per attack instead
    of at every step, which on a GPU saves four kernel launches per iteration of a launch-bound small model."""

    def __init__(self, x: torch.Tensor, eps: float, norm: Norm = "linf"):
        self.x, self.eps, self.norm = x, eps, norm
        self.bounds = ((x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)) if norm == "linf" else None

    def __call__(self, x_adv: torch.Tensor) -> torch.Tensor:
        if self.bounds is not None:
            return torch.clamp(x_adv, *self.bounds)
        return project(x_adv, self.x, self.eps, self.norm)


def steepest_step(x_adv: torch.Tensor, grad: torch.Tensor, step_size: float, norm: Norm = "linf") -> torch.Tensor:
    """Ascent step of length `step_size` in the norm's steepest direction (sign for L∞, unit gradient for L2)."""
    if norm == "linf":
        return x_adv + step_size * grad.sign()
    norms = _per_example(grad).norm(dim=1).clamp_min(1e-12)
    return x_adv + step_size * grad / _expand(norms, grad)


def random_start(x: torch.Tensor, eps: float, norm: Norm = "linf",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform point of the ε-ball around x, clipped to [0, 1]."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _expand(_per_example(direction).norm(dim=1).clamp_min(1e-12), x)
        d = _per_example(x).shape[1]
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d) * eps
        delta = direction * _expand(radius, x)
    return (x + delta).clamp(0.0, 1.0)


class Attack:
    """An attack is a callable `attack(model, x, y, target=None) -> x_adv`.

    Subclasses implement `perturb` with the model already in attack mode and gradients enabled; this base
    checks the arguments, restores the model afterwards and returns a detached tensor.
    """

    name = "attack"
    steps = 1
    restarts = 1

    def __init__(self, eps: float, *, norm: Norm = "linf", loss: LossName = "ce", targeted: bool = False,
                 bn_mode: BNMode = "eval"):
        if norm not in ("linf", "l2"):
            raise ConfigError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
        if loss not in ("ce", "margin"):
            raise ConfigError(f"unknown attack loss {loss!r}: use 'ce' or 'margin'")
        self.eps = check_eps(eps, norm)
        self.norm, self.loss, self.targeted, self.bn_mode = norm, loss, targeted, bn_mode
        self.step_size = self.eps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        if self.targeted and target is None:
            raise ValueError(f"{self.name} is targeted: pass target= (one class per example)")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attacks need gradients but inference mode is on: run Lightning with "
                               "Trainer(inference_mode=False) or call the attack outside torch.inference_mode()")
        x = x.detach()
        x = upcast(x)  # the threat set in float32: bf16 steps are 1/256 near 1
        if not torch.is_tensor(self.eps) and self.eps == 0:
            return x.clone()
        with model_mode(model, self.bn_mode, grad=True):
            x_adv = self.perturb(model, x, y, target if self.targeted else None)
        return x_adv.detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def per_example_eps(self, eps: torch.Tensor) -> "Attack":
        """A copy of this L∞ attack with one ε per example (`eps`, shape (N,)) and its step size scaled by ε / self.eps:
        every example gets the attack this one runs at self.eps, shrunk to its own ε, in one batched call (the
        explorer computes an image's whole ε grid this way). Only attacks whose perturb uses ε through `Projector`,
        `project`, `random_start` and `steepest_step` (elementwise, so a (N, 1, 1, 1) ε broadcasts) declare
        `per_example_eps_ok`; early stopping, which drops rows of the batch, is turned off."""
        if not getattr(self, "per_example_eps_ok", False) or self.norm != "linf":
            raise ConfigError(f"{self.name} cannot run one ε per example: use an L∞ FGSM, PGD or AAI attack")
        if self.eps <= 0:
            raise ConfigError("per_example_eps scales the attack built at ε > 0: build it at the largest ε")
        eps = torch.as_tensor(eps, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(eps).all() or (eps < 0).any() or (eps > 1).any():
            raise ConfigError("per-example ε must be finite and in [0, 1] (images live in [0, 1])")
        scaled = copy.copy(self)
        scaled.eps = eps.reshape(-1, 1, 1, 1)
        scaled.step_size = self.step_size * scaled.eps / self.eps
        if hasattr(scaled, "early_stop"):
            scaled.early_stop = False
        return scaled

    def describe(self) -> dict:
        """What a report needs to say which attack produced a number."""
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "steps": self.steps,
                "step_size": self.step_size, "restarts": self.restarts, "loss": self.loss,
                "targeted": self.targeted}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "attack")
        return f"{type(self).__name__}({args})"
