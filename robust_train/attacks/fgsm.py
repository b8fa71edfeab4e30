"""FGSM (Goodfellow et al., 2015, arXiv:1412.6572) and its random-start form used by "fast" adversarial training
(Wong et al., 2020, arXiv:2001.03994): one signed-gradient step, optionally from a uniform point of the ε-ball."""
from __future__ import annotations

from robust_train.attacks.base import Attack, check_positive, input_gradient, project, random_start, steepest_step
from robust_train.attacks.registry import register_attack


@register_attack("fgsm", summary="FGSM: one signed-gradient step of ε (Goodfellow et al.)")
class FGSM(Attack):
    """x' = Π_ε(x₀ + α·sign ∇ℓ(x₀)), x₀ = x (or uniform in the ε-ball), α = ε unless given.

    Example: ``x_adv = FGSM(eps=0.3)(model, x, y)``
    """

    per_example_eps_ok = True  # ε only reaches perturb through elementwise ops (see Attack.per_example_eps)

    def __init__(self, eps: float, *, step_size: float | None = None, random_start: bool = False, **kwargs):
        super().__init__(eps, **kwargs)
        self.step_size = self.eps if step_size is None else check_positive("step_size", step_size)
        self.random_start = random_start

    def perturb(self, model, x, y, target):
        x0 = random_start(x, self.eps, self.norm) if self.random_start else x
        grad, _, _ = input_gradient(model, x0, y, self.loss, target)
        return project(steepest_step(x0, grad, self.step_size, self.norm), x, self.eps, self.norm)

    def describe(self) -> dict:
        return {**super().describe(), "random_start": self.random_start}
