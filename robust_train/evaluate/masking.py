"""Gradient-masking checks: signs that a robust accuracy measured with gradient attacks overstates robustness.

A model can look robust because its gradients are useless rather than because it is robust (Athalye et al.,
ICML 2018, "Obfuscated gradients"; Carlini et al., 2019, "On evaluating adversarial robustness"). AutoAttack
(Croce & Hein, ICML 2020) flags such cases while it runs: a randomized model, probabilities instead of logits,
points with zero gradient, a black-box attack (Square) stronger than the white-box ones. The checks here follow
the same ideas on the L∞ threat model, each a plain function returning one row of report.json's `checks`:

    {"check": name, "passed": bool, "detail": one line for people, ...the numbers it compared}

* `deterministic_output`: two forward passes give the same logits (a randomized defense needs EOT attacks);
* `outputs_are_logits`: the outputs are not already a probability distribution;
* `zero_gradient_share`: few examples have an input gradient of cross-entropy that is exactly zero (a saturated
  softmax: the signature of defensive distillation deployed at T = 1);
* `monotone_in_eps`: the worst-case accuracy does not rise with ε;
* `monotone_in_steps`: PGD with more steps is not weaker than with fewer;
* `iterative_not_weaker`: PGD is not weaker than the single-step FGSM;
* `large_eps_breaks`: at ε = 1 (the whole image box: an attack may paint any image) PGD from the clean image
  leaves accuracy about 0;
* `noise_not_stronger`: random sign noise of size ε does not beat the white-box attacks;
* `black_box_not_stronger`: examples crafted on another model (transfer) do not beat the white-box attacks.

A failed check is a reason to distrust the numbers, not a proof of masking; a passed one proves nothing either.
Comparisons allow `tolerance(n)`: one example of n, and at least 0.3 points (the run-to-run spread of random-start
attacks on a few hundred images).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from robust_train.attacks.base import input_gradient
from robust_train.attacks.fgsm import FGSM
from robust_train.attacks.pgd import PGD
from robust_train.evaluate.accuracy import correct_under, mean, worst_case
from robust_train.modes import model_mode

STEPS, STEPS_FACTOR = 10, 4  # monotone_in_steps: PGD at 10 and 40 steps
LARGE_EPS, LARGE_EPS_STEPS, LARGE_EPS_MAX_ACCURACY = 1.0, 20, 0.05
ZERO_GRADIENT_MAX_SHARE = 0.01


def tolerance(n: int) -> float:
    """How much one accuracy may exceed another before a check fails: one example of n, at least 0.003."""
    return max(1.0 / max(int(n), 1), 0.003) + 1e-9


def result(check: str, passed: bool, detail: str, **numbers) -> dict:
    return {"check": check, "passed": bool(passed), "detail": detail, **numbers}


def sign_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + ε·s with s uniform on {−1, +1} per pixel (a random corner of the L∞ ball), clipped to [0, 1]."""
    s = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    return (x + eps * s).clamp(0.0, 1.0)


def ce_pgd(eps: float, steps: int, random_start: bool = True) -> PGD:
    """The checks' PGD: cross-entropy (the loss that masking hides), Madry's step 2.5·ε/steps."""
    return PGD(eps, steps=steps, step_size=2.5 * eps / steps if eps > 0 else None, random_start=random_start)


# ------------------------------------------------------------------------------ checks on numbers already measured
def monotone_in_eps(robust_by_eps: Mapping, n: int) -> dict:
    """Worst-case accuracy must not rise with ε: each value at most the lowest at any smaller ε plus the tolerance.
    robust_by_eps: {ε (number or its string, as in report["robust_accuracy"]): accuracy}."""
    points = sorted((float(e), float(a)) for e, a in robust_by_eps.items())
    tol = tolerance(n)
    lowest, rises = None, []
    for e, a in points:
        if lowest is not None and a > lowest[1] + tol:
            rises.append((lowest[0], lowest[1], e, a))
        if lowest is None or a < lowest[1]:
            lowest = (e, a)
    if rises:
        e0, a0, e1, a1 = max(rises, key=lambda r: r[3] - r[1])
        detail = f"accuracy rises from {a0:.4f} at ε={e0:g} to {a1:.4f} at ε={e1:g} (a larger ball contains the " \
                 "smaller one: the attack is failing)"
        return result("monotone_in_eps", False, detail, max_rise=a1 - a0, tolerance=tol)
    shown = ", ".join(f"{a:.3f}@{e:g}" for e, a in points)
    return result("monotone_in_eps", True, f"non-increasing in ε ({shown})", max_rise=0.0, tolerance=tol)


