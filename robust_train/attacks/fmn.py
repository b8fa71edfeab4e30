"""FMN, the fast minimum-norm attack (Pintor, Roli, Brendel, Biggio, NeurIPS 2021, arXiv:2102.12827; the authors'
implementation is adv-lib's `adv_lib.attacks.fmn`, also in foolbox as `LInfFMNAttack`/`L2FMNAttack`), in L∞ and L2.

Per example, FMN keeps a norm budget ε_k and the iterate x_k = x + δ_k inside {‖δ‖ ≤ ε_k} ∩ [0, 1], and moves both:
    loss  L(x') = max_{j≠y} z_j − z_y (untargeted) or z_t − max_{j≠t} z_j (targeted): > 0 iff x' is adversarial;
    ε:    adversarial at x_k:      ε_{k+1} = min(ε_k·(1 − γ_k), ‖δ*‖)      (δ* the smallest adversarial one so far)
          none found yet:          ε_{k+1} = max(‖δ_k‖ + |L(x_k)| / ‖∇L(x_k)‖_*, ε_k·(1 + γ_k))   (the linearised
                                   distance to the boundary, or more; ε_0 = ‖δ_0‖, 0 from x)
          found before, not now:   ε_{k+1} = ε_k·(1 + γ_k)
          then ε_{k+1} = min(ε_{k+1}, ‖max(x, 1 − x)‖), the largest perturbation the box allows;
    δ:    δ_{k+1} = clip_[0,1](x + Π_{ε_{k+1}}(δ_k + α_k · g_k / ‖g_k‖₂)) − x,
with g_k the part of ∇L(x_k) that can move x_k (zero at a pixel on 0 or 1 where it points out of [0, 1]; see below),
‖·‖_* the dual norm (L1 for L∞, L2 for L2), Π the projection onto the ε-ball for L∞ (a per-pixel clip) and the
scaling onto the ε-sphere for L2 (see below), and α_k, γ_k cosine-annealed over the steps k = 0 … steps − 1:
    α_k = α_final + (α_init − α_final)·(1 + cos(πk/steps))/2,   γ_k likewise from γ_init = 0.05 to γ_final = 0.001.
The step is the gradient scaled to unit L2 norm for both threat models, as the authors' code does (adv-lib, and their
foolbox version), not the L∞ sign step: the projection onto the ε_k-box does the rest. The returned x' is, per example,
the adversarial iterate of smallest norm seen over all runs (one per starting point, below); an example the model
already gets wrong comes back as x itself, norm 0, success True.

Starting points (`init`). FMN only shrinks the norm of a point it already has, so where it ends depends on where it
starts: from x its normalised gradient steps settle on whichever boundary they reach first, which for some digits is
far from the nearest one; DeepFool's linearisation aims at the nearest, and FMN started there refines it locally.
    "clean":     δ_0 = 0, the paper's default.
    "deepfool":  DeepFool's point (50 steps, overshoot 0.02, every class a candidate, in the attack's norm), pulled
                 back towards x along adv-lib's path (the segment in L2, the per-pixel clip in L∞) by a 10-step
                 binary search to the nearest point that is still adversarial; x where DeepFool fails. The start is
                 itself a candidate, so every norm is at most DeepFool's on the same image (and every digit it
                 breaks stays broken). Untargeted only.
    "clean+deepfool" (INIT, the default untargeted; targeted runs start at x): both runs, per example the smaller
                 result, so at most both. Cost: DeepFool plus two runs, about 2.5 times one run from x.
Neither start alone is always the better one (bench/RESULTS.md, "minimal_norm"): from x 10–17 % of the digits of
the benchmark's MNIST models end farther than DeepFool's point, while on the tests' small MLP the start from x wins.

Defaults and where they differ from adv-lib (0.2.8):
  * steps=300 (adv-lib and foolbox: 10; the paper's best numbers use 1,000). See STEPS for why.
  * The step and the linearised budget use the feasible gradient g_k, not ∇L: at pixels on the border of [0, 1]
    (MNIST's background sits on 0) the components pointing out of the box count in ‖∇L‖₂ and ‖∇L‖_*, so the clip
    undoes part of every step (a step of α moves x_k by less) and the boundary looks nearer than it is. Without
    this, from x, the L2 run left digits of adversarially trained models unbroken (bench/RESULTS.md).
  * In L2 δ is scaled onto the sphere of radius ε_k, as the authors' adv-lib does (its `l2_projection_` rescales δ
    to ε_k, then caps components at 1), not only shrunk into the ball as foolbox's version does. Before a first
    success the budget is the linearised distance to the boundary, so the sphere puts every iterate there, where
    the ball lets it lag behind: on the adversarially trained model of bench/RESULTS.md ("minimal_norm") the ball
    left 3 % of the digits unbroken and a 14 % larger median on held-out digits; on a standard one the two are
    within 0.3 %. In L∞ the ball: scaling δ onto the sphere there gave 15 % larger medians on the standard model.
  * Before the first success the budget grows by at least (1 + γ_k) per step; adv-lib sets it to the linearised
    estimate ‖δ_k‖ + |L|/‖∇L‖_* alone, which can settle on a fixed point short of the boundary: an exact
    linearisation (an affine model, a ReLU network within one linear piece) puts the iterate on the boundary
    itself, where argmax keeps the label on a tie, and |L| = 0 keeps it there (a 2-class affine model with round
    float64 numbers, tests/test_fmn.py); the box did the same before the feasible gradient above.
  * Each run ends with its smallest adversarial iterate pulled back towards x along the path of `_towards` (a
    10-step binary search, as for DeepFool's start): the budget's last shrinks are 0.1 % a step, and an iterate
    past the boundary keeps the rest.
  * α_init = 1 for both norms, α_final = α_init/100, γ 0.05 → 0.001: adv-lib's (see ALPHA_INIT).
  * The iterate after the last update is also looked at (adv-lib updates after its last look, so that step is lost):
    one more forward, never a worse result.
  * The best norm starts at +inf, not at ‖max(x, 1 − x)‖ with a strict <, so an adversarial iterate at that largest
    norm is kept too.
  * Starting points: adv-lib takes `starting_points` from the caller (all adversarial, else an error); here the only
    one is DeepFool's, computed inside, and a digit it does not break starts at x. After its binary search adv-lib
    starts from the last midpoint, which may be on the wrong side; here from the upper end, adversarial by
    construction. Its budget then starts at +inf, here at ‖δ_0‖ (the first adversarial update shrinks it at once,
    one step earlier). With `init` unset runs start from both x and DeepFool's point (adv-lib: x).
  * Examples never made adversarial come back at their last iterate with success False (adv-lib returns x), as
    DeepFool here does: for the ε-ball class that is the point the attack pushed furthest towards the boundary.
  * The iterate x_k is kept, not δ_k: x' = clip_[0,1](x + δ) is then exactly in [0, 1], where x + (clip(x + δ) − x)
    can round just outside it.

Success is decided by one forward of the whole returned batch (a point within float rounding of the boundary, or
batch statistics in bn_mode="train", could otherwise be counted adversarial and not be so for the caller); `norms`
is ‖x' − x‖ in the attack's norm on that returned x'. Gradients are taken with torch.autograd.grad at the iterate
(parameters' `.grad` untouched), on float32 logits; the model runs in eval mode (the function) or the class's
bn_mode and comes back in its own modes. Every example runs every step (FMN keeps shrinking after it first succeeds).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from robust_train.attacks.base import Norm, _expand, _per_example, attack_loss, project, upcast
from robust_train.attacks.deepfool import _deepfool
from robust_train.attacks.minimal import MinimalAttack, MinimalResult, check_gradients_possible
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError
from robust_train.modes import model_mode

# 300 steps: on a standard model 100 steps are nearly converged, but an adversarially trained one has flat regions
# where the normalised steps crawl: at 100 steps the L2 run left some digits of the pgd_awp recipe's model unbroken
# (bench/RESULTS.md, "minimal_norm"). One forward and backward per step and example, per start.
STEPS = 300
# adv-lib's α_init, for both norms. In L∞ a step of unit L2 length moves each pixel by much less than 1, yet α_init 3
# and 10 gave the same medians as 1 (to 0.2 %) on those models, in L∞ and L2: the budget ε_k, not the step, is what
# converges.
ALPHA_INIT = 1.0
GAMMA_INIT, GAMMA_FINAL = 0.05, 0.001
# Where the runs start (see the module docstring, "Starting points"); INIT when init is None and untargeted.
INITS = ("clean", "deepfool", "clean+deepfool")
INIT = "clean+deepfool"
# Halvings of the path from x to DeepFool's point (adv-lib's binary_search_steps): the start is then within
# 2^-10 ≈ 0.1 % of that path's crossing of the boundary. One forward each, no backward.
BINARY_SEARCH_STEPS = 10
_TINY = 1e-12  # guards the divisions by a gradient's norm (a flat loss gives a zero gradient)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_fmn_options(norm: str, steps: int, alpha_init: float, alpha_final: float | None,
                      gamma_init: float, gamma_final: float, init: str | None = None) -> None:
    if norm not in ("linf", "l2"):
        raise ConfigError(f"unknown norm {norm!r} for FMN: use 'linf' or 'l2'")
    if init is not None and init not in INITS:
        raise ConfigError(f"init={init!r} is not a starting point of FMN: use 'clean' (x itself), 'deepfool' "
                          "(DeepFool's adversarial point), 'clean+deepfool' (both, the smaller result) or leave it "
                          f"unset ({INIT!r})")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"steps={steps!r} is not a whole number of steps >= 1: use e.g. steps={STEPS}")
    for name, value in (("alpha_init", alpha_init), ("alpha_final", alpha_final)):
        if (name == "alpha_init" or value is not None) and not (_is_number(value) and value > 0):
            raise ConfigError(f"{name}={value!r} must be a finite step size > 0 (adv-lib's alpha_init: {ALPHA_INIT})")
    for name, value in (("gamma_init", gamma_init), ("gamma_final", gamma_final)):
        if not (_is_number(value) and 0 < value < 1):
            raise ConfigError(f"{name}={value!r} must be in (0, 1), the budget's relative change per step "
                              f"(the paper: {GAMMA_INIT} annealed to {GAMMA_FINAL})")


def resolve_init(init: str | None, targeted: bool) -> str:
    """The starting points the runs use: `init`, or INIT; an untargeted DeepFool point is no start for a targeted
    run, so targeted runs start at x unless told otherwise (then a ConfigError)."""
    if init is None:
        return "clean" if targeted else INIT
    if "deepfool" in init and targeted:
        raise ConfigError(f"init={init!r} starts from an untargeted DeepFool point, which need not be in the "
                          "target class: use init='clean' (or leave it unset) for a targeted FMN")
    return init



def fmn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Norm = "linf", steps: int = STEPS,
        alpha_init: float = ALPHA_INIT, alpha_final: float | None = None, gamma_init: float = GAMMA_INIT,
        gamma_final: float = GAMMA_FINAL, init: str | None = None,
        target: torch.Tensor | None = None) -> MinimalResult:
    """FMN on a batch, usable without Lightning: the smallest perturbation (no ε bound) it finds that makes the
    model's prediction differ from y (or, with `target`, equal the target).

    y is the label moved away from (the true labels: an example the model already gets wrong comes back unchanged,
    norm 0, success True). alpha_final None: alpha_init / 100. init: "clean" (one run from x), "deepfool" (one run
    from the boundary below DeepFool's point: every norm at most DeepFool's; untargeted only), "clean+deepfool"
    (both runs, per example the smaller result; untargeted only) or None (INIT, "clean+deepfool"; "clean" with a
    target). See the module docstring, "Starting points".
    The model runs in eval mode with gradients on and comes back in its own modes, parameters' `.grad` untouched.

    Example: ``x_adv, norms, success = fmn(model, x, y, norm="l2")``
    """
    check_fmn_options(norm, steps, alpha_init, alpha_final, gamma_init, gamma_final, init)
    init = resolve_init(init, target is not None)
    check_gradients_possible("FMN")
    x = upcast(x.detach())
    with model_mode(model, "eval", grad=True):
        return _fmn(model, x, y, target, norm, steps, alpha_init, alpha_final, gamma_init, gamma_final, init)


def _size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = _per_example(delta)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)


def _adversarial(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def _towards(x: torch.Tensor, x_end: torch.Tensor, s: torch.Tensor, norm: str) -> torch.Tensor:
    """The point of norm s·‖x_end − x‖ on adv-lib's path from x to x_end (s per example in [0, 1]): the segment in
    L2, the perturbation clipped to ±s·‖δ‖∞ per pixel in L∞; both stay in [0, 1] and give x_end itself at s = 1."""
    if norm == "l2":
        return torch.lerp(x, x_end, _expand(s, x))
    delta = x_end - x
    bound = _expand(s * _size(delta, norm), delta)
    return torch.where(_expand(s == 1, x), x_end, (x + torch.clamp(delta, -bound, bound)).clamp(0.0, 1.0))


def _pull_back(model, x, x_end, y, target, norm) -> torch.Tensor:
    """The point nearest x on the path from x to x_end (`_towards`) that is still adversarial, to within 2^-10 of the
    path by a binary search of BINARY_SEARCH_STEPS forwards; x_end must be adversarial (the search's upper end always
    is, unlike adv-lib's last midpoint)."""
    lower = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    upper = torch.ones_like(lower)
    with torch.no_grad():
        for _ in range(BINARY_SEARCH_STEPS):
            mid = (lower + upper) / 2
            is_adv = _adversarial(upcast(model(_towards(x, x_end, mid, norm))), y, target)
            lower, upper = torch.where(is_adv, lower, mid), torch.where(is_adv, mid, upper)
    return _towards(x, x_end, upper, norm)


def _deepfool_start(model, x, y, norm, compact) -> torch.Tensor:
    """x_0 for init="deepfool": DeepFool's point (foolbox's overshoot 0.02 and nudge, 50 steps, every class a
    candidate), pulled back towards x (`_pull_back`); x itself where DeepFool failed."""
    found = _deepfool(model, x, y, norm, 0.02, 50, 10, compact=compact)
    return torch.where(_expand(found.success, x), _pull_back(model, x, found.x_adv, y, None, norm), x)


def _fmn(model, x, y, target, norm, steps, alpha_init, alpha_final, gamma_init, gamma_final, init="clean",
         compact=True) -> MinimalResult:
    """One run per starting point of `init`, with the model already in the mode it should run in; per example the
    smallest adversarial point of all runs (the first run's on a tie), else the first run's last iterate. compact:
    DeepFool (init with "deepfool") may drop the examples it has fooled from its batch (eval-mode BatchNorm only)."""
    alpha_init = float(alpha_init)
    alpha_final = alpha_init / 100 if alpha_final is None else float(alpha_final)
    y = y.to(x.device, torch.long)
    target = None if target is None else target.to(x.device, torch.long)
    schedule = (steps, alpha_init, alpha_final, gamma_init, gamma_final)
    best_adv = best_norm = x_last = None
    for start in init.split("+"):
        x_0 = _deepfool_start(model, x, y, norm, compact) if start == "deepfool" else x.clone()
        adv, adv_norm, last = _fmn_run(model, x, y, target, norm, x_0, *schedule)
        if best_adv is None:
            best_adv, best_norm, x_last = adv, adv_norm, last
        else:
            better = adv_norm < best_norm
            best_norm = torch.where(better, adv_norm, best_norm)
            best_adv = torch.where(_expand(better, x), adv, best_adv)
    with torch.no_grad():
        x_out = torch.where(_expand(torch.isfinite(best_norm), x), best_adv, x_last)
        # What a caller sees running the returned batch decides success (see the module docstring).
        success = _adversarial(upcast(model(x_out)), y, target)
    return MinimalResult(x_out.detach(), _size(x_out - x, norm).detach(), success)


def _fmn_run(model, x, y, target, norm, x_adv, steps, alpha_init, alpha_final, gamma_init, gamma_final):
    """The loop from the starting point x_adv (x itself or an adversarial point): (the smallest adversarial iterate
    and its norm, +inf where none was, and the last iterate)."""
    n = x.shape[0]
    worst = _size(torch.maximum(x, 1 - x), norm)  # no point of [0, 1] is farther from x
    # From x: 0 where adv-lib has +inf, the same first update (see below). From an adversarial start: its norm, so
    # that the first update already shrinks it by (1 − γ_0) (adv-lib's +inf keeps it one step longer).
    eps = _size(x_adv - x, norm)
    best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    best_adv = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)

    def keep_best(logits, x_at):
        nonlocal best_norm
        is_adv = _adversarial(logits, y, target)
        d_norm = _size(x_at - x, norm)
        better = is_adv & (d_norm < best_norm)
        best_norm = torch.where(better, d_norm, best_norm)
        best_adv[better] = x_at[better]
        return is_adv, d_norm

    for k in range(steps):
        cosine = (1 + math.cos(math.pi * k / steps)) / 2
        alpha = alpha_final + (alpha_init - alpha_final) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        xa = x_adv.detach().requires_grad_(True)
        logits = upcast(model(xa))
        loss = attack_loss(logits, y, "margin", target)
        (grad,) = torch.autograd.grad(loss.sum(), xa)
        with torch.no_grad():
            logits, loss = logits.detach(), loss.detach()
            is_adv, d_norm = keep_best(logits, x_adv)
            found |= is_adv
            # Only the part of the gradient that can move x' counts: at a pixel on 0 or 1 a component pointing out
            # of [0, 1] would be clipped away after the step, shortening it, and would make the boundary look
            # nearer in the linearised budget (see the module docstring).
            grad = torch.where(((x_adv <= 0) & (grad < 0)) | ((x_adv >= 1) & (grad > 0)), 0.0, grad)
            flat = _per_example(grad)
            dual = (flat.norm(dim=1) if norm == "l2" else flat.abs().sum(1)).clamp_min(_TINY)
            # Until a first success the budget jumps to the linearised boundary, but grows by at least (1 + γ): the
            # estimate alone can settle on a fixed point short of the boundary (see the module docstring). After a
            # first success it only creeps back out by (1 + γ), so a budget that once sufficed is not overshot.
            eps = torch.where(is_adv, torch.minimum(eps * (1 - gamma), best_norm),
                              torch.where(found, eps * (1 + gamma),
                                          torch.maximum(d_norm + loss.abs() / dual, eps * (1 + gamma))))
            eps = torch.minimum(eps, worst)
            step = grad * _expand(alpha / flat.norm(dim=1).clamp_min(_TINY), grad)
            delta = x_adv + step - x
            if norm == "linf":
                bound = _expand(eps, delta)
                delta = torch.clamp(delta, -bound, bound)
            else:  # onto the sphere, not into the ball: see the module docstring
                delta = delta * _expand(eps / _size(delta, norm).clamp_min(_TINY), delta)
            x_adv = (x + delta).clamp(0.0, 1.0)
    with torch.no_grad():
        # The last update has not been looked at yet (adv-lib drops it).
        keep_best(upcast(model(x_adv)), x_adv)
    # The budget's last shrinks are 0.1 % a step, and the best iterate may sit past the boundary: a pull-back
    # towards x takes what is left (10 forwards).
    found = torch.isfinite(best_norm)
    best_adv = torch.where(_expand(found, x), _pull_back(model, x, best_adv, y, target, norm), best_adv)
    best_norm = torch.where(found, _size(best_adv - x, norm), best_norm)
    return best_adv, best_norm, x_adv


