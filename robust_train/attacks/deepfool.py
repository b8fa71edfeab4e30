"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016, arXiv:1511.04599): the smallest perturbation that changes the
model's decision, found by stepping onto the nearest linearised decision boundary until the label flips.

At the iterate x_t, with f_k the logits, y the label being moved away from, and, over the candidate classes k ≠ y,
    f'_k = f_k(x_t) − f_y(x_t),   w'_k = ∇f_k(x_t) − ∇f_y(x_t),
the nearest linearised boundary is l = argmin_k |f'_k| / ‖w'_k‖_*, with ‖·‖_* the dual norm of the threat model,
and the step onto it is
    L2:  r_t = (d_l + ν) · w'_l / ‖w'_l‖₂,   d_l = |f'_l| / ‖w'_l‖₂   (so r_t = |f'_l| / ‖w'_l‖₂² · w'_l when ν = 0)
    L∞:  r_t = (d_l + ν) · sign(w'_l),       d_l = |f'_l| / ‖w'_l‖₁,
where ν = NUDGE = 1e-4 is foolbox's small absolute extra length (see NUDGE for why it matters).
Candidates: the `candidates` classes with the highest logits at the original x, y counted first (foolbox's rule:
with y the prediction they are its top `candidates`; 10 by default, i.e. every class on MNIST or CIFAR-10).

Overshoot: the steps add up to r = Σ r_t and the next iterate is x_{t+1} = clip_[0,1](x + (1 + overshoot)·r), the
overshoot applied to the total perturbation as foolbox does. torchattacks instead applies it to every step and clips
after each (x_{t+1} = clip(x_t + (1 + overshoot)·r_t)). Since r_t is computed at the overshot iterate, both move by
(1 + overshoot)·r_t per step where nothing is clipped: they differ only in what the clip to [0, 1] keeps (foolbox's
total remembers the clipped part). Without an overshoot the iterate lands on the boundary and need not cross it.

Norm convention: `norms` is ‖x' − x‖ in the attack's own norm (L2 over all pixels and channels, or L∞), measured on
the returned, clipped x'. Gradients are taken with torch.autograd.grad at the iterate itself (see base), on float32
logits; an example stops as soon as the model misclassifies it, and only the examples still correct stay in the
batch (in eval mode, where one example's forward does not depend on the others).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from robust_train.attacks.base import Norm, _expand, _per_example, project, upcast
from robust_train.attacks.minimal import MinimalAttack, MinimalResult, check_gradients_possible
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError
from robust_train.modes import model_mode

# Guards the division by ‖w'‖ where two classes' gradients coincide; such a class is then never the nearest.
_TINY = 1e-12
# Added to every step's length, as foolbox does. Where the iterate is clipped to [0, 1] (the background of MNIST sits
# on 0) part of each step is lost, so the gap to the boundary only shrinks by a constant factor per step and an
# overshoot relative to the step, which shrinks with it, never makes it cross: without this term many MNIST digits
# creep up to the boundary for all 50 steps and stay correct (torchattacks, which has no such term, fails on them).
NUDGE = 1e-4


def check_deepfool_options(norm: str, overshoot: float, steps: int, candidates: int) -> None:
    if norm not in ("l2", "linf"):
        raise ConfigError(f"unknown norm {norm!r} for DeepFool: use 'l2' or 'linf'")
    if isinstance(overshoot, bool) or not isinstance(overshoot, numbers.Real) or not math.isfinite(overshoot) \
            or overshoot < 0:
        raise ConfigError(f"overshoot={overshoot!r} is out of range: use a finite number >= 0 (the paper uses 0.02)")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"steps={steps!r} is not a whole number of steps >= 1: use e.g. steps=50")
    if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 2:
        raise ConfigError(f"candidates={candidates!r} must be a whole number >= 2 (the label and at least one other "
                          "class): use e.g. candidates=10")



def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Norm = "l2", overshoot: float = 0.02,
             steps: int = 50, candidates: int = 10) -> MinimalResult:
    """DeepFool on a batch, usable without Lightning: the minimal perturbation (no ε bound) that makes the model's
    prediction differ from y.

    y is the label the attack moves away from: the true labels (an example the model already gets wrong comes back
    unchanged, with norm 0 and success True) or the model's own predictions (every example is attacked). The model
    runs in eval mode with gradients on and comes back in its own modes, parameters' `.grad` untouched. Examples not
    fooled within `steps` come back at their last iterate with success False. Overshoot is applied to the total
    perturbation (foolbox), not per step (torchattacks); see the module docstring.

    Example: ``x_adv, norms, success = deepfool(model, x, y)``
    """
    check_deepfool_options(norm, overshoot, steps, candidates)
    check_gradients_possible("DeepFool")
    x = upcast(x.detach())
    with model_mode(model, "eval", grad=True):
        return _deepfool(model, x, y, norm, overshoot, steps, candidates, compact=True)


def _deepfool(model, x, y, norm, overshoot, steps, candidates, compact: bool) -> MinimalResult:
    """The loop, with the model already in the mode it should run in. compact: drop fooled examples from the batch
    (only sound when an example's forward does not depend on the batch: eval-mode BatchNorm)."""
    n = x.shape[0]
    y = y.to(x.device, torch.long)
    x_adv = x.clone()
    r_total = torch.zeros_like(x)
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    others = None  # (n, candidates − 1) candidate classes, fixed from the logits at the original x
    everyone = torch.arange(n, device=x.device)
    unseen = True  # x_adv moved since the model last looked at it
    for _ in range(steps):
        if done.all():
            break
        rows = (~done).nonzero().squeeze(1) if compact else everyone
        xa = x_adv[rows].detach().requires_grad_(True)
        logits = upcast(model(xa))
        unseen = False
        y_rows = y[rows]
        if others is None:  # the first iterate is x itself, for every example
            if logits.shape[1] < 2:
                raise ValueError(f"DeepFool needs a classifier with at least 2 classes, got {logits.shape[1]}")
            ranked = logits.detach().scatter(1, y[:, None], float("inf")).argsort(1, descending=True)
            others = ranked[:, 1:min(candidates, logits.shape[1])]
        fooled = logits.detach().argmax(1) != y_rows
        done[rows[fooled]] = True
        going = ~done[rows]
        if not going.any():
            break
        own = logits.gather(1, y_rows[:, None])
        diffs = logits.gather(1, others[rows]) - own  # f'_k, (rows, candidates − 1)
        # One backward per candidate over the whole batch (each example's logits depend only on its own input in
        # eval mode, so the summed gradient is the per-example one), keeping only the nearest boundary's so far:
        # memory stays one gradient per example however many candidates.
        best_dist = best_w = best_dual = None
        for j in range(diffs.shape[1]):
            (w,) = torch.autograd.grad(diffs[:, j].sum(), xa, retain_graph=j + 1 < diffs.shape[1])
            flat = _per_example(w)
            dual = (flat.norm(dim=1) if norm == "l2" else flat.abs().sum(1)).clamp_min(_TINY)
            dist = diffs[:, j].detach().abs() / dual
            if best_dist is None:
                best_dist, best_w, best_dual = dist, w, dual
            else:
                nearer = dist < best_dist  # ties keep the earlier (higher-logit) class, as argmin would
                best_dist = torch.where(nearer, dist, best_dist)
                best_dual = torch.where(nearer, dual, best_dual)
                best_w = torch.where(_expand(nearer, w), w, best_w)
        length = best_dist + NUDGE  # the step's norm
        if norm == "l2":
            step = best_w * _expand(length / best_dual, best_w)
        else:
            step = best_w.sign() * _expand(length, best_w)
        moving = rows[going]
        r_total[moving] += step[going].to(r_total.dtype)
        x_adv[moving] = (x[moving] + (1 + overshoot) * r_total[moving]).clamp(0.0, 1.0)
        unseen = True
    # The last step ran out of steps before being looked at. Without compaction the whole returned batch is looked
    # at, since with batch statistics that batch is what decides each example's prediction.
    rows = (~done).nonzero().squeeze(1) if compact else everyone
    if unseen and len(rows):
        with torch.no_grad():
            fooled = upcast(model(x_adv[rows])).argmax(1) != y[rows]
        done[rows] = fooled
    delta = _per_example(x_adv - x)
    norms = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
    return MinimalResult(x_adv.detach(), norms.detach(), done)


@register_attack("deepfool", summary="DeepFool: minimal L2 perturbation (Moosavi-Dezfooli et al.), then kept "
                                     "inside the ε-ball")
class DeepFool(MinimalAttack):
    """DeepFool's minimal perturbation, projected onto the ε-ball so that it fits the fixed-ε suite: an example
    DeepFool breaks within ε stays broken, one it needs more than ε for comes back on the sphere (usually correct).
    `minimal` returns the unprojected result (norms and success), e.g. for a robustness curve.

    Args:
        norm: "l2" (default) or "linf", the norm of both the step and the ε-ball.
        overshoot: the total perturbation is scaled by 1 + overshoot (foolbox's convention).
        steps: at most this many linearisations per example. candidates: classes considered, the label included.

    Example: ``x_adv = DeepFool(eps=1.5)(model, x, y)``; ``x_adv, norms, success = DeepFool(1.5).minimal(model, x, y)``
    """

    def __init__(self, eps: float, *, norm: Norm = "l2", overshoot: float = 0.02, steps: int = 50,
                 candidates: int = 10, **kw):
        if kw.get("targeted"):
            raise ConfigError("DeepFool is untargeted: leave targeted unset (use a targeted PGD for a target class)")
        if "loss" in kw:
            raise ConfigError(f"loss={kw['loss']!r}: DeepFool follows logit differences and takes no loss; "
                              "leave it unset")
        check_deepfool_options(norm, overshoot, steps, candidates)
        super().__init__(eps, norm=norm, **kw)
        self.overshoot, self.steps, self.candidates = float(overshoot), int(steps), int(candidates)
        self.step_size = None  # each step's length comes from the linearisation

    def perturb(self, model, x, y, target):
        result = self.find(model, x, y)
        return project(result.x_adv, x, self.eps, self.norm)

    def find(self, model, x, y, target=None) -> MinimalResult:
        # With batch statistics an example's forward depends on the batch: keep everyone in it, as PGD does.
        return _deepfool(model, x, y, self.norm, self.overshoot, self.steps, self.candidates,
                         compact=self.bn_mode == "eval")

    def describe(self) -> dict:
        return {**super().describe(), "loss": None, "overshoot": self.overshoot, "candidates": self.candidates}


register_attack("deepfool_linf", DeepFool, norm="linf",
                summary="DeepFool in L∞ (steps along sign(w)); minimal L∞ perturbation, then kept inside the ε-ball")
