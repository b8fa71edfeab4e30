"""An image's whole ε grid, computed in one batched pass when the image is picked, so that moving the slider on the
page is a lookup: the adversarial images, the class scores of one or two models, and the interpretation maps of a
chosen class at x and at every x' with their Kendall τ.

The L∞ attacks run once on the image repeated over the grid, each row at its own ε (`Attack.per_example_eps`, step
sizes shrink with ε). DeepFool has no ε: it finds one minimal L2 perturbation r, and the grid walks along it,
x'(t) = clip(x + t·r/‖r‖₂) for L2 radii t from 0 to twice ‖r‖₂, so the boundary is crossed half-way along."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from robust_train.attacks import create_attack
from robust_train.attacks.deepfool import deepfool
from robust_train.interpret import interpretation_map
from robust_train.interpret.stability import kendall_tau
from robust_train.modes import model_mode

# What the page offers: key -> (label, norm). "pgd_target" is PGD towards one class the user picks.
PAGE_ATTACKS = {
    "fgsm": ("FGSM", "linf"),
    "pgd": ("PGD", "linf"),
    "pgd_target": ("targeted PGD", "linf"),
    "aai": ("attack against interpretability", "linf"),
    "deepfool": ("DeepFool (minimal L2)", "l2"),
}
MAP_PREFERENCE = ("cam", "grad_cam", "grad_cam_pp", "saliency", "smoothgrad", "integrated_gradients", "attention",
                  "prototype", "prototype_top")


@dataclass(frozen=True)
class AttackChoice:
    name: str
    steps: int = 20
    target: int | None = None  # pgd_target only
    map_name: str = "cam"  # aai only: the map it attacks


@dataclass
class AdversarialGrid:
    eps: torch.Tensor  # (G,) the slider's values, in the attack's norm
    norm: str
    x_adv: torch.Tensor  # (G, C, H, W)
    minimal_norm: float | None = None  # DeepFool's ‖r‖₂ (with overshoot)

    @property
    def delta(self) -> torch.Tensor:
        return self.x_adv - self.x_adv[:1]  # row 0 is ε = 0, the image itself


def supported_maps(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The maps this model can make (CAM needs a GAP head, prototype maps a ProtoPNet, ...), tried on one image."""
    def works(name: str) -> bool:
        try:
            class_map(model, name, x[:1], torch.zeros(1, dtype=torch.long, device=x.device))
        except Exception:  # noqa: BLE001  (every map refuses an unfit model in its own way)
            return False
        return True

    return [name for name in MAP_PREFERENCE if works(name)]


def class_map(model: nn.Module, name: str, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, h, w) detached; per-pixel attributions of colour images are summed over channels in absolute value."""
    with model_mode(model, "eval", grad=True):
        maps = interpretation_map(name, model, x, classes).detach()
    return maps.abs().sum(1) if maps.dim() == 4 else maps


def adversarial_grid(model: nn.Module, x: torch.Tensor, label: int, choice: AttackChoice, eps_max: float,
                     points: int) -> AdversarialGrid:
    """x is one image (1, C, H, W); label the class the attack moves away from (the true one when known)."""
    y = torch.tensor([label], device=x.device)
    if choice.name == "deepfool":
        found = deepfool(model, x, y)
        r = found.x_adv - x
        size = float(r.flatten().norm())
        radii = torch.linspace(0, 2 * size, points, device=x.device)
        steps = r / size if size > 0 else torch.zeros_like(r)
        x_adv = (x + radii.view(-1, 1, 1, 1) * steps).clamp(0, 1)
        return AdversarialGrid(radii.cpu(), "l2", x_adv, size)
    eps = torch.linspace(0, eps_max, points, device=x.device)
    if choice.name == "fgsm":
        attack = create_attack("fgsm", eps_max)
    elif choice.name == "pgd":
        attack = create_attack("pgd", eps_max, steps=choice.steps, restarts=1)
    elif choice.name == "pgd_target":
        attack = create_attack("pgd", eps_max, steps=choice.steps, restarts=1, targeted=True, loss="margin")
    elif choice.name == "aai":
        attack = create_attack("aai", eps_max, steps=choice.steps, map_fn=choice.map_name,
                               step_size=2.5 * eps_max / choice.steps)
    else:
        raise ValueError(f"unknown attack {choice.name!r}: use one of {', '.join(PAGE_ATTACKS)}")
    xs, ys = x.expand(points, -1, -1, -1), y.expand(points)
    target = torch.full_like(ys, choice.target) if choice.name == "pgd_target" else None
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(0)  # the same image and attack always give the same grid
        x_adv = attack.per_example_eps(eps)(model, xs, ys, target)
    return AdversarialGrid(eps.cpu(), "linf", x_adv)


@torch.no_grad()
def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with model_mode(model, "eval"):
        return model(x).float().softmax(1)


def map_grid(model: nn.Module, name: str, x: torch.Tensor, x_adv: torch.Tensor, cls: int) -> dict:
    """The class `cls` map at x (1, h, w) and at every x' (G, h, w), and τ between them (NaN for a flat map)."""
    at_x = class_map(model, name, x, torch.tensor([cls], device=x.device))
    at_adv = class_map(model, name, x_adv, torch.full((len(x_adv),), cls, device=x.device))
    tau = kendall_tau(at_x.expand_as(at_adv), at_adv)
    return {"clean": at_x, "adversarial": at_adv, "tau": tau}


def saliency_difference(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, cls: int) -> torch.Tensor:
    """AdVis.js's saliency difference: saliency(x') − saliency(x) of class `cls`, (G, H, W)."""
    at_x = class_map(model, "saliency", x, torch.tensor([cls], device=x.device))
    at_adv = class_map(model, "saliency", x_adv, torch.full((len(x_adv),), cls, device=x.device))
    return at_adv - at_x
