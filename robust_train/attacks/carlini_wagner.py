"""Carlini–Wagner L2 (Carlini & Wagner, S&P 2017, arXiv:1608.04644; reference code carlini/nn_robust_attacks
`l2_attack.py`): the smallest L2 perturbation found by minimising, over w, with x' = ½(tanh(w) + 1) ∈ [0, 1],

    ‖x' − x‖₂² + c · f(x'),
    untargeted: f(x') = max(Z_y(x') − max_{j≠y} Z_j(x'), −κ),   targeted: f(x') = max(max_{j≠t} Z_j(x') − Z_t(x'), −κ),

Z the float32 logits. The tanh box keeps every iterate in [0, 1] without clipping; w starts at
atanh((2x − 1)·(1 − 1e-3)) (x scaled just inside the open interval, where atanh is finite) and is optimised by Adam
(lr 0.01, betas 0.9/0.999, eps 1e-8, its state reset at every search step as in the reference). c is searched per
example: from `initial_const`; when the search step found an adversarial iterate, upper = min(upper, c) and
c = (lower + upper)/2; otherwise lower = max(lower, c) and c = (lower + upper)/2 once an upper bound is known, else
c·10. Every iterate of every search step is a candidate: per example the smallest-L2 one that is adversarial on the
logits of that very forward (argmax ≠ y and max_{j≠y} Z_j − Z_y ≥ κ; targeted: argmax = t and Z_t − max_{j≠t} Z_j ≥ κ)
is returned. Abort early: every max(steps // 10, 1) iterations, an example whose loss is above 0.9999 times its loss
at the previous check stops for the rest of that search step.

Defaults, and where they differ from the reference:
  * steps=500 Adam steps per search step (reference: up to 10,000) and binary_search_steps=9 as in the reference,
    so at most 4,500 forward/backward passes per example, fewer with abort early; initial_const 1e-3, lr 0.01 and
    κ 0 as in the reference. The length of a search step matters more than its count on a standard model: the hinge
    penalty is exact once c passes a threshold, so a c that is too large costs little, while pixels need hundreds of
    steps to leave the box's border (next point). The count matters on an adversarially trained one: c grows tenfold
    per search step until a first success, and such models need c of 10^3 and more (their margins are flat near x).
    With 5 search steps (c at most 10) CW broke 1 of 50 digits of the pgd_awp recipe's model; with 9, 19 of 20
    (bench/RESULTS.md, "minimal_norm").
  * w starts at atanh of (2x − 1)·(1 − 1e-3), the reference's factor is 1 − 1e-6. Most MNIST pixels sit on 0 or 1,
    where tanh is flat; Adam moves w by about lr per step, so such a pixel starts at |w| = 7.25 with the reference's
    factor and needs some 580 steps to reach |w| = 1.5 (x' = 0.05), against 230 from |w| = 3.8. With 200-step
    search steps the reference's start leaves the digit's pixels frozen: median 1.39 on the MLP (9 × 200), 2.2 times
    0.630, with two digits not broken. The start is at most 5e-4 from x per pixel, and the distance term pulls
    the pixels that need not move back towards x.
  * Abort early is per example (the reference's default batch of one checks one example's loss). An example
    already adversarial at x (with margin κ) is not attacked: it comes back as x, norm 0, success True.
  * The distance is measured to x itself, not to the tanh image of the scaled x.
  * The reference's untargeted success test adds κ on the wrong side (it lowers Z_y by κ); here an untargeted
    example counts as adversarial only when another class beats y by at least κ.
  * Examples never made adversarial come back unchanged (the reference returns zeros): x' = x, norm 0 and success
    False, so a caller must read `success`, not the norm, to tell "needs no perturbation" from "none found".

The returned x' is verified by one forward of the whole returned batch in the attack's mode: an iterate that was
adversarial within the search but is not on that forward (a point within float rounding of the boundary, or batch
statistics in bn_mode="train") keeps its x' and gets success False. The model's parameters never receive a `.grad`
(gradients are taken with torch.autograd.grad with respect to w only).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from robust_train.attacks.base import _expand, _per_example, attack_loss, project, upcast
from robust_train.attacks.minimal import MinimalAttack, MinimalResult, check_gradients_possible
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError
from robust_train.modes import model_mode

STEPS = 500
BINARY_SEARCH_STEPS = 9  # the reference's: robust models need the large c that only the later search steps reach
# atanh(±1) is infinite and tanh is flat there: a pixel on 0 or 1 started at atanh(∓1) could never move (torchattacks
# does this). The reference's 1 − 1e-6 starts it so deep in the flat part that it takes ~580 Adam steps to get out;
# 1 − 1e-3 takes ~230 (see the module docstring).
_INSIDE = 1.0 - 1e-3
_NO_UPPER = 1e10  # the reference's "no upper bound on c yet"
_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_cw_options(kappa: float, steps: int, lr: float, binary_search_steps: int, initial_const: float) -> None:
    if not _is_real(kappa) or kappa < 0:
        raise ConfigError(f"kappa={kappa!r} is out of range: use a finite number >= 0 (0 finds the boundary)")
    if not _is_int(steps) or steps < 1:
        raise ConfigError(f"steps={steps!r} is not a whole number of Adam steps >= 1: use e.g. steps={STEPS}")
    if not _is_real(lr) or lr <= 0:
        raise ConfigError(f"lr={lr!r} must be a finite number > 0: use e.g. lr=0.01")
    if not _is_int(binary_search_steps) or binary_search_steps < 1:
        raise ConfigError(f"binary_search_steps={binary_search_steps!r} is not a whole number >= 1: use e.g. "
                          f"binary_search_steps={BINARY_SEARCH_STEPS}")
    if not _is_real(initial_const) or initial_const <= 0:
        raise ConfigError(f"initial_const={initial_const!r} must be a finite number > 0: use e.g. 1e-3")



def carlini_wagner_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None,
                      kappa: float = 0.0, steps: int = STEPS, lr: float = 0.01,
                      binary_search_steps: int = BINARY_SEARCH_STEPS, initial_const: float = 1e-3,
                      abort_early: bool = True) -> MinimalResult:
    """Carlini–Wagner L2 on a batch, usable without Lightning: the smallest L2 perturbation found (no ε bound) that
    makes the model's prediction differ from y (or, with `target`, equal the target) by a margin κ.

    y is the label the attack moves away from. An example already adversarial at x comes back unchanged with norm 0
    and success True; one never made adversarial comes back unchanged with norm 0 and success False (read
    `success`). The model runs in eval mode with gradients on and comes back in its own modes, parameters' `.grad`
    untouched. Defaults: 9 binary-search steps on c from 1e-3 (the reference's), 500 Adam steps each (the reference:
    up to 10,000); see the module docstring for why.

    Example: ``x_adv, norms, success = carlini_wagner_l2(model, x, y)``
    """
    check_cw_options(kappa, steps, lr, binary_search_steps, initial_const)
    check_gradients_possible("Carlini-Wagner")
    x = upcast(x.detach())
    with model_mode(model, "eval", grad=True):
        return _carlini_wagner_l2(model, x, y, target, float(kappa), int(steps), float(lr), int(binary_search_steps),
                                  float(initial_const), bool(abort_early), compact=True)


def _margin_and_adversarial(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                            kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, adversarial): margin = max_{j≠y} Z_j − Z_y (targeted: Z_t − max_{j≠t} Z_j), and whether the prediction
    moved off y (onto the target) winning by at least κ."""
    margin = attack_loss(logits, y, "margin", target)
    pred = logits.argmax(1)
    hit = pred != y if target is None else pred == target
    return margin, hit & (margin.detach() >= kappa)


