"""Adversarial weight perturbation: v's size and direction per layer, one training step equal to the closed form
w − η∇L(w + v), the weights handed back unperturbed, and no effect when γ is 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robust_train.errors import ConfigError
from robust_train.methods import PGDTraining, ProtoPNetTraining
from robust_train.methods.weight_perturbation import perturbed_parameters, shift_weights, weight_perturbation
from tests.conftest import quiet_trainer


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def test_v_has_relative_size_gamma_per_layer_along_the_gradient_and_skips_vectors():
    model = tiny_model()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    params = perturbed_parameters(model)
    assert [p.dim() for p in params] == [4, 2], "conv and linear matrices only, no biases or BatchNorm"
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    v = weight_perturbation(params, loss, gamma=0.01)
    for p, g, d in zip(params, grads, v):
        assert d.norm() == pytest.approx(0.01 * p.norm().item(), rel=1e-5)
        assert F.cosine_similarity(d.flatten(), g.flatten(), dim=0) == pytest.approx(1.0, abs=1e-6)
    before = F.cross_entropy(model(x), y).item()
    shift_weights(params, v, 1.0)
    after = F.cross_entropy(model(x), y).item()
    shift_weights(params, v, -1.0)
    assert after > before, "v ascends the loss"
    assert all(p.grad is None for p in model.parameters())


def one_sgd_step(tmp_path, **kwargs):
    torch.manual_seed(0)
    module = PGDTraining(arch="fast_mnist_cnn", steps=2, step_size=0.1, random_start=False, optimizer="sgd",
                         momentum=0.0, lr=0.5,
                         **kwargs)
    torch.manual_seed(1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
        module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=16))
    return module, start, x, y


def test_one_awp_step_is_w_minus_lr_times_the_gradient_at_w_plus_v(tmp_path):
    module, start, x, y = one_sgd_step(tmp_path, awp_gamma=0.05)
    # The closed form, by hand, on a copy at the starting weights with the same adversarial batch.
    reference = PGDTraining(arch="fast_mnist_cnn", steps=2, step_size=0.1, random_start=False)
    reference.model.load_state_dict(start)
    x_adv = reference.adversarial_batch(x, y, 0.3)
    params = perturbed_parameters(reference.model)
    v = weight_perturbation(params, F.cross_entropy(reference.model(x_adv), y), 0.05)
    shift_weights(params, v, 1.0)
    grads = torch.autograd.grad(F.cross_entropy(reference.model(x_adv), y), list(reference.model.parameters()))
    shift_weights(params, v, -1.0)
    for (name, p), g in zip(reference.model.named_parameters(), grads):
        expected = p.detach() - 0.5 * g
        assert torch.allclose(module.model.state_dict()[name], expected, atol=1e-6), name
    assert module._awp_shift is None, "the perturbation is undone after the step"


def test_gamma_zero_is_plain_pgd_training_and_awp_changes_the_step(tmp_path):
    plain, _, _, _ = one_sgd_step(tmp_path / "a")
    off, _, _, _ = one_sgd_step(tmp_path / "b", awp_gamma=0.0)
    on, _, _, _ = one_sgd_step(tmp_path / "c", awp_gamma=0.05)
    for a, b, c in zip(plain.parameters(), off.parameters(), on.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, c) for a, c in zip(plain.parameters(), on.parameters()))


def test_awp_warmup_delays_the_perturbation(tmp_path):
    plain, _, _, _ = one_sgd_step(tmp_path / "a")
    late, _, _, _ = one_sgd_step(tmp_path / "b", awp_gamma=0.05, awp_warmup=1.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), late.parameters()))


def test_the_extra_forward_leaves_batchnorm_statistics_alone():
    module = PGDTraining(arch="preact_resnet18", data_spec={"name": "c", "num_classes": 10, "in_channels": 3,
                                                           "image_size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3},
                         awp_gamma=0.01)
    module.train()
    stats = {k: v.clone() for k, v in module.model.state_dict().items() if "running" in k}
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    module.perturb_weights(x, y, x)
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in stats.items())
    module.restore_weights()


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf")])
def test_bad_gamma_is_refused(bad):
    with pytest.raises(ConfigError, match="awp_gamma"):
        PGDTraining(awp_gamma=bad)


def test_a_method_with_its_own_training_step_refuses_awp():
    with pytest.raises(ConfigError, match="awp_gamma"):
        ProtoPNetTraining(awp_gamma=0.01)


def test_the_pgd_awp_recipe_trains_a_few_batches_with_awp_on(tmp_path):
    from tests.conftest import train_recipe_briefly

    module = train_recipe_briefly("pgd_awp", tmp_path, steps=2, awp_warmup=0.0, eps_warmup_end=0.0)
    assert module.hparams.awp_gamma > 0 and module.awp_active() and module._awp_shift is None
