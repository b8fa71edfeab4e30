"""The interpretation discrepancy D̃ of Boopathy et al. (ICML 2020) and its inner maximisation, DiscrepancyPGD.

D̃(x, x') = ‖I(x, y) − I(x', y)‖₁ + Σ_{i≠y} w_i(x') ‖I(x, i) − I(x', i)‖₁, w = softmax(z(x')) renormalised over
i ≠ y (reference/methods.md §4.1). Closed forms on handmade CAMs and logits, the identities of §4.5 on the
small MNIST CNN with random weights, and the attack's threat model and ascent.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robust_train.attacks import ATTACKS, DiscrepancyPGD, create_attack
from robust_train.attacks.base import random_start
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.interpret.cam import all_class_cams
from robust_train.interpret.discrepancy import (discrepancy_from_cams, interpretation_discrepancy,
                                                other_class_weights)
from robust_train.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    """16 MNIST test images (some pixels on 0 and 1, so the [0, 1] box is active) and labels."""
    return MNISTData().test_tensors(16)


def small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081]).eval()


# --------------------------------------------------------------------------------------------- handmade numbers
# N = 2 examples, C = 3 classes, 2x2 maps.
CAMS_CLEAN = torch.tensor([
    [[[1.0, 0.0], [0.0, 0.0]],   # example 0, class 0
     [[0.0, 2.0], [0.0, 0.0]],   # class 1 (the true class)
     [[0.0, 0.0], [3.0, 0.0]]],  # class 2
    [[[0.0, 0.0], [0.0, 0.0]],   # example 1: all maps zero
     [[0.0, 0.0], [0.0, 0.0]],
     [[0.0, 0.0], [0.0, 0.0]]],
])
CAMS_ADV = torch.tensor([
    [[[0.0, 0.0], [0.0, 0.0]],    # |1-0|                       = 1
     [[0.0, -1.0], [0.0, 1.0]],   # |2-(-1)| + |0-1|            = 4
     [[1.0, 0.0], [3.0, -2.0]]],  # |0-1| + |3-3| + |0-(-2)|    = 3
    [[[1.0, 1.0], [1.0, 1.0]],    # 4 (true class of example 1)
     [[-1.0, 0.0], [0.0, 0.0]],   # 1
     [[0.5, 0.5], [0.0, 0.0]]],   # 1
])
Y = torch.tensor([1, 0])
# Example 0: softmax over the other classes {0, 2} of logits (0, ln 3) -> w = (1/4, 0, 3/4); z_y = 5 is ignored.
# Example 1: the other classes {1, 2} have equal logits -> w = (0, 1/2, 1/2).
LOGITS_ADV = torch.tensor([[0.0, 5.0, math.log(3.0)], [7.0, 0.0, 0.0]])
L1 = torch.tensor([[1.0, 4.0, 3.0], [4.0, 1.0, 1.0]])
W = torch.tensor([[0.25, 0.0, 0.75], [0.0, 0.5, 0.5]])
D_FULL = torch.tensor([4.0 + 0.25 * 1.0 + 0.75 * 3.0, 4.0 + 0.5 * 1.0 + 0.5 * 1.0])  # (6.5, 5.0)
D_ONE_CLASS = torch.tensor([4.0, 4.0])


def test_weights_match_the_hand_computation():
    torch.testing.assert_close(other_class_weights(LOGITS_ADV, Y), W)
    e = math.e  # logits (1, 2, 3), y = 2: w = (e, e², 0) / (e + e²)
    torch.testing.assert_close(other_class_weights(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])),
                               torch.tensor([[1 / (1 + e), e / (1 + e), 0.0]]))


def test_weights_are_the_renormalised_softmax_sum_to_one_and_vanish_at_y():
    g = torch.Generator().manual_seed(0)
    logits, y = 3 * torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    w = other_class_weights(logits, y)
    p = F.softmax(logits.double(), 1)
    p[torch.arange(64), y] = 0
    torch.testing.assert_close(w.double(), p / p.sum(1, keepdim=True))
    torch.testing.assert_close(w.sum(1), torch.ones(64))
    assert torch.all(w[torch.arange(64), y] == 0) and torch.all(w >= 0)


def test_weights_still_sum_to_one_when_the_true_class_dominates():
    # A confidently classified x' (true logit 40-1000 ahead): the full softmax of the other classes underflows
    # (e^-40 ~ 4e-18), yet the renormalised weights are exactly 1/2, 1/2.
    for gap in (40.0, 100.0, 1000.0):
        w = other_class_weights(torch.tensor([[gap, 0.0, 0.0], [1.0, gap, 0.0]]), torch.tensor([0, 1]))
        torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 0.5], [math.e / (1 + math.e), 0.0, 1 / (1 + math.e)]]))


def test_closed_form_on_handmade_cams():
    torch.testing.assert_close((CAMS_CLEAN - CAMS_ADV).abs().flatten(2).sum(2), L1)  # the table above is right
    torch.testing.assert_close(discrepancy_from_cams(CAMS_CLEAN, CAMS_ADV, LOGITS_ADV, Y), D_FULL)
    torch.testing.assert_close(discrepancy_from_cams(CAMS_CLEAN, CAMS_ADV, LOGITS_ADV, Y, one_class=True),
                               D_ONE_CLASS)
    # Swapping the roles of x and x': one-class D is symmetric, the full D is not (w comes from x' only).
    logits_clean = torch.tensor([[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # w(x) = (3/4, 0, 1/4), (0, 1/2, 1/2)
    torch.testing.assert_close(discrepancy_from_cams(CAMS_ADV, CAMS_CLEAN, logits_clean, Y, one_class=True),
                               D_ONE_CLASS)
    torch.testing.assert_close(discrepancy_from_cams(CAMS_ADV, CAMS_CLEAN, logits_clean, Y),
                               torch.tensor([4.0 + 0.75 * 1.0 + 0.25 * 3.0, 5.0]))


def test_gradient_flows_through_the_weights_to_the_adversarial_logits():
    logits = LOGITS_ADV.clone().requires_grad_(True)
    discrepancy_from_cams(CAMS_CLEAN, CAMS_ADV, logits, Y).sum().backward()
    # dD/dz_i = w_i (L1_i − Σ_j w_j L1_j) for i ≠ y, and 0 at y (w does not depend on z_y).
    # Example 0: Σ w L1 = 2.5 -> (0.25·(1 − 2.5), 0, 0.75·(3 − 2.5)); example 1: equal L1 -> 0.
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.375, 0.0, 0.375], [0.0, 0.0, 0.0]]))
    # The one-class D ignores the logits altogether.
    torch.testing.assert_close(discrepancy_from_cams(CAMS_CLEAN, CAMS_ADV, torch.randn(2, 3), Y, one_class=True),
                               D_ONE_CLASS)


# ------------------------------------------------------------------------------------------ on the MNIST CNN
def test_discrepancy_is_zero_at_x_and_nonnegative(batch):
    model = small_cnn()
    x, y = batch
    for one_class in (False, True):
        assert torch.all(interpretation_discrepancy(model, x, x, y, one_class=one_class) == 0)
        x_other = torch.rand_like(x)
        d = interpretation_discrepancy(model, x, x_other, y, one_class=one_class)
        assert torch.all(d > 0)


def test_only_the_one_class_discrepancy_is_symmetric(batch):
    model = small_cnn()
    x, y = batch
    x_other = torch.rand_like(x)
    with torch.no_grad():
        one = interpretation_discrepancy(model, x, x_other, y, one_class=True)
        one_swapped = interpretation_discrepancy(model, x_other, x, y, one_class=True)
        full = interpretation_discrepancy(model, x, x_other, y)
        full_swapped = interpretation_discrepancy(model, x_other, x, y)
    torch.testing.assert_close(one, one_swapped)
    assert ((full - full_swapped).abs() / full).max() > 1e-3
    assert torch.all(full >= one)  # the other-class term is a convex combination of L1 norms, >= 0


def test_interpretation_discrepancy_equals_the_discrepancy_of_all_class_cams(batch):
    model = small_cnn()
    x, y = batch
    x_adv = random_start(x, 0.3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cams_clean, _ = all_class_cams(model, x)
        cams_adv, logits_adv = all_class_cams(model, x_adv)
        torch.testing.assert_close(model(x_adv), logits_adv)
        for one_class in (False, True):
            torch.testing.assert_close(interpretation_discrepancy(model, x, x_adv, y, one_class=one_class),
                                       discrepancy_from_cams(cams_clean, cams_adv, logits_adv, y, one_class))


def test_discrepancy_is_differentiable_in_x_adv_and_the_conv_weights(batch):
    model = small_cnn()
    x, y = batch
    x_adv = random_start(x, 0.3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    interpretation_discrepancy(model, x, x_adv, y).sum().backward()
    assert x_adv.grad.abs().sum() > 0 and torch.isfinite(x_adv.grad).all()
    for conv in (model.body[0], model.body[2], model.body[4]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- DiscrepancyPGD
def test_attack_stays_in_the_ball_and_the_box(batch):
    model = small_cnn()
    x, y = batch
    for kwargs in ({}, {"at_adv": True}, {"one_class": True}, {"at_adv": True, "random_start": False}):
        x_adv = DiscrepancyPGD(0.3, steps=4, step_size=0.1, **kwargs)(model, x, y)
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= 0.3 + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("one_class", [False, True])
def test_attack_raises_the_discrepancy_above_its_start_and_random_points(batch, one_class):
    model = small_cnn()
    x, y = batch
    torch.manual_seed(100)
    start = random_start(x, 0.3)
    torch.manual_seed(100)  # the attack's random start draws the same sample
    x_adv = DiscrepancyPGD(0.3, steps=5, step_size=0.1, one_class=one_class)(model, x, y)
    other = random_start(x, 0.3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        d_start, d_adv, d_other = (interpretation_discrepancy(model, x, p, y, one_class=one_class)
                                   for p in (start, x_adv, other))
    assert torch.all(d_adv >= d_start)
    assert d_adv.mean() > 2 * d_start.mean() and d_adv.mean() > 2 * d_other.mean()


def test_each_variant_wins_on_its_own_discrepancy(batch):
    model = small_cnn()
    x, y = batch
    torch.manual_seed(100)
    x_one = DiscrepancyPGD(0.3, steps=5, step_size=0.1, one_class=True)(model, x, y)
    torch.manual_seed(100)
    x_full = DiscrepancyPGD(0.3, steps=5, step_size=0.1)(model, x, y)
    with torch.no_grad():
        assert (interpretation_discrepancy(model, x, x_one, y, one_class=True).mean()
                > interpretation_discrepancy(model, x, x_full, y, one_class=True).mean())
        assert interpretation_discrepancy(model, x, x_full, y).mean() > interpretation_discrepancy(model, x, x_one, y).mean()


def test_attack_leaves_the_model_as_it_found_it(batch):
    model = small_cnn().train()
    x, y = batch
    marker = torch.full_like(model.body[0].weight, 0.5)
    model.body[0].weight.grad = marker.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    DiscrepancyPGD(0.3, steps=2, step_size=0.1, at_adv=True)(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.body[0].weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "body.0.weight")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    DiscrepancyPGD(0.3, steps=2, step_size=0.1)(model, x, y)
    assert not model.training


def test_at_adv_adds_the_cross_entropy_at_x_adv(batch):
    model = small_cnn()
    x, y = batch
    torch.manual_seed(100)
    start = random_start(x, 0.3)
    torch.manual_seed(100)
    x_d = DiscrepancyPGD(0.3, steps=5, step_size=0.1, lam=0.01)(model, x, y)
    torch.manual_seed(100)
    attack = DiscrepancyPGD(0.3, steps=5, step_size=0.1, lam=0.01, at_adv=True)
    x_ce = attack(model, x, y)

    def objective(p):  # what the at_adv attack ascends, per example
        return F.cross_entropy(model(p), y, reduction="none") + 0.01 * interpretation_discrepancy(model, x, p, y)

    with torch.no_grad():
        assert F.cross_entropy(model(x_ce), y) > F.cross_entropy(model(x_d), y)
        assert F.cross_entropy(model(x_ce), y) > F.cross_entropy(model(start), y)
        assert objective(x_ce).mean() > objective(start).mean()
    assert attack.describe()["loss"] == "ce_at_adv+lam*D" and DiscrepancyPGD(0.3).describe()["loss"] == "D"


def test_discrepancy_has_zero_gradient_at_x_so_a_d_only_attack_needs_a_random_start(batch):
    model = small_cnn()
    x, y = batch
    x_adv = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(interpretation_discrepancy(model, x, x_adv, y).sum(), x_adv)
    assert torch.all(grad == 0)  # an ascent from x' = x never moves: hence the ConfigError below
    with pytest.raises(ConfigError, match="random_start"):
        DiscrepancyPGD(0.3, random_start=False)
    with pytest.raises(ConfigError, match="random_start"):
        DiscrepancyPGD(0.3, random_start=False, one_class=True)


def test_without_random_start_the_attack_is_deterministic(batch):
    model = small_cnn()
    x, y = batch
    attack = DiscrepancyPGD(0.3, steps=3, step_size=0.1, random_start=False, at_adv=True)
    torch.manual_seed(0)
    first = attack(model, x, y)
    torch.manual_seed(1)
    assert torch.equal(first, attack(model, x, y))


def test_eps_zero_returns_x(batch):
    model = small_cnn()
    x, y = batch
    assert torch.equal(DiscrepancyPGD(0.0, steps=3)(model, x, y), x)
    assert torch.equal(DiscrepancyPGD(0.0, steps=3, at_adv=True)(model, x, y), x)


def test_registry_and_defaults():
    assert "pgd_discrepancy" in ATTACKS.names()
    attack = create_attack("pgd_discrepancy", eps=0.3)
    assert isinstance(attack, DiscrepancyPGD)
    assert attack.eps == 0.3 and attack.steps == 40 and attack.lam == 0.01
    assert attack.step_size == pytest.approx(2.5 * 0.3 / 40)
    assert not attack.at_adv and not attack.one_class and attack.random_start
    custom = create_attack("pgd_discrepancy", eps=0.1, steps=5, step_size=0.02, lam=1.0, at_adv=True)
    assert (custom.steps, custom.step_size, custom.lam, custom.at_adv) == (5, 0.02, 1.0, True)


@pytest.mark.parametrize("bad", [{"lam": 0.0}, {"lam": -1.0}, {"lam": float("nan")}, {"steps": 0},
                                 {"step_size": 0.0}, {"norm": "l2"}, {"targeted": True}, {"eps": 1.5},
                                 {"lam": -1.0, "at_adv": True}])
def test_bad_arguments_raise_config_errors(bad):
    with pytest.raises(ConfigError):
        DiscrepancyPGD(**{"eps": 0.3, **bad})


def test_lam_zero_is_allowed_with_at_adv():
    assert DiscrepancyPGD(0.3, lam=0.0, at_adv=True).lam == 0.0