def _carlini_wagner_l2(model, x, y, target, kappa, steps, lr, binary_search_steps, initial_const, abort_early,
                       compact: bool, closest: bool = False):
    """The search, with the model already in the mode it should run in. compact: forward only the examples still
    being optimised (only sound when an example's forward does not depend on the batch: eval-mode BatchNorm).
    closest: also return, per example, the iterate of highest margin (x where none was run), the fixed-ε attack's
    answer where no iterate was adversarial."""
    n, dev, dtype = x.shape[0], x.device, x.dtype
    y = y.to(dev, torch.long)
    target = None if target is None else target.to(dev, torch.long)

    def pick(t, rows):
        return None if t is None else t[rows]

    with torch.no_grad():
        already = _margin_and_adversarial(upcast(model(x)), y, target, kappa)[1]
    best_l2 = torch.full((n,), math.inf, dtype=dtype, device=dev).masked_fill(already, 0.0)
    best_adv = x.clone()
    nearest = x.clone() if closest else None
    nearest_margin = torch.full((n,), -math.inf, dtype=dtype, device=dev)
    lower = torch.zeros(n, dtype=torch.float64, device=dev)
    upper = torch.full((n,), _NO_UPPER, dtype=torch.float64, device=dev)
    const = torch.full((n,), initial_const, dtype=torch.float64, device=dev)
    w0 = torch.atanh((2 * x - 1) * _INSIDE)
    check_every = max(steps // 10, 1)
    b1, b2 = _BETAS
    for _ in range(binary_search_steps):
        todo = ~already
        if not todo.any():
            break
        # This search step's batch, `idx` into the whole one; `live`: still being optimised. Adam is written out
        # because its state is per example: an example that stops leaves the batch with its state.
        idx = todo.nonzero().squeeze(1) if compact else torch.arange(n, device=dev)
        live = todo[idx]
        w, xs, ys, ts, cs = w0[idx], x[idx], y[idx], pick(target, idx), const[idx].to(dtype)
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        prev = torch.full((len(idx),), math.inf, dtype=dtype, device=dev)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        for it in range(steps):
            w.requires_grad_(True)
            xa = (torch.tanh(w) + 1) / 2
            l2 = _per_example(xa - xs).square().sum(1)
            margin, adv = _margin_and_adversarial(upcast(model(xa)), ys, ts, kappa)
            # c·(f + κ) = c·max(κ − margin, 0), the reference's form: the loss stays >= 0, as the abort rule assumes.
            loss = l2 + cs * (kappa - margin).clamp_min(0)
            (grad,) = torch.autograd.grad(loss.sum(), w)
            w, xa, l2, loss = w.detach(), xa.detach(), l2.detach(), loss.detach()
            with torch.no_grad():
                adv &= live
                found[idx[adv]] = True
                better = adv & (l2 < best_l2[idx])
                if better.any():
                    best_l2[idx[better]] = l2[better]
                    best_adv[idx[better]] = xa[better]
                if closest:
                    nearer = live & (margin.detach() > nearest_margin[idx])
                    nearest_margin[idx[nearer]] = margin.detach()[nearer].to(dtype)
                    nearest[idx[nearer]] = xa[nearer]
                if abort_early and it % check_every == 0:
                    live &= ~(loss > 0.9999 * prev)
                    prev = loss
                    if not live.any():
                        break
                    if compact and not live.all():
                        idx, w, xs, ys, cs, m, v, prev, grad = (
                            t[live] for t in (idx, w, xs, ys, cs, m, v, prev, grad))
                        ts, live = pick(ts, live), live[live]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                step = (m / (1 - b1 ** (it + 1))) / ((v / (1 - b2 ** (it + 1))).sqrt() + _ADAM_EPS)
                if not compact:
                    step *= live.to(dtype).reshape(-1, *([1] * (w.dim() - 1)))
                w -= lr * step
        # The reference's update of c, per example; examples adversarial at x take no part.
        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        bisect = (lower + upper) / 2
        const = torch.where(todo & (found | (upper < _NO_UPPER)), bisect, torch.where(todo, const * 10, const))
    success = torch.isfinite(best_l2)
    if success.any():
        with torch.no_grad():  # what a caller sees running the returned batch (see the module docstring)
            success &= _margin_and_adversarial(upcast(model(best_adv)), y, target, kappa)[1]
    norms = _per_example(best_adv - x).norm(dim=1)
    result = MinimalResult(best_adv, norms, success)
    return (result, nearest) if closest else result


@register_attack("cw_l2", summary="Carlini-Wagner L2: minimal L2 perturbation (tanh box, Adam, binary search on c), "
                                  "then kept inside the ε-ball")
class CarliniWagnerL2(MinimalAttack):
    """Carlini–Wagner L2's minimal perturbation, projected onto the L2 ε-ball so that it fits the fixed-ε suite: an
    example broken within ε stays broken (its x' bit for bit), one that needs more comes back on the sphere (usually
    correct), and one never broken comes back at its iterate of highest margin, projected (`minimal` returns x for
    it). `minimal` returns the unprojected result (norms and success), e.g. for a robustness curve.

    Args:
        kappa: the margin κ ≥ 0 by which the adversarial class must win. steps: Adam steps per search step.
        lr: Adam's learning rate on w. binary_search_steps: values of c tried per example, from initial_const.
        abort_early: stop an example's search step once its loss stops decreasing.

    Example: ``x_adv = CarliniWagnerL2(eps=1.5)(model, x, y)``;
    ``x_adv, norms, success = CarliniWagnerL2(1.5).minimal(model, x, y)``
    """

    def __init__(self, eps: float, *, kappa: float = 0.0, steps: int = STEPS, lr: float = 0.01,
                 binary_search_steps: int = BINARY_SEARCH_STEPS, initial_const: float = 1e-3,
                 abort_early: bool = True, targeted: bool = False, bn_mode: str = "eval"):
        check_cw_options(kappa, steps, lr, binary_search_steps, initial_const)
        super().__init__(eps, norm="l2", loss="margin", targeted=targeted, bn_mode=bn_mode)
        self.kappa, self.steps, self.lr = float(kappa), int(steps), float(lr)
        self.binary_search_steps, self.initial_const = int(binary_search_steps), float(initial_const)
        self.abort_early = bool(abort_early)
        self.step_size = None  # Adam's steps are in w, not in the image: see lr

    def perturb(self, model, x, y, target):
        result, nearest = self.find(model, x, y, target, closest=True)
        # Where no iterate was adversarial, the one that came nearest (highest margin) rather than x: like the other
        # attacks of the fixed-ε suite, the strongest attempt, and a picture of what the attack tried.
        x_adv = torch.where(_expand(result.success, x), result.x_adv, nearest)
        # Within ε the found x' itself: recomputing it as x + (x' − x) may round it back across the boundary it sits
        # just past.
        inside = _expand(_per_example(x_adv - x).norm(dim=1) <= self.eps, x)
        return torch.where(inside, x_adv, project(x_adv, x, self.eps, "l2"))

    def find(self, model, x, y, target, closest: bool = False):
        # With batch statistics an example's forward depends on the batch: keep everyone in it, as PGD does.
        return _carlini_wagner_l2(model, x, y, target, self.kappa, self.steps, self.lr, self.binary_search_steps,
                                  self.initial_const, self.abort_early, compact=self.bn_mode == "eval",
                                  closest=closest)

    def describe(self) -> dict:
        return {**super().describe(), "kappa": self.kappa, "lr": self.lr,
                "binary_search_steps": self.binary_search_steps, "initial_const": self.initial_const,
                "abort_early": self.abort_early}
