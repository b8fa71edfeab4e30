"""RAND-FGSM (Tramèr et al., 2018, arXiv:1705.07204): a random sign step of α, then FGSM with ε − α from there."""
from __future__ import annotations

import torch

from robust_train.attacks.base import Attack, input_gradient, project, steepest_step
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError


@register_attack("rand_fgsm", summary="RAND-FGSM: a random sign step of ε/2, then FGSM (Tramèr et al.)")
class RandFGSM(Attack):
    """x̃ = clip(x + α·sign(N(0, I))), x' = Π_ε(x̃ + (ε − α)·sign ∇ℓ(x̃)); α = ε/2 unless given.

    Example: ``x_adv = RandFGSM(eps=0.3, alpha=0.05)(model, x, y)``
    """

    def __init__(self, eps: float, *, alpha: float | None = None, **kwargs):
        super().__init__(eps, **kwargs)
        if self.norm != "linf":
            raise ConfigError("rand_fgsm is an L-inf attack: use norm='linf'")
        self.alpha = self.eps / 2 if alpha is None else float(alpha)
        if not 0 <= self.alpha <= self.eps:
            raise ConfigError(f"rand_fgsm alpha={alpha} must lie in [0, eps={self.eps}]")
        self.step_size = self.eps - self.alpha

    def perturb(self, model, x, y, target):
        x_rand = (x + self.alpha * torch.randn_like(x).sign()).clamp(0.0, 1.0)
        grad, _, _ = input_gradient(model, x_rand, y, self.loss, target)
        return project(steepest_step(x_rand, grad, self.step_size, self.norm), x, self.eps, self.norm)

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha}
