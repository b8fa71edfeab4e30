"""`model_mode`, the one way anything here borrows a model's train/eval mode: every module's flag comes back as it
was (mixed modes included), BatchNorm statistics are untouched by a borrowed train mode, and gradients are switched
only when asked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.modes import model_mode


def mixed_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in train mode, on purpose
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_modes_and_batchnorm_statistics_come_back(mode):
    model = mixed_model()
    flags = [m.training for m in model.modules()]
    stats = [b.clone() for b in model[1].buffers()]
    with model_mode(model, mode):
        assert all(m.training == (mode == "train") for m in model.modules())
        model(torch.rand(8, 1, 6, 6))  # in train mode this updates the running statistics
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(stats, model[1].buffers()))


def test_gradients_switched_only_when_asked():
    model = mixed_model()
    with torch.no_grad():
        with model_mode(model, grad=True):
            assert torch.is_grad_enabled()
        with model_mode(model):
            assert not torch.is_grad_enabled()
    with model_mode(model, grad=False):
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_modes_come_back_after_an_error_and_bad_modes_are_refused():
    model = mixed_model()
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with model_mode(model, "eval"):
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(ConfigError, match="bn_mode"):
        with model_mode(model, "frozen"):
            pass
