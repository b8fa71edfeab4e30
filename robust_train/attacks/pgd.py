"""PGD (Madry et al., 2018, arXiv:1706.06083): projected steepest ascent under L∞ or L2, from a random start, with
restarts, targeted or not, on cross-entropy or the margin loss. Evaluation keeps, per example, the strongest
iterate seen over all steps and restarts (a misclassified one first, else the highest loss)."""
from __future__ import annotations

import math
from typing import Literal

import torch

from robust_train.attacks.base import (Attack, Projector, check_positive, logits_and_loss, objective_gradient,
                                       random_start, steepest_step)
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError


@register_attack("pgd")
class PGD(Attack):
    """x_{t+1} = Π_ε(x_t + α·step(∇ℓ(x_t))), x₀ uniform in the ε-ball (or x when random_start=False).

    Args:
        steps: iterations (default 10). step_size: α (default 2.5·ε/steps, Madry et al.'s rule).
        step_schedule: "constant" (α every step) or "cosine" (α·½(1 + cos(πt/T)): large exploratory steps
            first, fine ones last; with α = ε it is much stronger than a constant small step on robust models).
        restarts: independent random starts; the best per example is kept.
        keep_best: return each example's strongest iterate instead of the last one (one extra forward per
            restart); on by default, off inside training where the last iterate is what the recipes specify.

    Example: ``x_adv = PGD(eps=0.3, steps=40, step_size=0.01)(model, x, y)``
    """

    name = "pgd"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, random_start: bool = True,
                 restarts: int = 1, keep_best: bool = True,
                 step_schedule: Literal["constant", "cosine"] = "constant", **kwargs):
        super().__init__(eps, **kwargs)
        if step_schedule not in ("constant", "cosine"):
            raise ConfigError(f"step_schedule={step_schedule!r}: use 'constant' or 'cosine'")
        self.step_schedule = step_schedule
        self.steps = int(check_positive("steps", steps))
        self.restarts = int(check_positive("restarts", restarts))
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else check_positive("step_size", step_size)
        self.random_start, self.keep_best = random_start, keep_best

    def perturb(self, model, x, y, target):
        best = _Best(x) if (self.keep_best or self.restarts > 1) else None
        project = Projector(x, self.eps, self.norm)
        for _ in range(self.restarts):
            x_adv = random_start(x, self.eps, self.norm) if self.random_start else x
            for t in range(self.steps):
                grad, logits, losses = self.gradient(model, x_adv, y, target)
                if best is not None:
                    best.update(x_adv, logits, losses, y, target)
                x_adv = project(steepest_step(x_adv, grad, self.step_at(t), self.norm))
            if best is None:
                return x_adv
            with torch.no_grad():
                logits, losses = self.objective(model, x_adv, y, target)
                best.update(x_adv, logits, losses, y, target)
        return best.x

    def objective(self, model, x_adv, y, target) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, per-example loss to ascend) at x_adv. Subclasses change the loss here, not the loop; the
        logits are the model's own, since they decide which iterate counts as a success."""
        return logits_and_loss(model, x_adv, y, self.loss, target)

    def gradient(self, model, x_adv, y, target):
        """(∇ of the summed objective at x_adv, logits, losses), taken at the iterate itself (see base)."""
        return objective_gradient(lambda x: self.objective(model, x, y, target), x_adv)

    def step_at(self, t: int) -> float:
        if self.step_schedule == "constant":
            return self.step_size
        return self.step_size * 0.5 * (1 + math.cos(math.pi * t / self.steps))

    def describe(self) -> dict:
        return {**super().describe(), "random_start": self.random_start, "step_schedule": self.step_schedule}


class _Best:
    """Per-example strongest iterate: a successful one beats an unsuccessful one, then higher loss wins."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device)

    def update(self, x_adv, logits, losses, y, target):
        pred = logits.argmax(1)
        success = pred == target if target is not None else pred != y
        better = (success & ~self.success) | ((success == self.success) & (losses > self.loss))
        self.x[better] = x_adv.detach()[better]
        self.success |= success
        self.loss = torch.where(better, losses, self.loss)
