"""AAI (attack against interpretability): threat model, the top-k CAM mass goes down, the update rule in closed
form on a map that is the image itself, model state untouched, argument checking, and τ falling with ε.

The model is the paper's MNIST small_cnn trained for a few Adam steps on 512 bundled MNIST test images (about a
second on one thread): enough for peaked, non-degenerate CAMs. Attacks run 10-20 steps, not the default 200.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import AAI, attack_loss, create_attack
from robust_train.attacks.aai import mass_on, top_cells
from robust_train.attacks.base import random_start
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.interpret.cam import cam
from robust_train.interpret.stability import stability_per_image
from robust_train.models import Classifier, create_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """(small_cnn in eval mode, 64 held-out MNIST images, labels)."""
    x, y = MNISTData().test_tensors(576)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)
    return model, x[512:], y[512:]


def topk_mass(model, x_eval, x_clean, y, k=8):
    with torch.no_grad():
        return mass_on(cam(model, x_eval, y), top_cells(cam(model, x_clean, y), k))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_stays_in_eps_ball_and_box(trained, eps):
    model, x, y = trained
    x_before = x.clone()
    torch.manual_seed(0)
    x_adv = AAI(eps, steps=10, step_size=eps / 4)(model, x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x, x_before) and not x_adv.requires_grad


def test_lowers_topk_mass_below_clean_and_random_start(trained):
    model, x, y = trained
    eps = 0.1
    torch.manual_seed(1)
    x_start = random_start(x, eps)
    torch.manual_seed(1)  # the attack's first random draw is its start: the same x_start
    x_adv = AAI(eps, steps=20, step_size=0.01)(model, x, y)
    clean, start, adv = (topk_mass(model, xe, x, y) for xe in (x, x_start, x_adv))
    assert adv.mean() < start.mean() and adv.mean() < clean.mean()
    assert (adv < clean).float().mean() >= 0.9


def test_update_rule_in_closed_form():
    """With the map = the image and no random start, the gradient of the top-k mass is 1 on the top-k pixels and 0
    elsewhere (sign 0: untouched), so after t steps exactly those k pixels went down by min(t·α, ε), clipped at 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 5, 5, generator=g, dtype=torch.float64)
    x[1, 0, 0, 0] = 1.0
    x[2] *= 0.05  # dark image: its top pixels hit the [0, 1] border before ε
    y = torch.zeros(3, dtype=torch.long)
    k, eps, alpha = 20, 0.1, 0.03

    def image_map(model, x_img, classes):
        return x_img[:, 0]

    for steps in (1, 2, 10):
        x_adv = AAI(eps, k=k, steps=steps, step_size=alpha, random_start=False, map_fn=image_map)(nn.Identity(), x, y)
        top = torch.zeros(3, 25, dtype=torch.bool).scatter_(1, top_cells(x[:, 0], k), True).view_as(x)
        expected = torch.where(top, (x - min(steps * alpha, eps)).clamp_min(0), x)
        torch.testing.assert_close(x_adv, expected, atol=1e-12, rtol=0)


class TinyBNClassifier(Classifier):
    """conv-BN-ReLU-dropout-conv, GAP, linear: 1x8x8 -> 3 logits; has every piece of state an attack could touch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.25),
                                  nn.Conv2d(4, 6, 3, stride=2, padding=1))
        self.head = nn.Linear(6, 3)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_model_state_untouched(bn_mode):
    torch.manual_seed(0)
    model = TinyBNClassifier().train()
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    F.cross_entropy(model(x), y).backward()  # leaves .grad and moves the BN statistics once
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {n: t.clone() for n, t in model.state_dict().items()}
    AAI(0.1, k=4, steps=3, bn_mode=bn_mode)(model, x, y)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def test_eps_zero_returns_input(trained):
    model, x, y = trained
    x_adv = AAI(0.0, steps=5)(model, x, y)
    assert torch.equal(x_adv, x) and x_adv is not x


def test_inference_mode_raises(trained):
    model, x, y = trained
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference"):
        AAI(0.1, steps=2)(model, x, y)


def test_registry_defaults_and_describe():
    attack = create_attack("aai", eps=0.3)
    assert isinstance(attack, AAI)
    assert (attack.k, attack.steps, attack.step_size, attack.random_start) == (8, 200, 0.01, True)
    assert (attack.keep_label, attack.label_weight) == (False, 0.0)  # the authors' evaluation: map term only
    info = create_attack("aai", eps=0.1, steps=7, k=5).describe()
    assert (info["attack"], info["steps"], info["k"], info["eps"], info["norm"]) == ("aai", 7, 5, 0.1, "linf")
    assert info["map_fn"] == "cam" and info["loss"] == "topk_map_mass"


def test_keep_label_objective_adds_hinge(trained):
    model, x, y = trained
    attack = AAI(0.1, keep_label=True, label_weight=2.5)
    cells = top_cells(cam(model, x, y).detach(), 8)
    with torch.no_grad():
        got = attack.objective(model, x, y, cells)
        expected = mass_on(cam(model, x, y), cells) + 2.5 * attack_loss(model(x), y, "margin").clamp_min(0)
        default = AAI(0.1).objective(model, x, y, cells)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(default, mass_on(cam(model, x, y), cells))
    assert AAI(0.1, keep_label=True).label_weight == 1.0


def test_keep_label_changes_fewer_predictions(trained):
    model, x, y = trained
    flipped = {}
    for keep in (False, True):
        torch.manual_seed(0)
        x_adv = AAI(0.1, steps=20, keep_label=keep, label_weight=100.0 if keep else None)(model, x, y)
        with torch.no_grad():
            flipped[keep] = (model(x_adv).argmax(1) != model(x).argmax(1)).sum().item()
    assert flipped[True] < flipped[False]


@pytest.mark.parametrize("kwargs", [{"norm": "l2"}, {"k": 0}, {"steps": 0}, {"step_size": 0.0},
                                    {"label_weight": 1.0}, {"keep_label": True, "label_weight": -1.0}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ConfigError):
        AAI(0.1, **kwargs)


def test_k_larger_than_map_raises(trained):
    model, x, y = trained
    with pytest.raises(ConfigError, match="k=50"):
        AAI(0.1, k=50, steps=1)(model, x, y)  # small_cnn's MNIST map is 7x7 = 49 cells


def test_tau_falls_with_eps(trained):
    """Mean τ over all images, label changed or not: this model is undefended, so at ε = 0.3 nearly every label
    flips (the paper's "Normal" row) and the label-filtered mean would average over almost nothing."""
    model, x, y = trained
    mean_tau = {}
    for eps in (0.05, 0.3):
        torch.manual_seed(0)
        x_adv = AAI(eps, steps=20, step_size=eps / 8)(model, x, y)
        tau, _, _ = stability_per_image(model, x, y, x_adv)
        mean_tau[eps] = np.nanmean(tau)
    assert mean_tau[0.3] < mean_tau[0.05] < 1
