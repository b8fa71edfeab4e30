"""The inner maximisation of Int / Int-Adv (Boopathy et al., ICML 2020): L∞ PGD from a random start that ascends

    CE(x', y)·[at_adv] + λ·D̃(x, x')

i.e. it looks for the x' whose class activation maps differ most from x's (Int), or that is misclassified and
changes the maps at once (Int-Adv). With at_adv off the CE term is CE(x, y), a constant in x', and the sign step
makes λ irrelevant: the attack is then worst-case D̃, exactly as the authors' code. Clean CAMs are computed once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robust_train.attacks.base import Attack, Projector, check_positive, random_start, steepest_step, upcast
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError
from robust_train.interpret.cam import all_class_cams
from robust_train.interpret.discrepancy import discrepancy_from_cams


@register_attack("pgd_discrepancy", summary="Int's inner maximisation: PGD on the CAM discrepancy D̃ (+ CE)")
class DiscrepancyPGD(Attack):
    """Args: steps, step_size (α, default 2.5ε/steps), lam (λ), at_adv (add CE at x'), one_class (true-class
    term only), random_start. Needs a Classifier (`features`, `head`)."""

    def __init__(self, eps: float, *, steps: int = 40, step_size: float | None = None, lam: float = 0.01,
                 at_adv: bool = False, one_class: bool = False, random_start: bool = True, **kwargs):
        super().__init__(eps, **kwargs)
        if self.norm != "linf" or self.targeted:
            raise ConfigError("pgd_discrepancy is untargeted L-inf only: drop norm/targeted")
        self.steps = int(check_positive("steps", steps))
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else check_positive("step_size", step_size)
        self.lam = float(check_positive("lam", lam, allow_zero=at_adv))
        if not random_start and not at_adv:
            raise ConfigError("pgd_discrepancy without at_adv needs random_start: D̃ is flat at x' = x (|0| has a "
                              "zero gradient), so the attack would return x unchanged")
        self.at_adv, self.one_class, self.random_start = at_adv, one_class, random_start

    def perturb(self, model, x, y, target):
        with torch.no_grad():
            cams_clean = upcast(all_class_cams(model, x)[0])  # the objective in float32, also under autocast
        x_adv = random_start(x, self.eps) if self.random_start else x
        project = Projector(x, self.eps)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            cams_adv, logits_adv = map(upcast, all_class_cams(model, x_adv))
            objective = self.lam * discrepancy_from_cams(cams_clean, cams_adv, logits_adv, y, self.one_class)
            if self.at_adv:
                objective = objective + F.cross_entropy(logits_adv, y, reduction="none")
            (grad,) = torch.autograd.grad(objective.sum(), x_adv)
            x_adv = project(steepest_step(x_adv.detach(), grad, self.step_size))
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "loss": "ce_at_adv+lam*D" if self.at_adv else "D", "lam": self.lam,
                "one_class": self.one_class}