def steps_compared(acc_by_steps: Mapping[int, float], n: int) -> dict:
    """More PGD steps must not give higher accuracy: the row of `monotone_in_steps` from accuracies."""
    items = sorted((int(k), float(v)) for k, v in acc_by_steps.items())
    tol = tolerance(n)
    rise = max((b - a for i, (_, a) in enumerate(items) for _, b in items[i + 1:]), default=0.0)
    shown = ", ".join(f"{a:.4f} at {k} steps" for k, a in items)
    numbers = {"accuracy_by_steps": {str(k): a for k, a in items}, "tolerance": tol}
    if rise > tol:
        return result("monotone_in_steps", False, f"more steps give higher accuracy: {shown}", **numbers)
    return result("monotone_in_steps", True, f"more steps are not weaker: {shown}", **numbers)


def iterative_not_weaker(fgsm_acc: float, pgd_acc: float, n: int) -> dict:
    """PGD (many steps) must not leave more examples correct than FGSM (one step) at the same ε."""
    tol = tolerance(n)
    numbers = {"fgsm_accuracy": fgsm_acc, "pgd_accuracy": pgd_acc, "tolerance": tol}
    if pgd_acc > fgsm_acc + tol:
        return result("iterative_not_weaker", False, f"PGD {pgd_acc:.4f} is weaker than single-step FGSM "
                      f"{fgsm_acc:.4f}: the loss surface defeats iterative ascent", **numbers)
    return result("iterative_not_weaker", True, f"PGD {pgd_acc:.4f} ≤ FGSM {fgsm_acc:.4f}", **numbers)


def _not_stronger(check: str, what: str, white_acc: float, other_acc: float, n: int) -> dict:
    tol = tolerance(n)
    numbers = {"white_box_accuracy": white_acc, f"{what.replace(' ', '_')}_accuracy": other_acc, "tolerance": tol}
    if other_acc < white_acc - tol:
        return result(check, False, f"{what} {other_acc:.4f} beats the white-box attacks {white_acc:.4f}: their "
                      "gradients are misleading", **numbers)
    return result(check, True, f"{what} {other_acc:.4f} ≥ white-box {white_acc:.4f}", **numbers)


def black_box_not_stronger(white_acc: float, transfer_acc: float, n: int) -> dict:
    """Examples crafted on another model must not break more than the attacks that see this model's gradients."""
    return _not_stronger("black_box_not_stronger", "transfer", white_acc, transfer_acc, n)


def noise_not_stronger(white_acc: float, noise_acc: float, n: int) -> dict:
    """Random sign noise of size ε must not break more than the white-box attacks at the same ε."""
    return _not_stronger("noise_not_stronger", "random noise", white_acc, noise_acc, n)


# --------------------------------------------------------------------------------------- checks that run the model
def deterministic_output(model: nn.Module, x: torch.Tensor, repeats: int = 3, rtol: float = 1e-4) -> dict:
    """Repeated forward passes must agree (up to `rtol` of the logits' norm), as AutoAttack's randomness check."""
    with model_mode(model, "eval", grad=False):
        outs = [model(x) for _ in range(repeats)]
    scale = outs[0].flatten(1).norm(dim=1).clamp_min(1e-12)
    diff = max(((o - outs[0]).flatten(1).norm(dim=1) / scale).max().item() for o in outs) if len(x) else 0.0
    if diff > rtol:
        return result("deterministic", False, f"repeated forward passes differ (relative {diff:.2e}): a randomized "
                      "model needs attacks that average over its randomness (EOT)", max_relative_difference=diff)
    return result("deterministic", True, "repeated forward passes agree", max_relative_difference=diff)


