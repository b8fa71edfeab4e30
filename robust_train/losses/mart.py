"""MART's loss (Wang et al., ICLR 2020, "Improving adversarial robustness requires revisiting misclassified
examples", code YisenWang/MART, mart.py):

    BCE(p(x'), y) + β · mean_i[ KL(p(x_i) ‖ p(x'_i)) · (1 − p_y(x_i)) ],
    BCE = mean_i[ −log p_y(x'_i) − log(1 − max_{k≠y} p_k(x'_i)) ],

with the KL summed over classes. The boosted CE (BCE) adds a margin term that pushes down the strongest wrong
class; the KL term, weighted by 1 − p_y(x), asks for consistency mostly on the examples the model misclassifies.

Numerical stability, equivalent to the reference's constants:
* −log p_y(x') and the log-probabilities of the KL come from log_softmax, exact for any logits, where the reference
  takes log(p + 1e-12) of probabilities (the two differ only where p < ~1e-10);
* the margin term is −log(1.0001 − max_{k≠y} p_k(x') + 1e-12), the reference's expression: 1 − p_k is not
  available in log space for the one class k, and the 1.0001 bounds the term by −log(1e-4) ≈ 9.2 and its
  derivative in p_k by 1e4, so the loss and its gradient stay finite when the softmax saturates (p_k → 1);
* the weight is 1.0000001 − p_y(x), as in the reference (never exactly 0), and not detached: the paper's loss
  differentiates it too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robust_train.attacks.base import upcast


def mart_terms(logits_clean: torch.Tensor, logits_adv: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, weighted KL), each averaged over the batch; MART's loss is BCE + β·(weighted KL)."""
    logits_clean, logits_adv = upcast(logits_clean), upcast(logits_adv)
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    p_adv = log_p_adv.exp()
    wrong = p_adv.scatter(1, y[:, None], float("-inf")).amax(1)  # max_{k≠y} p_k(x')
    bce = F.nll_loss(log_p_adv, y) - torch.log(1.0001 - wrong + 1e-12).mean()
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    p_clean = log_p_clean.exp()
    kl = (p_clean * (log_p_clean - log_p_adv)).sum(1)
    weight = 1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1)
    return bce, (kl * weight).mean()


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART's training loss (module docstring) from the logits at x and at x'."""
    bce, weighted_kl = mart_terms(logits_clean, logits_adv, y)
    return bce + beta * weighted_kl
