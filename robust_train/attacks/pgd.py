"""PGD (Madry et al., 2018, arXiv:1706.06083): projected steepest ascent under L∞ or L2, from a random start, with
restarts, targeted or not, on cross-entropy or the margin loss. Evaluation keeps, per example, the strongest
iterate seen over all steps and restarts (a misclassified one first, else the highest loss), and stops working on
an example once it is misclassified, as AutoAttack does: accuracy under attack is the same, at a fraction of the
cost wherever most examples fall early (large ε, non-robust models, later restarts)."""
from __future__ import annotations

import math
from typing import Literal

import torch

from robust_train.attacks.base import (Attack, Projector, check_positive, logits_and_loss, objective_gradient,
                                       random_start, steepest_step)
from robust_train.attacks.registry import EpsTimes, register_attack
from robust_train.errors import ConfigError


# Cross-entropy and margin PGD complement each other: CE is strong early, the margin loss does not saturate when the
# softmax does (the classic gradient-masking failure of CE). Steps start at ε and shrink on a cosine: on robust
# models a constant small step stalls in flat regions (bench/mnist_pgd.py compares the suite with AutoAttack).
EVALUATION = {"steps": 100, "step_size": EpsTimes(1.0), "step_schedule": "cosine"}


@register_attack("pgd", summary="PGD-100 on cross-entropy, α = ε on a cosine, best iterate (evaluation)",
                 **EVALUATION)
class PGD(Attack):
    """x_{t+1} = Π_ε(x_t + α·step(∇ℓ(x_t))), x₀ uniform in the ε-ball (or x when random_start=False).

    Args:
        steps: iterations (default 10). step_size: α (default 2.5·ε/steps, Madry et al.'s rule).
        step_schedule: "constant" (α every step) or "cosine" (α·½(1 + cos(πt/T)): large exploratory steps
            first, fine ones last; with α = ε it is much stronger than a constant small step on robust models).
        restarts: independent random starts; the best per example is kept.
        keep_best: return each example's strongest iterate instead of the last one (one extra forward per
            restart); on by default, off inside training where the last iterate is what the recipes specify.
        early_stop: with keep_best, drop an example from the batch once an iterate succeeds (misclassified, or
            the target reached) and return that first success. The success of every example is unchanged; only
            which successful iterate comes back differs (the first instead of the highest-loss one), so turn it
            off where the strongest adversarial example matters, as for crafting transfer attacks. Only in
            bn_mode "eval", where each example's forward does not depend on the rest of the batch.

    Example: ``x_adv = PGD(eps=0.3, steps=40, step_size=0.01)(model, x, y)``
    """

    per_example_eps_ok = True  # ε only reaches perturb through elementwise ops (see Attack.per_example_eps)

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, random_start: bool = True,
                 restarts: int = 1, keep_best: bool = True, early_stop: bool = True,
                 step_schedule: Literal["constant", "cosine"] = "constant", **kwargs):
        super().__init__(eps, **kwargs)
        if step_schedule not in ("constant", "cosine"):
            raise ConfigError(f"step_schedule={step_schedule!r}: use 'constant' or 'cosine'")
        self.step_schedule = step_schedule
        self.steps = int(check_positive("steps", steps))
        self.restarts = int(check_positive("restarts", restarts))
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else check_positive("step_size", step_size)
        self.random_start, self.keep_best, self.early_stop = random_start, keep_best, early_stop

    def perturb(self, model, x, y, target):
        if not (self.keep_best or self.restarts > 1):  # training: every example's last iterate
            project = Projector(x, self.eps, self.norm)
            x_adv = self.start(x)
            for t in range(self.steps):
                grad, _, _ = self.gradient(model, x_adv, y, target)
                x_adv = project(steepest_step(x_adv, grad, self.step_at(t), self.norm))
            return x_adv
        best = _Best(x)
        drop_successes = self.early_stop and self.bn_mode == "eval"
        every = compaction_interval(x)
        for _ in range(self.restarts):
            x_start = self.start(x)  # drawn for the whole batch: the random stream does not depend on who is left
            rows = (~best.success).nonzero().squeeze(1) if drop_successes else torch.arange(len(x), device=x.device)
            if len(rows) == 0:
                break
            x_adv, project = x_start[rows], Projector(x[rows], self.eps, self.norm)
            y_rows, t_rows = y[rows], (target[rows] if target is not None else None)
            for t in range(self.steps):
                grad, logits, losses = self.gradient(model, x_adv, y_rows, t_rows)
                best.update(rows, x_adv, logits, losses, y_rows, t_rows)
                x_adv = project(steepest_step(x_adv, grad, self.step_at(t), self.norm))
                if drop_successes and (t + 1) % every == 0:
                    left = ~best.success[rows]
                    if not left.all():
                        rows, x_adv, y_rows = rows[left], x_adv[left], y_rows[left]
                        t_rows = t_rows[left] if t_rows is not None else None
                        project = Projector(x[rows], self.eps, self.norm)
                        if len(rows) == 0:
                            break
            if len(rows):
                with torch.no_grad():
                    logits, losses = self.objective(model, x_adv, y_rows, t_rows)
                    best.update(rows, x_adv, logits, losses, y_rows, t_rows)
        return best.x

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return random_start(x, self.eps, self.norm) if self.random_start else x

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


register_attack("pgd_margin", PGD, loss="margin", summary="PGD-100 on the margin loss max_{j≠y} z_j − z_y",
                **EVALUATION)
register_attack("pgd200", PGD, steps=200, step_size=0.01,
                summary="200 steps of 0.01 from a random start: the MNIST tables of Boopathy et al.")
register_attack("pgd_l2", PGD, norm="l2", steps=100, summary="L2 PGD-100, α = 2.5ε/steps")
register_attack("pgd_madry", PGD, steps=40, keep_best=False,
                summary="Madry et al.'s PGD-40: α = 2.5ε/steps, random start, last iterate (map stability)")


def compaction_interval(x: torch.Tensor) -> int:
    """Steps between drops of the broken examples. Finding who is left reads a count back from the device: on a
    GPU, where a small model's step is a fraction of a millisecond of queued kernels, waiting for it every step
    would cost more than it saves."""
    return 8 if x.is_cuda else 1


class _Best:
    """Per-example strongest iterate: a successful one beats an unsuccessful one, then higher loss wins."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)

    def update(self, rows, x_adv, logits, losses, y, target):
        """Offer the iterates `x_adv` of the examples `rows` (indices into the batch)."""
        pred = logits.argmax(1)
        success = pred == target if target is not None else pred != y
        had = self.success[rows]
        better = (success & ~had) | ((success == had) & (losses > self.loss[rows]))
        won = rows[better]
        self.x[won] = x_adv.detach()[better]
        self.success[rows] = had | success
        self.loss[won] = losses[better].to(self.loss.dtype)