def outputs_are_logits(model: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> dict:
    """The outputs must not already be probabilities (in [0, 1], rows summing to 1): cross-entropy on
    probabilities is a much weaker attack loss (AutoAttack's output-range check)."""
    with model_mode(model, "eval", grad=False):
        out = model(x)
    probabilities = bool(len(x)) and bool(out.min() > -atol and out.max() < 1 + atol
                                          and ((out.sum(-1) - 1).abs() < atol).all())
    if probabilities:
        return result("outputs_are_logits", False, "the model outputs probabilities (rows in [0, 1] summing to 1): "
                      "attacks need logits")
    return result("outputs_are_logits", True, "outputs are logits, not probabilities")


def zero_gradient_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_share: float = ZERO_GRADIENT_MAX_SHARE,
                        threshold: float = 0.0, batch_size: int = 250) -> dict:
    """Share of examples whose input gradient of cross-entropy has L1 norm ≤ `threshold` (0: exactly zero, as
    AutoAttack counts them); fails above `max_share`. A sign-gradient attack cannot move such a point at all,
    however small a non-zero gradient would still be usable, so exact zeros are what matter. Also reported: the
    share among correctly classified examples (the ones an attack must move) and the share of zero elements."""
    zero_rows, zero_elems, elems, correct = [], 0, 0, []
    with model_mode(model, "eval", grad=True):
        for i in range(0, len(x), batch_size):
            grad, logits, _ = input_gradient(model, x[i:i + batch_size], y[i:i + batch_size])
            zero_rows.append(grad.flatten(1).abs().sum(1) <= threshold)
            zero_elems += int((grad == 0).sum())
            elems += grad.numel()
            correct.append(logits.argmax(1) == y[i:i + batch_size])
    if not zero_rows:
        return result("zero_gradients", True, "no examples", share=0.0, share_of_correct=0.0,
                      element_share=0.0, max_share=max_share)
    zero, correct = torch.cat(zero_rows), torch.cat(correct)
    share = mean(zero)
    share_correct = mean(zero[correct]) if correct.any() else 0.0
    numbers = {"share": share, "share_of_correct": share_correct, "element_share": zero_elems / max(elems, 1),
               "count": int(zero.sum()), "max_share": max_share}
    if share > max_share:
        return result("zero_gradients", False, f"{int(zero.sum())} of {len(zero)} examples ({share:.1%}; "
                      f"{share_correct:.1%} of the correctly classified) have an exactly zero cross-entropy gradient: "
                      "a saturated softmax (or a non-differentiable step); use the margin loss (pgd_margin) or "
                      "AutoAttack", **numbers)
    return result("zero_gradients", True, f"{share:.1%} of examples have a zero gradient", **numbers)


def monotone_in_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = STEPS,
                      factor: int = STEPS_FACTOR, batch_size: int = 250, seed: int | None = 0) -> dict:
    """Cross-entropy PGD at `steps` and `factor`·steps (same random start when seeded): more steps must not give
    higher accuracy beyond the tolerance."""
    accs = {}
    for k in (steps, steps * factor):
        if seed is not None:
            torch.manual_seed(seed)
        accs[k] = mean(correct_under(model, x, y, ce_pgd(eps, k), batch_size))
    return {**steps_compared(accs, len(x)), "eps": eps}


def large_eps_breaks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = LARGE_EPS,
                     steps: int = LARGE_EPS_STEPS, max_accuracy: float = LARGE_EPS_MAX_ACCURACY,
                     batch_size: int = 250, seed: int | None = 0) -> dict:
    """Cross-entropy PGD at ε = 1, where the attack may paint any image: accuracy must be about 0 (≤ max_accuracy)
    unless the gradients lead nowhere. It starts from the clean image, not from a random point: at ε = 1 a random
    start is noise, which breaks most images without any gradient, so it would hide the very failure looked for."""
    if seed is not None:
        torch.manual_seed(seed)
    acc = mean(correct_under(model, x, y, ce_pgd(eps, steps, random_start=False), batch_size))
    numbers = {"eps": eps, "steps": steps, "accuracy": acc, "max_accuracy": max_accuracy}
    if acc > max_accuracy:
        return result("large_eps_breaks", False, f"PGD at ε={eps:g} leaves accuracy {acc:.4f} > {max_accuracy:g}, "
                      "though it may paint any image: the gradients lead nowhere", **numbers)
    return result("large_eps_breaks", True, f"PGD at ε={eps:g} gives accuracy {acc:.4f}", **numbers)


