"""BIM / I-FGSM (Kurakin et al., 2017, arXiv:1607.02533): PGD without the random start."""
from __future__ import annotations

from robust_train.attacks.pgd import PGD
from robust_train.attacks.registry import register_attack


@register_attack("bim", summary="BIM / I-FGSM: 10 signed steps of ε/10 from x")
class BIM(PGD):
    """x₀ = x, then `steps` projected signed steps of α (default ε/steps, so the last step can reach the border).

    Example: ``x_adv = BIM(eps=0.3, steps=10)(model, x, y)``
    """

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, **kwargs):
        kwargs.setdefault("keep_best", False)
        # PGD validates eps and steps first; the default α = ε/steps is set after (ε = 0 is allowed, steps = 0 is not).
        super().__init__(eps, steps=steps, step_size=step_size, random_start=False, **kwargs)
        if step_size is None:
            self.step_size = self.eps / self.steps
