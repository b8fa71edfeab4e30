"""MIM / MI-FGSM (Dong et al., 2018, arXiv:1710.06081): BIM with momentum on the per-image L1-normalised gradient."""
from __future__ import annotations

import torch

from robust_train.attacks.base import Attack, Projector, check_positive, input_gradient, steepest_step
from robust_train.attacks.registry import register_attack


@register_attack("mim", summary="MIM / MI-FGSM: BIM with momentum (Dong et al.)")
class MIM(Attack):
    """g_{t+1} = μ·g_t + ∇ℓ(x_t)/mean|∇ℓ(x_t)| (mean over each image), x_{t+1} = Π_ε(x_t + α·sign g_{t+1}).

    Defaults follow the official code: μ = 1, α = ε/steps. With μ = 0 this is exactly BIM.

    Example: ``x_adv = MIM(eps=0.3, steps=10)(model, x, y)``
    """

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, decay: float = 1.0,
                 **kwargs):
        super().__init__(eps, **kwargs)
        self.steps = int(check_positive("steps", steps))
        self.step_size = self.eps / self.steps if step_size is None else check_positive("step_size", step_size)
        self.decay = float(decay)

    def perturb(self, model, x, y, target):
        x_adv, momentum = x, torch.zeros_like(x)
        project = Projector(x, self.eps, self.norm)
        for _ in range(self.steps):
            grad, _, _ = input_gradient(model, x_adv, y, self.loss, target)
            l1 = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)
            momentum = self.decay * momentum + grad / l1
            x_adv = project(steepest_step(x_adv, momentum, self.step_size, self.norm))
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "decay": self.decay}