# ------------------------------------------------------------------------------------------------------ all at once
def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
               robust_by_eps: Mapping | None = None, n_eval: int | None = None,
               white_correct: torch.Tensor | None = None, reuse_fgsm_pgd: tuple[float, float] | None = None,
               transfer_correct: torch.Tensor | None = None, transfer_white: torch.Tensor | None = None,
               batch_size: int = 250, seed: int = 0) -> list[dict]:
    """Every check on the examples x (a subset of the evaluated ones) at the main ε.

    robust_by_eps / n_eval: the evaluation's worst-case accuracy per ε and its number of examples;
    white_correct: per example of x, whether the evaluation's suite left it correct at `eps` (None when `eps` is
    not in its grid): the checks' own attacks are added to it to make the white-box reference;
    reuse_fgsm_pgd: (FGSM, PGD) accuracies the evaluation measured at `eps` on all its examples, used instead of
    new runs; transfer_correct / transfer_white: per evaluated example, correct under the transferred examples and
    under the white-box attacks (the black-box check runs only when given).
    """
    n = len(x)
    rows = [deterministic_output(model, x[:batch_size]), outputs_are_logits(model, x[:batch_size]),
            zero_gradient_share(model, x, y, batch_size=batch_size)]
    if robust_by_eps:
        rows.append(monotone_in_eps(robust_by_eps, n_eval or n))

    by_steps = {}
    for k in (STEPS, STEPS * STEPS_FACTOR):
        torch.manual_seed(seed)  # the same random start for both step counts
        by_steps[k] = correct_under(model, x, y, ce_pgd(eps, k), batch_size)
    rows.append({**steps_compared({k: mean(c) for k, c in by_steps.items()}, n), "eps": eps})

    if reuse_fgsm_pgd is not None:
        rows.append({**iterative_not_weaker(*reuse_fgsm_pgd, n_eval or n), "eps": eps, "reused": True})
        fgsm_correct = None
    else:
        fgsm_correct = correct_under(model, x, y, FGSM(eps), batch_size)
        rows.append({**iterative_not_weaker(mean(fgsm_correct), mean(by_steps[STEPS]), n), "eps": eps})

    rows.append(large_eps_breaks(model, x, y, batch_size=batch_size, seed=seed))

    start = torch.ones_like(y, dtype=torch.bool) if white_correct is None else white_correct
    white = worst_case(start, [c for c in (*by_steps.values(), fgsm_correct) if c is not None])
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = correct_under(model, x, y, lambda _, xb, yb: sign_noise(xb, eps, generator), batch_size)
    rows.append({**noise_not_stronger(mean(white), mean(noise), n), "eps": eps,
                 "broken_only_by_noise": int((white & ~noise).sum())})

    if transfer_correct is not None:
        if transfer_white is not None and len(transfer_white) == len(transfer_correct):
            reference = transfer_white  # the suite's worst case on every evaluated example
        else:  # no suite result at this ε: compare on x, with the checks' own attacks as the white box
            reference, transfer_correct = white, transfer_correct[:n]
        rows.append({**black_box_not_stronger(mean(reference), mean(transfer_correct), len(reference)),
                     "eps": eps, "broken_only_by_transfer": int((reference & ~transfer_correct).sum())})
    return rows


def masking_suspected(rows: Sequence[dict]) -> bool:
    return any(not r["passed"] for r in rows)


def format_checks(rows: Sequence[dict]) -> str:
    """A markdown table: ✓/✗, the check's name, its detail."""
    lines = ["| | check | detail |", "|---|---|---|"]
    lines += [f"| {'✓' if r['passed'] else '✗'} | {r['check']} | {r['detail']} |" for r in rows]
    return "\n".join(lines)
