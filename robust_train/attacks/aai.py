"""AAI, the attack against interpretability of Boopathy et al. (ICML 2020, "Proper Network Interpretability Requires
Robust Training", code `eval.py::aai_topk`): move the input inside the L∞ ε-ball so that the interpretation map
stops pointing where it pointed.

    T_k = top-k cells of flatten(I(x)),  I(x) = CAM_y(x) (true class, feature resolution, unnormalised),
    x'_0 uniform in the ε-ball (or x),  x'_{t+1} = Π_ε,[0,1](x'_t − α·sign ∇ L(x'_t)),
    L(x') = Σ_{p∈T_k} I(x')_p  [+ λ·max(max_{j≠y} z_j(x') − z_y(x'), 0) when keep_label].

Defaults are the authors' evaluation: k = 8, 200 steps of α = 0.01 (MNIST and CIFAR alike), random start, and
only the top-k mass in the loss. The paper's objective also has the hinge that keeps the label (its
"minimize λ max{max_{j≠y} f_j − f_y, 0} − D1"), but the released code builds that term and never uses it; images
whose label changes are instead skipped by the metric (`robust_train.interpret.stability`). `keep_label=True`
adds the hinge with weight `label_weight` (λ; the paper gives no value, 1.0 here by default).

T_k is computed once, at the clean image, and the last iterate is returned (the authors keep no "best" iterate;
there is no single success criterion to pick one by). `map_fn`, a registered map name or a function
`(model, x, classes) -> (N, ...)`, can replace CAM; it goes through `interpret.differentiable_map`, so that maps made
of gradients keep their graph, and is evaluated with gradients enabled even for T_k, for maps that need them.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.attacks.base import Attack, Projector, attack_loss, check_positive, random_start, upcast
from robust_train.attacks.registry import create_attack, register_attack
from robust_train.errors import ConfigError
from robust_train.interpret.registry import MapFn, differentiable_map


def top_cells(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (N, k) of the k largest cells of each map (N, ...)."""
    flat = maps.flatten(1)
    if not 0 < k <= flat.shape[1]:
        raise ConfigError(f"k={k} must be between 1 and the number of map cells ({flat.shape[1]})")
    return flat.topk(k, dim=1).indices


def mass_on(maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Per-image sum (N,) of the map over the given flat cells (N, k); keeps the graph."""
    return maps.flatten(1).gather(1, cells).sum(1)


@register_attack("aai", summary="the attack against interpretability: pushes down the map's top-k cells "
                               "(Boopathy et al.)")
class AAI(Attack):
    """Pushes down the true-class map's mass on its clean top-k cells (see the module docstring for the formula).

    Args:
        k: number of top cells attacked (default 8). steps: iterations (200). step_size: α (0.01).
        random_start: start uniformly in the ε-ball (True, as the authors). keep_label: add the hinge that keeps
            the predicted label (False: the authors' evaluation). label_weight: λ of that hinge (default 1.0 with
            keep_label, and it must stay 0 without). map_fn: a map name (`python -m robust_train maps`) or
            `(model, x, classes) -> maps`; default the true-class CAM.

    Example: ``x_adv = AAI(eps=0.1)(model, x, y)``; then `map_stability(model, x, y, x_adv)`.
    """

    per_example_eps_ok = True  # ε only reaches perturb through elementwise ops (see Attack.per_example_eps)

    def __init__(self, eps: float, *, k: int = 8, steps: int = 200, step_size: float = 0.01,
                 random_start: bool = True, keep_label: bool = False, label_weight: float | None = None,
                 map_fn: str | MapFn = "cam", norm: str = "linf", bn_mode: str = "eval"):
        if norm != "linf":
            raise ConfigError(f"AAI is an L∞ attack (as in Boopathy et al.), got norm={norm!r}")
        super().__init__(eps, norm="linf", bn_mode=bn_mode)
        self.k = int(check_positive("k", k))
        self.steps = int(check_positive("steps", steps))
        self.step_size = float(check_positive("step_size", step_size))
        self.random_start, self.keep_label = random_start, keep_label
        if label_weight is None:
            label_weight = 1.0 if keep_label else 0.0
        elif not keep_label and label_weight != 0:
            raise ConfigError(f"label_weight={label_weight} has no effect without keep_label=True")
        self.label_weight = float(check_positive("label_weight", label_weight, allow_zero=True))
        self.map_name = map_fn if isinstance(map_fn, str) else getattr(map_fn, "__name__", type(map_fn).__name__)
        self.map_fn = differentiable_map(map_fn)
        self.loss = "topk_map_mass" + ("+label_hinge" if self.label_weight > 0 else "")

    def objective(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Per-example loss L(x') that the attack *minimises*."""
        loss = mass_on(upcast(self.map_fn(model, x_adv, y)), cells)  # float32, also under autocast
        if self.label_weight > 0:
            loss = loss + self.label_weight * attack_loss(model(x_adv), y, "margin").clamp_min(0)
        return loss

    def perturb(self, model, x, y, target):
        cells = top_cells(upcast(self.map_fn(model, x, y).detach()), self.k)
        x_adv = random_start(x, self.eps) if self.random_start else x
        project = Projector(x, self.eps)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.objective(model, x_adv, y, cells).sum(), x_adv)
            x_adv = project(x_adv.detach() - self.step_size * grad.sign())
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k, "random_start": self.random_start,
                "keep_label": self.keep_label, "label_weight": self.label_weight,
                "map_fn": self.map_name}


def stability_attack(name: str, eps: float, map_fn: str | MapFn = "cam", k: int = 8, steps: int | None = None):
    """The registered attack `name` for measuring how a map moves (`robust_train.interpret.stability`): AAI attacks
    the very map and top-k cells the measurement looks at; any other attack is taken as registered."""
    options = {"map_fn": map_fn, "k": k} if name == "aai" else {}
    return create_attack(name, eps, steps=steps, **options)

