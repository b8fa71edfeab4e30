"""The inner maximisation of IG-Norm / IG-Norm-Sum (Chen et al. 2019, as trained by Boopathy et al., ICML 2020):
L∞ PGD from a uniform random start in the ε-ball that ascends

    CE(x', y)·[at_adv] + λ·‖IG(x, x')‖₁

(robust_train.losses.ig_norm), i.e. the same total loss the outer step minimises, as in the authors' code: for
IG-Norm its CE(x) term is a constant in x' and the sign step makes λ irrelevant, so the attack is worst-case
‖IG‖₁ alone; for IG-Norm-Sum (at_adv) it is CE(x') + λ‖IG‖₁. The gradient of ‖IG‖₁ with respect to x' goes
through the factor x' − x and through the path points (second order, create_graph): each step costs about one
m-point double backprop. With λ = 0 and at_adv the IG is skipped: the attack is CE-PGD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robust_train.attacks.base import Attack, Projector, check_positive, random_start, steepest_step, upcast
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError
from robust_train.losses.ig_norm import ig_norm_penalty


@register_attack("pgd_ig_norm", summary="IG-Norm's inner maximisation: PGD on ‖IG(x, x')‖₁ (+ CE at x')")
class IGNormPGD(Attack):
    """Args: steps, step_size (α, default 2.5ε/steps), lam (λ), points (Riemann points of the IG), at_adv (add CE
    at x'), random_start. Untargeted L∞ only."""

    def __init__(self, eps: float, *, steps: int = 40, step_size: float | None = None, lam: float = 0.02,
                 points: int = 5, at_adv: bool = False, random_start: bool = True, **kwargs):
        super().__init__(eps, **kwargs)
        if self.norm != "linf" or self.targeted:
            raise ConfigError("pgd_ig_norm is untargeted L-inf only: drop norm/targeted")
        self.steps = int(check_positive("steps", steps))
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else check_positive("step_size", step_size)
        self.lam = float(check_positive("lam", lam, allow_zero=at_adv))
        self.points = int(check_positive("points", points))
        if not random_start and not at_adv:
            raise ConfigError("pgd_ig_norm without at_adv needs random_start: IG(x, x) = 0 and so is its gradient, "
                              "so the attack would return x unchanged")
        self.at_adv, self.random_start = at_adv, random_start

    def perturb(self, model, x, y, target):
        x_adv = random_start(x, self.eps) if self.random_start else x
        project = Projector(x, self.eps)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            objective = x_adv.new_zeros(len(x))
            if self.lam > 0:
                objective = self.lam * ig_norm_penalty(model, x, x_adv, y, self.points, create_graph=True)
            if self.at_adv:
                objective = objective + F.cross_entropy(upcast(model(x_adv)), y, reduction="none")
            (grad,) = torch.autograd.grad(objective.sum(), x_adv)
            x_adv = project(steepest_step(x_adv.detach(), grad, self.step_size))
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "loss": "ce_at_adv+lam*ig_l1" if self.at_adv else "ig_l1", "lam": self.lam,
                "points": self.points, "random_start": self.random_start}
