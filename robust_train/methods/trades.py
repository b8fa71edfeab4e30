"""TRADES (Zhang et al., 2019, arXiv:1901.08573): CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' maximising the KL term."""
from __future__ import annotations

import torch.nn.functional as F

from robust_train.attacks.trades_kl import TRADESKL, kl_to_clean
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method


@register_method
class TRADESTraining(RobustModule):
    """TRADES: CE at x plus β·KL(f(x) ‖ f(x')), x' maximising the KL term.

    β trades clean accuracy for robustness (β = 6 in the paper's CIFAR runs; larger β, more robust).
    """

    def __init__(self, beta: float = 6.0, steps: int = 40, step_size: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.steps, self.step_size = beta, steps, step_size
        self.training_attack = self.make_training_attack(TRADESKL, steps=steps, step_size=step_size)

    def training_loss(self, x, y, x_adv):
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        robust = kl_to_clean(logits_adv, F.softmax(logits, dim=1)).mean()
        return F.cross_entropy(logits, y) + self.beta * robust, logits
