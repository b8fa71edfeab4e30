"""Interpretability-aware robust training, Int (Boopathy et al., ICML 2020, "Proper Network Interpretability
Helps Adversarial Robustness in Classification"): keep the class activation maps of x and of nearby x' alike.

    min_θ  CE(f(x̂), y) + λ·mean D̃(x, x*),   x* = PGD maximising D̃ (Int) or CE(x') + λD̃ (Int-Adv)

x̂ is x for Int and x* for the -Adv variants. D̃ is robust_train.interpret.discrepancy (CAMs of every class,
weighted by the adversarial softmax); the one-class variant keeps the true-class term only. λ = 0.01 is the
authors' value for every data set; the maps are differentiated through in the outer loss (CAM is linear in the
features, so this double use costs one more forward, not a second-order backward).
"""
from __future__ import annotations

import torch.nn.functional as F

from robust_train.attacks.base import check_positive
from robust_train.attacks.pgd_discrepancy import DiscrepancyPGD
from robust_train.interpret.cam import all_class_cams
from robust_train.interpret.discrepancy import discrepancy_from_cams
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method
from robust_train.methods.training_attack import TrainingAttack


@register_method
class IntTraining(RobustModule):
    """Int: inner PGD maximises D̃; outer loss CE at x plus λ·D̃ (set `adv` for CE at x*, i.e. Int-Adv)."""

    adv = False        # cross-entropy at the adversarial point (the -Adv variants)
    one_class = False  # D̃ with the true-class term only (Int-one-class)

    def __init__(self, lam: float = 0.01, steps: int = 40, step_size: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        check_positive("lam", lam, allow_zero=True)  # the inner attack clamps λ to > 0: a negative λ would slip by
        self.lam, self.steps, self.step_size = lam, steps, step_size
        self.training_attack = self.make_inner_attack()

    def make_inner_attack(self) -> TrainingAttack:
        """The inner maximisation, the one piece the Int2 variants replace: here PGD on λD̃ (+ CE at x' for -Adv)."""
        return self.make_training_attack(DiscrepancyPGD, steps=self.steps, step_size=self.step_size,
                                         lam=max(self.lam, 1e-12), at_adv=self.adv, one_class=self.one_class)

    def training_loss(self, x, y, x_adv):
        if self.lam == 0:
            logits = self.model(x_adv if self.adv else x)
            return F.cross_entropy(logits, y), logits
        # One forward per input gives both the CAMs and the logits: no third pass for the cross-entropy.
        cams_clean, logits_clean = all_class_cams(self.model, x)
        cams_adv, logits_adv = all_class_cams(self.model, x_adv)
        logits = logits_adv if self.adv else logits_clean
        d = discrepancy_from_cams(cams_clean, cams_adv, logits_adv, y, self.one_class).mean()
        self.log("train/discrepancy", d.detach())
        return F.cross_entropy(logits, y) + self.lam * d, logits


@register_method
class IntAdvTraining(IntTraining):
    """Int-Adv: inner PGD maximises CE(x') + λD̃, outer CE at x* + λD̃."""

    adv = True


@register_method
class IntOneClassTraining(IntTraining):
    """Int-one-class: D̃ reduced to the true class's map (the paper's ablation; far less robust)."""

    one_class = True
