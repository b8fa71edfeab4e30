"""MART (Wang et al., ICLR 2020, arXiv:1911.08425, code YisenWang/MART): PGD on cross-entropy for x', then
BCE(p(x'), y) + β·mean[KL(p(x) ‖ p(x'))·(1 − p_y(x))] (robust_train.losses.mart has the math)."""
from __future__ import annotations

from robust_train.attacks import PGD
from robust_train.attacks.base import check_positive
from robust_train.losses.mart import mart_loss
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method


@register_method
class MARTTraining(RobustModule):
    """MART: the boosted CE at x' plus β·KL(p(x) ‖ p(x')) weighted by 1 − p_y(x), x' from PGD-`steps` on CE.

    β = 6 as in the MART paper's CIFAR-10 runs. The inner maximisation is PGD from a uniform random start, last
    iterate, like PGDTraining (the reference starts at x + 0.001·N(0, I); the uniform start is the standard PGD
    one and what the rest of this package trains with). Defaults: Madry et al.'s MNIST PGD, 40 × 0.01.
    """

    def __init__(self, beta: float = 6.0, steps: int = 40, step_size: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.beta = float(check_positive("beta", beta, allow_zero=True))
        self.steps, self.step_size = steps, step_size
        self.training_attack = self.make_training_attack(PGD, steps=steps, step_size=step_size, random_start=True,
                                                         keep_best=False)

    def training_loss(self, x, y, x_adv):
        if x_adv is None or x_adv is x:  # ε = 0 (warm-up): x' = x, the KL term vanishes and only BCE at x is left
            logits = self.model(x)
            return mart_loss(logits, logits, y, self.beta), logits
        logits = self.model(x)  # clean first, then x', as the reference (BatchNorm's running averages see this order)
        logits_adv = self.model(x_adv)
        return mart_loss(logits, logits_adv, y, self.beta), logits_adv
