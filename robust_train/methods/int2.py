"""Int2 (Boopathy et al., ICML 2020): the inner maximisation is plain PGD on cross-entropy, cheaper and in the
paper more robust than Int's, and the outer loss keeps the interpretation discrepancy:

    min_θ  CE(f(x̂), y) + λ·mean D̃(x, x*),   x* = PGD maximising CE(f(x'), y)

x̂ is x for Int2 and x* for Int2-Adv, the headline recipe (`fit --recipe int2_adv`).
"""
from __future__ import annotations

from robust_train.attacks import PGD
from robust_train.methods.int import IntTraining
from robust_train.methods.registry import register_method
from robust_train.methods.training_attack import TrainingAttack


@register_method
class Int2Training(IntTraining):
    """Int2: CE-PGD examples, outer CE at x plus λ·D̃(x, x*)."""

    def make_inner_attack(self) -> TrainingAttack:
        """PGD on cross-entropy from a random start, last iterate."""
        return self.make_training_attack(PGD, steps=self.steps, step_size=self.step_size, keep_best=False)


@register_method
class Int2AdvTraining(Int2Training):
    """Int2-Adv: CE-PGD examples, outer CE at x* plus λ·D̃(x, x*)."""

    adv = True
