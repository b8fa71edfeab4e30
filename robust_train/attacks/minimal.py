"""What every minimal-perturbation attack (DeepFool, Carlini–Wagner, FMN) returns: the adversarial images, the size
of each perturbation in the attack's own norm, and whether it changed the decision. Such an attack class also has
`minimal(model, x, y) -> MinimalResult` (the unprojected result) beside `__call__`, which keeps x' in the ε-ball;
`evaluate` recognises minimal attacks by `is_minimal`."""
from __future__ import annotations

from typing import NamedTuple

import torch


class MinimalResult(NamedTuple):
    """x_adv in [0, 1]; norms: per-example ‖x_adv − x‖ (L2 or L∞, the attack's norm), measured on the returned x';
    success: the model's prediction on x_adv differs from y (or equals the target, for a targeted attack)."""

    x_adv: torch.Tensor
    norms: torch.Tensor
    success: torch.Tensor


def is_minimal(attack) -> bool:
    return callable(getattr(attack, "minimal", None))
