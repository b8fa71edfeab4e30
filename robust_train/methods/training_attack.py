"""The attack a training method crafts its batches with, built once rather than once per batch.

A method's ε is constant after the warm-up, so the attack object for it is built at construction (which is also
where bad options surface, as a ConfigError, before any training) and reused; during the warm-up ε changes every
step and the attack is rebuilt for each new ε. At ε = 0 no attack runs: the batch comes back as it is.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robust_train.attacks.base import Attack


class TrainingAttack:
    """`attack_cls(eps, **options)` at the ε of each batch. An option given as a callable is a function of ε,
    evaluated for each new ε (e.g. a step size proportional to ε); attack options that are themselves functions
    cannot be passed this way.

    Build it through `RobustModule.make_training_attack`, which fills in the module's BatchNorm mode.
    """

    def __init__(self, attack_cls: type[Attack], eps: float, **options: Any):
        self.attack_cls, self.options = attack_cls, options
        self.attack = self.build(eps)  # the module's full ε: checks the options now, not at the first batch

    def build(self, eps: float) -> Attack:
        """A new attack at ε, the callable options evaluated there."""
        options = {k: v(eps) if callable(v) else v for k, v in self.options.items()}
        return self.attack_cls(eps, **options)

    def at(self, eps: float) -> Attack:
        """The attack at ε: the one already built when ε is its ε, else a new one (kept for the next batches)."""
        if float(eps) != self.attack.eps:
            self.attack = self.build(eps)
        return self.attack

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """x' at budget ε; x itself (not a copy) at ε = 0, as the warm-up's first epochs train on clean images."""
        if eps == 0:
            return x
        return self.at(eps)(model, x, y)

