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
        self.step_shrink = 1.0  # the product of shrink_step's factors, kept in checkpoints
        self.training_attack = self.make_training_attack(FGSM, step_size=self.step_at, random_start=random_start)

    def step_at(self, eps: float) -> float | None:
        """The FGSM step at ε: step_ratio·ε; None (FGSM's default) at ε = 0, where a zero step would be refused
        though no batch is attacked there."""
        return self.step_ratio * eps if eps > 0 else None

    def shrink_step(self, factor: float) -> None:
        """step_ratio ← factor·step_ratio from the next batch on: the OverfitGuard's answer to catastrophic
        overfitting (Wong et al. 2020 avoid it with a smaller step). The cached training attack is rebuilt at its ε,
        since the step is evaluated when an attack is built."""
        self.step_ratio *= factor
        self.step_shrink *= factor
        attack = self.training_attack
        attack.attack = attack.build(attack.attack.eps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["fgsm_step_shrink"] = self.step_shrink

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run keeps its shrunk step, applied to the configured step_ratio (which the user may change).
        super().on_load_checkpoint(checkpoint)
        shrink = float(checkpoint.get("fgsm_step_shrink", 1.0))
        if shrink != self.step_shrink:
            self.shrink_step(shrink / self.step_shrink)
