"""Per-example accuracy under attack, the quantity every robustness number here is made of.

Robust accuracy is the per-example worst case over every attack run (an example counts as robust only if no
attack broke it), never the minimum of the per-attack means, which would overstate robustness. The evaluation's
suite, the masking checks and the benchmarks all count it with these two functions.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from robust_train.distributed import Split, batch_seed
from robust_train.modes import model_mode

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # attack(model, x, y) -> x_adv


def predictions(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's predicted classes (N,), in eval mode without gradients, `batch_size` images at a time."""
    with model_mode(model, "eval", grad=False):
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]) \
            if len(x) else torch.zeros(0, dtype=torch.long, device=x.device)


def correct_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackFn | None = None,
                  batch_size: int = 250, split: Split | None = None, seed: tuple[int, ...] | None = None,
                  on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Per example (N,) bool: is the prediction on attack(model, x, y) (on x itself when attack is None) still y?

    split: this process's share when several evaluate together (its batches, summed over processes, so every
    process gets the whole result). seed: batch b's random draws come from `batch_seed(*seed, b)`, the same on any
    process and in any order, so the result does not depend on how the batches were shared out or what ran before.
    on_batch: called after each batch (a progress bar's update)."""
    split = split or Split()
    correct = torch.zeros(len(x), dtype=torch.bool, device=y.device)
    for b, rows in split.batches(len(x), batch_size):
        if seed is not None:
            torch.manual_seed(batch_seed(*seed, b))
        xb = x[rows] if attack is None else attack(model, x[rows], y[rows])
        correct[rows] = predictions(model, xb, batch_size) == y[rows]
        if on_batch is not None:
            on_batch()
    return split.sum(correct)


def worst_case(clean: torch.Tensor, correct_by_attack: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per example: correct on the clean image and under every attack (the robust examples)."""
    worst = clean.clone()
    for correct in correct_by_attack:
        worst &= correct.to(worst.device)
    return worst


def mean(correct: torch.Tensor) -> float:
    """The accuracy of per-example results; NaN for no examples."""
    return correct.float().mean().item() if len(correct) else float("nan")
