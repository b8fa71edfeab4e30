"""AutoAttack as one of our attacks (`autoattack`, `autoattack_standard`): the package's examples stay in the ε-ball
and [0, 1], the model comes back as it was, and what it breaks is broken (its agreement with our suite is in
tests/test_evaluate.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_train.attacks import AutoAttack, create_attack
from robust_train.errors import ConfigError

pytest.importorskip("pyautoattack")


@pytest.fixture(scope="module")
def linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every example correct at the start
    return model, x, y


def test_autoattack_examples_are_valid_and_break_a_linear_model(linear_model):
    model, x, y = linear_model
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x_adv = create_attack("autoattack", 0.1)(model, x, y)
    assert model.training and all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        broken = (model(x_adv).argmax(1) != y).float().mean().item()
    assert broken > 0.5  # ε = 0.1 over 192 pixels moves a random linear model's logits a long way
    assert create_attack("autoattack", 0.0)(model, x, y).equal(x)  # ε = 0: the clean images


def test_versions_and_settings():
    assert create_attack("autoattack_standard", 0.1).describe()["version"] == "standard"
    row = create_attack("autoattack", 8 / 255).describe()
    assert row["attack"] == "autoattack" and row["version"] == "custom" and row["loss"] == "ce+dlr"
    with pytest.raises(ConfigError, match="version"):
        AutoAttack(0.1, version="plus")
