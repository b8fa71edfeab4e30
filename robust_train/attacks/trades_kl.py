"""The inner maximisation of TRADES (Zhang et al., 2019, arXiv:1901.08573): move x' to maximise
KL(f(x) ‖ f(x')) inside the ε-ball. It needs no label, so it also measures how far predictions can be pushed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robust_train.attacks.base import Attack, Projector, check_positive, steepest_step, upcast
from robust_train.attacks.registry import register_attack


def kl_to_clean(logits_adv: torch.Tensor, probs_clean: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean ‖ p_adv), the TRADES robustness term, in float32 (also under bf16 autocast)."""
    return F.kl_div(F.log_softmax(upcast(logits_adv), dim=1), upcast(probs_clean), reduction="none").sum(1)


@register_attack("trades_kl", summary="TRADES' inner maximisation of KL(f(x) ‖ f(x'))")
class TRADESKL(Attack):
    """x₀ = x + 0.001·N(0, I) (TRADES' start), then `steps` projected signed steps of α on the KL term.

    Example: ``x_adv = TRADESKL(eps=0.3, steps=40, step_size=0.01)(model, x, y)``
    """

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, **kwargs):
        super().__init__(eps, **kwargs)
        self.steps = int(check_positive("steps", steps))
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else check_positive("step_size", step_size)

    def perturb(self, model, x, y, target):
        with torch.no_grad():
            probs_clean = F.softmax(upcast(model(x)), dim=1)
        project = Projector(x, self.eps, self.norm)
        x_adv = project(x + 0.001 * torch.randn_like(x))
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(kl_to_clean(model(x_adv), probs_clean).sum(), x_adv)
            x_adv = project(steepest_step(x_adv.detach(), grad, self.step_size, self.norm))
        return x_adv
