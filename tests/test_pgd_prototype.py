"""The adaptive attack on ProtoPNet (robust_train/attacks/pgd_prototype.py): what it ascends, the threat model every
attack keeps, and where `evaluate` runs it. Its strength on a trained ProtoPNet is measured in
bench/architectures.py (column PGDp), not here: a random tiny ProtoPNet has no saturated prototypes to get past."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robust_train.attacks import PGD, PrototypePGD, create_attack
from robust_train.models.protopnet import is_prototype_model
from robust_train.errors import ConfigError
from robust_train.evaluate import DEFAULT_SUITE, suite_for
from robust_train.models import create_model

MNIST = {"in_channels": 1, "mean": (0.1307,), "std": (0.3081,)}


def tiny_protopnet(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("protopnet", num_classes=num_classes, prototypes_per_class=2, prototype_dim=8,
                        widths=(4, 8, 8), **MNIST).double()


def batch(n: int = 6, num_classes: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64)
    x[:2] = x[:2].round()  # pixels on the 0 and 1 borders
    return x, torch.arange(n) % num_classes


def brute_force_linear_margin(model, x, y):
    """max_{c≠y} z_c − z_y for z = W·(−min_hw ‖Z_hw − p_j‖²), distances by a loop over prototypes and cells."""
    with torch.no_grad():
        z = model.latent_features(x)  # (N, D, H, W)
        protos = model.prototype_vectors.flatten(1)  # (P, D)
        min_d = torch.stack([((z - p[None, :, None, None]) ** 2).sum(1).flatten(1).amin(1) for p in protos], 1)
        logits = -min_d @ model.head.weight.t()
    own = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], float("-inf")).amax(1) - own


def test_objective_is_the_margin_of_the_linear_similarity_logits_and_success_uses_the_real_ones():
    model = tiny_protopnet().eval()
    x, y = batch()
    logits, losses = PrototypePGD(0.1).objective(model, x, y, None)
    assert torch.allclose(losses, brute_force_linear_margin(model, x, y), atol=1e-9)
    assert torch.allclose(logits, model(x))  # which iterate breaks the model is judged on its own logits
    # ...and it is not the margin of the real logits (the log similarity is what the attack goes around)
    real = PGD(0.1, loss="margin").objective(model, x, y, None)[1]
    assert not torch.allclose(losses, real, atol=1e-3)


def test_ascends_its_objective_inside_the_ball_and_box():
    model = tiny_protopnet().eval()
    x, y = batch()
    eps = 0.1
    torch.manual_seed(0)
    attack = PrototypePGD(eps, steps=10, step_size=eps, step_schedule="cosine")
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1
    before = brute_force_linear_margin(model, x, y)
    after = brute_force_linear_margin(model, x_adv, y)
    broken = model(x_adv).argmax(1) != y
    assert ((after > before + 1e-3) | broken).all(), "every example is broken or has a higher linear margin"


def test_leaves_the_model_as_it_found_it():
    model = tiny_protopnet().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch()
    PrototypePGD(0.1, steps=3)(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_targeted_variant_ascends_the_target_margin():
    model = tiny_protopnet().eval()
    x, y = batch()
    target = (y + 1) % 3
    attack = PrototypePGD(0.1, targeted=True)
    _, losses = attack.objective(model, x, y, target)
    assert torch.allclose(losses, -brute_force_linear_margin(model, x, target), atol=1e-9)


def test_registry_preset_and_non_prototype_models():
    assert isinstance(create_attack("pgd_prototype", eps=0.1), PrototypePGD)
    preset = create_attack("pgd_prototype", 8 / 255)
    assert (preset.steps, preset.step_size, preset.step_schedule, preset.loss) == (100, 8 / 255, "cosine", "margin")
    plain = create_model("small_cnn", **MNIST)
    assert is_prototype_model(tiny_protopnet()) and not is_prototype_model(plain)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="ProtoPNet"):
        PrototypePGD(0.1, steps=2)(plain, x, y)


def test_evaluate_adds_the_adaptive_attack_for_protopnet_only():
    proto, plain = tiny_protopnet(), create_model("small_cnn", **MNIST)
    assert suite_for(proto, None) == [*DEFAULT_SUITE, "pgd_prototype"]
    assert suite_for(plain, None) == DEFAULT_SUITE
    assert suite_for(proto, ["pgd"]) == ["pgd"]  # a named list is run as named
    with pytest.raises(ConfigError, match="pgd_prototype needs a ProtoPNet"):
        suite_for(plain, ["pgd", "pgd_prototype"])


def test_pgd_refactor_keeps_cross_entropy_pgd_identical():
    """PGD's loss now goes through `objective`; on a plain model it must still ascend cross-entropy exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).double().eval()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    grad, logits, losses = PGD(0.1).gradient(model, x, y, None)
    xr = x.clone().requires_grad_(True)
    ref = F.cross_entropy(model(xr), y, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    assert torch.allclose(losses, ref.detach()) and torch.allclose(grad, ref_grad)
