"""PGD adversarial training (Madry et al., 2018, arXiv:1706.06083): min_θ E max_{‖δ‖∞≤ε} CE(f(x+δ), y), the inner
max approximated by PGD from a random start; the model is trained on the last iterate."""
from __future__ import annotations

from robust_train.attacks import PGD
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method


@register_method
class PGDTraining(RobustModule):
    """Cross-entropy on PGD-`steps` examples of step `step_size` (MNIST as published: 40 × 0.01 at ε 0.3)."""

    def __init__(self, steps: int = 40, step_size: float = 0.01, random_start: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.steps, self.step_size, self.random_start = steps, step_size, random_start
        self.training_attack = self.make_training_attack(PGD, steps=steps, step_size=step_size,
                                                         random_start=random_start, keep_best=False)
