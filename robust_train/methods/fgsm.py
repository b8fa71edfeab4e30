"""FGSM adversarial training (Goodfellow et al., 2015): train on one-step adversarial examples."""
from __future__ import annotations

from robust_train.attacks import FGSM
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method
from robust_train.methods.step_shrink import ShrinkableStep


@register_method
class FGSMTraining(ShrinkableStep, RobustModule):
    """Cross-entropy on x' = FGSM(x), with step `step_ratio`·ε from x (or from a random start)."""

    def __init__(self, step_ratio: float = 1.0, random_start: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.step_ratio, self.random_start = step_ratio, random_start
        self.training_attack = self.make_training_attack(FGSM, step_size=self.step_at, random_start=random_start)

    def step_at(self, eps: float) -> float | None:
        """The FGSM step at ε: step_ratio·ε; None (FGSM's default) at ε = 0, where a zero step would be refused
        though no batch is attacked there."""
        return self.step_ratio * eps if eps > 0 else None

    def rebuild_training_attack(self) -> None:
        attack = self.training_attack
        attack.attack = attack.build(attack.attack.eps)  # the step is evaluated when an attack is built
