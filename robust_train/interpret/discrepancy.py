"""The interpretation discrepancy of interpretability-aware training (Boopathy et al., ICML 2020), as the
authors' code computes it (train.py::train_int), on unnormalised signed CAMs at feature resolution:

    D̃(x, x') = ‖I(x, y) − I(x', y)‖₁ + Σ_{i≠y} w_i(x') ‖I(x, i) − I(x', i)‖₁,
    w_i(x') = softmax(z(x'))_i / Σ_{j≠y} softmax(z(x'))_j   (w_y = 0)

No ½, no division by H·W: the training code has neither (only its evaluation code does), and λ = 0.01 was tuned
against this scale. The weights w stay in the graph, so the outer loss is differentiated through them too.
The one-class variant (Int-one-class) keeps only the true-class term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.interpret.cam import all_class_cams


def other_class_weights(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """w (N, C): the adversarial softmax renormalised over the classes other than y; zero at y; differentiable.

    softmax(z)_i / Σ_{j≠y} softmax(z)_j is the softmax of z with z_y masked out: computed that way, the weights
    still sum to 1 when the true class dominates (renormalising the full softmax underflows to ~0 weights once
    z_y leads by ~30 logits, i.e. on every confidently classified x')."""
    mask = F.one_hot(y, logits_adv.shape[1]).bool()
    return F.softmax(logits_adv.masked_fill(mask, float("-inf")), dim=1)


def discrepancy_from_cams(cams_clean: torch.Tensor, cams_adv: torch.Tensor, logits_adv: torch.Tensor,
                          y: torch.Tensor, one_class: bool = False) -> torch.Tensor:
    """Per-example D̃ (N,) from all-class CAMs (N, C, H, W) at x and x' and the logits at x'."""
    l1 = (cams_clean - cams_adv).abs().flatten(2).sum(2)  # (N, C)
    true_term = l1.gather(1, y[:, None]).squeeze(1)
    if one_class:
        return true_term
    return true_term + (other_class_weights(logits_adv, y) * l1).sum(1)


def interpretation_discrepancy(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                               one_class: bool = False) -> torch.Tensor:
    """Per-example D̃(x, x') (N,), differentiable with respect to both inputs and the parameters."""
    cams_clean, _ = all_class_cams(model, x)
    cams_adv, logits_adv = all_class_cams(model, x_adv)
    return discrepancy_from_cams(cams_clean, cams_adv, logits_adv, y, one_class)