@register_attack("fmn", summary="FMN: fast minimum-norm L∞ perturbation (Pintor et al.), then kept inside the ε-ball")
class FMN(MinimalAttack):
    """FMN's minimal perturbation, projected onto the ε-ball so that it fits the fixed-ε suite: an example broken
    within ε stays broken, one that needs more comes back on the sphere (usually correct). `minimal` returns the
    unprojected result (norms and success), e.g. for a robustness curve. "fmn" is the L∞ preset, "fmn_l2" the L2 one.

    Args:
        norm: "linf" (default) or "l2", the norm minimised and that of the ε-ball.
        steps: iterations (one forward and backward each). alpha_init, alpha_final: the step's length, annealed
            (alpha_final None: alpha_init / 100). gamma_init, gamma_final: the budget's relative change per
            step, annealed. init: the starting points, "clean" (x), "deepfool" (just inside DeepFool's point),
            "clean+deepfool" (one run from each, the smaller result) or None (INIT, "clean+deepfool"; "clean"
            when targeted). targeted: move each example into its target class instead.

    Example: ``x_adv = FMN(eps=0.1)(model, x, y)``; ``x_adv, norms, success = FMN(0.1).minimal(model, x, y)``
    """

    def __init__(self, eps: float, *, norm: Norm = "linf", steps: int = STEPS, alpha_init: float = ALPHA_INIT,
                 alpha_final: float | None = None, gamma_init: float = GAMMA_INIT, gamma_final: float = GAMMA_FINAL,
                 init: str | None = None, targeted: bool = False, bn_mode: str = "eval"):
        check_fmn_options(norm, steps, alpha_init, alpha_final, gamma_init, gamma_final, init)
        init = resolve_init(init, targeted)
        super().__init__(eps, norm=norm, loss="margin", targeted=targeted, bn_mode=bn_mode)
        self.init = init
        self.steps = int(steps)
        self.alpha_init = float(alpha_init)
        self.alpha_final = self.alpha_init / 100 if alpha_final is None else float(alpha_final)
        self.gamma_init, self.gamma_final = float(gamma_init), float(gamma_final)
        self.step_size = None  # the step is annealed from alpha_init to alpha_final

    def perturb(self, model, x, y, target):
        result = self.find(model, x, y, target)
        return project(result.x_adv, x, self.eps, self.norm)

    def find(self, model, x, y, target) -> MinimalResult:
        # With batch statistics an example's forward depends on the batch: DeepFool then keeps everyone in it.
        return _fmn(model, x, y, target, self.norm, self.steps, self.alpha_init, self.alpha_final, self.gamma_init,
                    self.gamma_final, self.init, compact=self.bn_mode == "eval")

    def describe(self) -> dict:
        return {**super().describe(), "alpha_init": self.alpha_init, "alpha_final": self.alpha_final,
                "gamma_init": self.gamma_init, "gamma_final": self.gamma_final, "init": self.init}


register_attack("fmn_l2", FMN, norm="l2", summary="FMN: fast minimum-norm L2 perturbation (Pintor et al.), then kept "
                                                  "inside the ε-ball")
