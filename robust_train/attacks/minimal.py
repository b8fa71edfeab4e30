"""What every minimal-perturbation attack (DeepFool, Carlini–Wagner, FMN) returns: the adversarial images, the size
of each perturbation in the attack's own norm, and whether it changed the decision. Such an attack class also has
`minimal(model, x, y) -> MinimalResult` (the unprojected result) beside `__call__`, which keeps x' in the ε-ball;
`evaluate` recognises minimal attacks by `is_minimal`."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from robust_train.attacks.base import Attack, upcast
from robust_train.modes import model_mode


class MinimalResult(NamedTuple):
    """x_adv in [0, 1]; norms: per-example ‖x_adv − x‖ (L2 or L∞, the attack's norm), measured on the returned x';
    success: the model's prediction on x_adv differs from y (or equals the target, for a targeted attack)."""

    x_adv: torch.Tensor
    norms: torch.Tensor
    success: torch.Tensor


def is_minimal(attack) -> bool:
    return callable(getattr(attack, "minimal", None))


def check_gradients_possible(name: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} needs gradients but inference mode is on: call it outside "
                           "torch.inference_mode() (or run Lightning with Trainer(inference_mode=False))")


class MinimalAttack(Attack):
    """An attack that finds a minimal perturbation (`find`); as an attack of the fixed-ε suite it keeps x' in the
    ε-ball (each subclass's `perturb`), and `minimal` returns what it found, unprojected."""

    def find(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             target: torch.Tensor | None) -> MinimalResult:
        raise NotImplementedError

    def minimal(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> MinimalResult:
        """The unprojected minimal perturbation, with `__call__`'s guarantees (model modes, BatchNorm statistics and
        `.grad` as they were, float32 threat set)."""
        if self.targeted and target is None:
            raise ValueError(f"{self.name} is targeted: pass target= (one class per example)")
        check_gradients_possible(type(self).__name__)
        x = upcast(x.detach())
        with model_mode(model, self.bn_mode, grad=True):
            return self.find(model, x, y, target if self.targeted else None)
