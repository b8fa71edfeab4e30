"""How much an interpretation map moves under an attack: Kendall's τ and top-k overlap, as in Boopathy et al.
(ICML 2020, code `eval.py::tau_corr`).

    τ_b(a, b) = (P − Q) / sqrt((P + Q + T_a)(P + Q + T_b))  over all pairs of the H·W cells of the flattened maps,

with P/Q the concordant/discordant pairs and T_a/T_b the pairs tied in one map only (scipy's variant "b", which
is what the authors' `scipy.stats.kendalltau` call computes on 2-D input). τ uses the *whole* true-class map at
feature resolution, never an upsampled one (interpolation adds cells and fake local correlation); top-k only
defines the attack (`robust_train.attacks.aai`). τ is rank-based, so min-max normalisation changes nothing.

Aggregation follows the authors: images whose predicted label changed are skipped and τ is averaged over the
rest. Two departures, both deliberate:
* A constant map (e.g. all-zero ReLU'd map) has no ranking and τ is NaN; such images are left out of the mean and
  counted in `n_constant` instead of silently poisoning it (scipy's warning is suppressed).
* The authors return 0 when ε = 0; here x_adv = x simply gives τ = 1 (and top-k overlap 1), the honest value.

`topk_intersection` is |top-k(clean) ∩ top-k(adv)| / k (the authors' `intr_topk` divides by the map size and picks
the k-th value across the batch, bugs not copied). Ties among top cells are broken by the lower flat index.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from scipy import stats
from torch import nn

from robust_train.interpret.cam import cam
from robust_train.modes import model_mode

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _flat_pair(clean_maps, adv_maps) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(clean_maps.detach().cpu() if torch.is_tensor(clean_maps) else clean_maps, dtype=np.float64)
    b = np.asarray(adv_maps.detach().cpu() if torch.is_tensor(adv_maps) else adv_maps, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"expected two batches of maps (N, ...) of one shape, got {a.shape} and {b.shape}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def kendall_tau(clean_maps, adv_maps) -> np.ndarray:
    """τ_b per image (N,) between flattened maps (tensors or arrays, (N, H, W) or (N, D)); NaN where a map is
    constant."""
    a, b = _flat_pair(clean_maps, adv_maps)
    taus = np.full(len(a), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=getattr(stats, "ConstantInputWarning", RuntimeWarning))
        for i, (ai, bi) in enumerate(zip(a, b)):
            if np.ptp(ai) > 0 and np.ptp(bi) > 0:
                taus[i] = stats.kendalltau(ai, bi, variant="b").statistic
    return taus


def topk_intersection(clean_maps, adv_maps, k: int = 8) -> np.ndarray:
    """|top-k(clean) ∩ top-k(adv)| / k per image (N,)."""
    a, b = _flat_pair(clean_maps, adv_maps)
    if not 0 < k <= a.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of map cells ({a.shape[1]})")
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return np.array([len(np.intersect1d(ta, tb)) / k for ta, tb in zip(top_a, top_b)])


def stability_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                        map_fn: MapFn = cam, k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(τ, top-k overlap, prediction unchanged) per image, for concatenation across batches.

    Maps are of the true class y. The model runs in eval mode (its modes are restored afterwards), so that
    dropout or batch statistics cannot make τ(x, x) differ from 1; maps are computed with gradients enabled,
    for map functions that need them, and detached.
    """
    with model_mode(model, "eval", grad=True):
        clean_maps = map_fn(model, x, y).detach()
        adv_maps = map_fn(model, x_adv, y).detach()
        with torch.no_grad():
            unchanged = model(x).argmax(1) == model(x_adv).argmax(1)
    return (kendall_tau(clean_maps, adv_maps), topk_intersection(clean_maps, adv_maps, k),
            unchanged.cpu().numpy())


def aggregate_stability(tau, topk, unchanged) -> dict:
    """Means of τ and top-k overlap over images whose label did not change and whose τ is finite."""
    tau, topk = np.asarray(tau, dtype=np.float64), np.asarray(topk, dtype=np.float64)
    unchanged = np.asarray(unchanged, dtype=bool)
    used = unchanged & np.isfinite(tau)
    n_used = int(used.sum())
    return {
        "kendall_tau": float(tau[used].mean()) if n_used else float("nan"),
        "topk_intersection": float(topk[used].mean()) if n_used else float("nan"),
        "n_used": n_used,
        "n_total": int(len(tau)),
        "n_constant": int((unchanged & np.isnan(tau)).sum()),
    }


def map_stability(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                  map_fn: MapFn = cam, k: int = 8) -> dict:
    """{"kendall_tau", "topk_intersection", "n_used", "n_total", "n_constant"} for one batch."""
    return aggregate_stability(*stability_per_image(model, x, y, x_adv, map_fn, k))
