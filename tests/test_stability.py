"""Map-stability metrics: Kendall τ_b identities and agreement with scipy, constant maps, top-k overlap on
handmade maps, aggregation over unchanged labels, and the ε = 0 case on a real model (τ = 1, not the authors' 0)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from robust_train.interpret.stability import (aggregate_stability, kendall_tau, map_stability,
                                              stability_per_image, topk_intersection)
from robust_train.models import create_model


@pytest.fixture
def maps():
    return np.random.default_rng(0).normal(size=(5, 7, 7))


def test_tau_identities(maps):
    np.testing.assert_allclose(kendall_tau(maps, maps), 1.0)
    np.testing.assert_allclose(kendall_tau(maps, -maps), -1.0)
    np.testing.assert_allclose(kendall_tau(maps, 2 * maps + 1), 1.0)
    np.testing.assert_allclose(kendall_tau(maps, np.exp(maps)), 1.0)  # rank-based: any increasing map


def test_tau_of_2d_maps_is_tau_of_ravel(maps):
    other = maps + np.random.default_rng(1).normal(size=maps.shape)
    np.testing.assert_array_equal(kendall_tau(maps, other), kendall_tau(maps.reshape(5, -1), other.reshape(5, -1)))
    np.testing.assert_allclose(kendall_tau(torch.from_numpy(maps), torch.from_numpy(other)),  # tensors too
                               kendall_tau(maps, other))


def test_tau_matches_scipy_tau_b_with_ties():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(6, 7, 7)).astype(float)  # few levels: many ties, like ReLU'd maps
    b = np.maximum(a + rng.integers(-2, 3, size=a.shape), 0)
    expected = [stats.kendalltau(ai.ravel(), bi.ravel(), variant="b").statistic for ai, bi in zip(a, b)]
    np.testing.assert_allclose(kendall_tau(a, b), expected, rtol=0, atol=1e-12)
    assert not np.allclose(expected, [stats.kendalltau(ai.ravel(), bi.ravel(), variant="c").statistic
                                      for ai, bi in zip(a, b)])  # the tie handling matters here


def test_constant_map_gives_nan_silently_and_is_counted(maps):
    adv = maps.copy()
    adv[1] = 0.0
    clean = maps.copy()
    clean[3] = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tau = kendall_tau(clean, adv)
    assert np.isnan(tau[[1, 3]]).all() and np.isfinite(tau[[0, 2, 4]]).all()
    result = aggregate_stability(tau, np.ones(5), np.ones(5, dtype=bool))
    assert result["kendall_tau"] == pytest.approx(1.0)
    assert (result["n_used"], result["n_total"], result["n_constant"]) == (3, 5, 2)


def test_shape_mismatch_raises(maps):
    with pytest.raises(ValueError, match="shape"):
        kendall_tau(maps, maps[:, :6])


def test_topk_intersection_handmade():
    clean = np.arange(49.0).reshape(1, 7, 7)  # top 8: cells 41..48
    adv = np.zeros(49)
    adv[[41, 42, 43, 44, 0, 1, 2, 3]] = 10 + np.arange(8)  # keeps 4 of them
    adv = adv.reshape(1, 7, 7)
    reversed_ = -clean  # top 8: cells 0..7, none shared
    batch_clean, batch_adv = np.concatenate([clean, clean, clean]), np.concatenate([adv, clean, reversed_])
    np.testing.assert_allclose(topk_intersection(batch_clean, batch_adv, k=8), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(topk_intersection(clean, adv, k=1), [0.0])  # 48 vs cell 3
    np.testing.assert_allclose(topk_intersection(clean, adv, k=49), [1.0])
    with pytest.raises(ValueError, match="k=50"):
        topk_intersection(clean, adv, k=50)


def test_aggregate_skips_changed_labels():
    tau = np.array([1.0, 0.5, np.nan, 0.2, -0.4])
    topk = np.array([1.0, 0.5, 0.25, 0.0, 0.125])
    unchanged = np.array([True, False, True, True, False])  # the NaN among changed ones is not "constant"
    result = aggregate_stability(tau, topk, unchanged)
    assert result["kendall_tau"] == pytest.approx(0.6)
    assert result["topk_intersection"] == pytest.approx(0.5)
    assert (result["n_used"], result["n_total"], result["n_constant"]) == (2, 5, 1)


def test_aggregate_with_nothing_usable_is_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = aggregate_stability(np.array([0.3, np.nan]), np.array([1.0, 1.0]), np.array([False, True]))
    assert np.isnan(result["kendall_tau"]) and np.isnan(result["topk_intersection"])
    assert (result["n_used"], result["n_total"], result["n_constant"]) == (0, 2, 1)


def test_batches_concatenate_to_the_whole():
    rng = np.random.default_rng(3)
    tau, topk, unchanged = rng.uniform(-1, 1, 10), rng.uniform(0, 1, 10), rng.uniform(size=10) < 0.7
    tau[4] = np.nan
    whole = aggregate_stability(tau, topk, unchanged)
    parts = [(tau[s], topk[s], unchanged[s]) for s in (slice(0, 3), slice(3, 10))]
    assert aggregate_stability(*(np.concatenate(p) for p in zip(*parts))) == whole


def test_map_stability_at_eps_zero_is_one():
    """x_adv = x: τ = 1 and full top-k overlap for every image (the authors' code would report 0 here)."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1).train()
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    result = map_stability(model, x, y, x.clone())
    assert result == {"kendall_tau": pytest.approx(1.0), "topk_intersection": 1.0, "n_used": 6, "n_total": 6,
                      "n_constant": 0}
    assert model.training  # evaluated in eval mode, then restored
    tau, topk, unchanged = stability_per_image(model, x, y, x)
    assert tau.shape == topk.shape == unchanged.shape == (6,) and unchanged.all()
