"""FGSM adversarial training (Goodfellow et al., 2015): train on one-step adversarial examples."""
from __future__ import annotations

from robust_train.attacks import FGSM
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method


@register_method
class FGSMTraining(RobustModule):
    """Cross-entropy on x' = FGSM(x), with step `step_ratio`·ε from x (or from a random start)."""

    def __init__(self, step_ratio: float = 1.0, random_start: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.step_ratio, self.random_start = step_ratio, random_start

    def adversarial_batch(self, x, y, eps):
        if eps == 0:
            return x
        attack = FGSM(eps, step_size=self.step_ratio * eps, random_start=self.random_start,
                      bn_mode=self.hparams.attack_bn_mode)
        return attack(self.model, x, y)
