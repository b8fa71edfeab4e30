"""N-FGSM's training perturbation (de Jorge et al., NeurIPS 2022, "Make some noise", arXiv:2202.01181, code
pdejorge/N-FGSM): strong uniform noise, then one signed-gradient step from the noisy point, and no projection
back to the ε-ball.

Not in the attack registry on purpose: x' leaves the ε-ball (its L∞ radius is (noise_ratio + step_ratio)·ε, 3ε at
the defaults), so it is no evaluation attack at ε; it exists to craft N-FGSM's training batches.
"""
from __future__ import annotations

import torch

from robust_train.attacks.base import Attack, check_positive, input_gradient, steepest_step
from robust_train.errors import ConfigError


class NoisyFGSM(Attack):
    """x' = clip_[0,1](x̃ + α·sign ∇ℓ(x̃)), x̃ = clip_[0,1](x + η), η ~ U(−kε, kε), k = `noise_ratio`,
    α = `step_ratio`·ε.

    ‖x' − x‖∞ ≤ (noise_ratio + step_ratio)·ε: the perturbation leaves the ε-ball by design (the paper's point:
    noise larger than ε, without the clipping to the ε-ball that FGSM-RS does, avoids catastrophic overfitting at
    the cost of one gradient). As in the reference code, x + η is clipped to [0, 1] before the gradient, and x'
    only to [0, 1]. noise_ratio = 0 is FGSM from x with step α and no projection to the ε-ball.

    Example: ``x_train = NoisyFGSM(eps=8/255)(model, x, y)`` (noise 2ε, step ε: the paper's CIFAR-10 setting)
    """

    def __init__(self, eps: float, *, noise_ratio: float = 2.0, step_ratio: float = 1.0, **kwargs):
        super().__init__(eps, **kwargs)
        if self.norm != "linf":
            raise ConfigError("N-FGSM is an L-inf perturbation: use norm='linf'")
        self.noise_ratio = float(check_positive("noise_ratio", noise_ratio, allow_zero=True))
        self.step_ratio = float(check_positive("step_ratio", step_ratio, allow_zero=True))
        self.step_size = self.step_ratio * self.eps

    @property
    def radius(self) -> float:
        """The L∞ bound of x' − x: (noise_ratio + step_ratio)·ε."""
        return (self.noise_ratio + self.step_ratio) * self.eps

    def perturb(self, model, x, y, target):
        x_noisy = x
        if self.noise_ratio > 0:
            x_noisy = (x + (torch.rand_like(x) * 2 - 1) * (self.noise_ratio * self.eps)).clamp(0.0, 1.0)
        grad, _, _ = input_gradient(model, x_noisy, y, self.loss, target)
        return steepest_step(x_noisy, grad, self.step_size, self.norm).clamp(0.0, 1.0)

    def describe(self) -> dict:
        return {**super().describe(), "noise_ratio": self.noise_ratio, "step_ratio": self.step_ratio,
                "radius": self.radius}
