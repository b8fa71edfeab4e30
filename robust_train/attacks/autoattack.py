"""AutoAttack (Croce & Hein, ICML 2020) through its own package (`pip install 'robust-train[autoattack]'`), so that an
evaluation's worst case can be checked against the field's reference: `autoattack` runs APGD-CE and APGD-T (9
target classes) as standard AutoAttack does, without FAB-T and Square; `autoattack_standard` runs all four.

The package attacks each example until it falls and returns, per example, the adversarial image it found (the clean
image where it found none), so the accuracy on what it returns is AutoAttack's robust accuracy.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch

from robust_train.attacks.base import Attack
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError


@register_attack("autoattack", summary="AutoAttack's APGD-CE + APGD-T, through the pyautoattack package")
class AutoAttack(Attack):
    """L∞ AutoAttack at ε. version "custom" (APGD-CE + APGD-T, one restart each) or "standard" (the full suite);
    seed: AutoAttack's own seed (None: drawn from torch's generator, so a seeded evaluation batch is reproducible).

    Example: ``x_adv = AutoAttack(eps=0.3)(model, x, y)``
    """

    steps = 100

    def __init__(self, eps: float, *, version: Literal["custom", "standard"] = "custom", seed: int | None = None,
                 bn_mode: str = "eval"):
        if version not in ("custom", "standard"):
            raise ConfigError(f"AutoAttack version={version!r}: use 'custom' (APGD-CE + APGD-T) or 'standard'")
        super().__init__(eps, bn_mode=bn_mode)
        self.version, self.seed = version, seed
        self.loss, self.step_size = "ce+dlr", None

    def perturb(self, model, x, y, target):
        try:
            from pyautoattack import AutoAttack as Reference
        except ImportError:
            raise ConfigError("the autoattack attacks need the AutoAttack package: "
                              "pip install 'robust-train[autoattack]'") from None
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        seed = self.seed if self.seed is not None else int(torch.randint(2**31 - 1, ()))
        if self.version == "standard":
            reference = Reference(model, eps=self.eps, norm="Linf", device=x.device, seed=seed, version="standard")
        else:
            reference = Reference(model, eps=self.eps, norm="Linf", device=x.device, seed=seed, version="custom",
                                  attacks=["apgd-ce", "apgd-t"])
            reference.apgd.n_restarts = 1
        x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "version": self.version}


register_attack("autoattack_standard", AutoAttack, version="standard",
                summary="standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), through the pyautoattack package")
