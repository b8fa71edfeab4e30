"""Interpretability-aware training (Boopathy et al., ICML 2020): Int, Int-Adv, Int-one-class, Int2, Int2-Adv.

    loss = CE(f(x̂), y) + λ·mean D̃(x, x*),  x̂ = x (Int, Int2) or x* (-Adv); x* from DiscrepancyPGD (Int) or PGD (Int2)

Each method's step on real MNIST images, its loss against the formula computed here, the reductions at λ = 0
(reference/methods.md §4.5), the inner attacks, a short Lightning fit, and that training lowers D̃.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robust_train.attacks import PGD, DiscrepancyPGD
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.interpret.discrepancy import interpretation_discrepancy
from robust_train.methods import (METHODS, Int2AdvTraining, Int2Training, IntAdvTraining, IntOneClassTraining,
                                  IntTraining, PGDTraining, StandardTraining)
from tests.conftest import quiet_trainer

INT_METHODS = [IntTraining, IntAdvTraining, IntOneClassTraining, Int2Training, Int2AdvTraining]
FAST = {"steps": 3, "step_size": 0.1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    """8 MNIST test images and labels."""
    return MNISTData().test_tensors(8)


def make(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(**{**(FAST if cls not in (StandardTraining,) else {}), **kwargs})


def ce(module, x, y):
    return F.cross_entropy(module.model(x), y)


def perturbed(x, eps: float = 0.3, seed: int = 1):
    """A fixed point of the ε-ball, for loss comparisons that should not depend on an attack."""
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * eps
    return (x + delta).clamp(0, 1)


def test_all_five_are_registered_methods():
    for cls in INT_METHODS:
        assert METHODS.get(cls.__name__) is cls
    assert (IntTraining.adv, IntAdvTraining.adv, IntOneClassTraining.adv, Int2Training.adv, Int2AdvTraining.adv) == \
        (False, True, False, False, True)
    assert IntOneClassTraining.one_class and not IntTraining.one_class and not Int2AdvTraining.one_class


@pytest.mark.parametrize("cls", INT_METHODS, ids=lambda c: c.__name__)
def test_step_gives_a_finite_loss_with_gradient_on_the_conv_weights(cls, batch):
    module = make(cls, lam=0.01)
    module.train()
    x, y = batch
    x_adv = module.adversarial_batch(x, y, 0.3)
    assert module.training and all(p.grad is None for p in module.parameters())
    loss, logits = module.training_loss(x, y, x_adv)
    assert loss.dim() == 0 and torch.isfinite(loss) and logits.shape == (8, 10)
    loss.backward()
    for conv in (module.model.body[0], module.model.body[2], module.model.body[4]):
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
        assert conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", INT_METHODS, ids=lambda c: c.__name__)
def test_adversarial_batch_stays_in_the_ball_and_is_x_at_eps_zero(cls, batch):
    module = make(cls)
    x, y = batch
    for eps in (0.3, 0.1):  # the warm-up hands a smaller ε than the module's
        x_adv = module.adversarial_batch(x, y, eps)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() > eps / 2
    assert torch.equal(module.adversarial_batch(x, y, 0.0), x)


@pytest.mark.parametrize("cls, at_adv, one_class", [(IntTraining, False, False), (IntAdvTraining, True, False),
                                                     (IntOneClassTraining, False, True)],
                         ids=["Int", "IntAdv", "IntOneClass"])
def test_int_inner_attack_is_discrepancy_pgd(cls, at_adv, one_class, batch):
    module = make(cls, lam=0.5, steps=4, step_size=0.05)
    attack = module.training_attack.at(0.2)
    assert isinstance(attack, DiscrepancyPGD)
    assert (attack.eps, attack.steps, attack.step_size, attack.lam) == (0.2, 4, 0.05, 0.5)
    assert (attack.at_adv, attack.one_class, attack.random_start) == (at_adv, one_class, True)
    x, y = batch  # and it is what adversarial_batch runs
    torch.manual_seed(3)
    ours = module.adversarial_batch(x, y, 0.2)
    torch.manual_seed(3)
    assert torch.equal(ours, DiscrepancyPGD(0.2, steps=4, step_size=0.05, lam=0.5, at_adv=at_adv,
                                            one_class=one_class)(module.model, x, y))


@pytest.mark.parametrize("cls", [Int2Training, Int2AdvTraining], ids=lambda c: c.__name__)
def test_int2_inner_attack_is_ce_pgd(cls, batch):
    module = make(cls, steps=4, step_size=0.05)
    attack = module.training_attack.at(0.2)
    assert isinstance(attack, PGD) and not isinstance(attack, DiscrepancyPGD)
    assert (attack.eps, attack.steps, attack.step_size, attack.keep_best, attack.random_start) == \
        (0.2, 4, 0.05, False, True)
    assert attack.loss == "ce" and not attack.targeted
    x, y = batch
    torch.manual_seed(3)
    ours = module.adversarial_batch(x, y, 0.2)
    torch.manual_seed(3)
    assert torch.equal(ours, PGD(0.2, steps=4, step_size=0.05, keep_best=False)(module.model, x, y))


def test_int_with_lam_zero_is_standard_training(batch):
    x, y = batch
    x_adv = perturbed(x)
    module, standard = make(IntTraining, lam=0.0), make(StandardTraining)
    standard.model.load_state_dict(module.model.state_dict())
    loss, logits = module.training_loss(x, y, x_adv)
    ref_loss, ref_logits = standard.training_loss(x, y, None)
    assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits)
    assert torch.equal(loss, ce(module, x, y))


def test_int_adv_with_lam_zero_is_cross_entropy_at_x_adv(batch):
    x, y = batch
    module = make(IntAdvTraining, lam=0.0)
    x_adv = module.adversarial_batch(x, y, 0.3)  # a PGD-for-D point (λ = 0: PGD on CE)
    loss, logits = module.training_loss(x, y, x_adv)
    assert torch.equal(loss, ce(module, x_adv, y)) and torch.equal(logits, module.model(x_adv))
    assert not torch.equal(loss, ce(module, x, y))


def test_int2_adv_with_lam_zero_is_pgd_training(batch):
    x, y = batch
    module, pgd = make(Int2AdvTraining, lam=0.0), make(PGDTraining)
    pgd.model.load_state_dict(module.model.state_dict())
    torch.manual_seed(5)
    x_adv = module.adversarial_batch(x, y, 0.3)
    torch.manual_seed(5)
    assert torch.equal(x_adv, pgd.adversarial_batch(x, y, 0.3))  # same inner problem
    assert torch.equal(module.training_loss(x, y, x_adv)[0], pgd.training_loss(x, y, x_adv)[0])


@pytest.mark.parametrize("cls, adv", [(IntTraining, False), (IntAdvTraining, True), (Int2Training, False),
                                      (Int2AdvTraining, True)], ids=["Int", "IntAdv", "Int2", "Int2Adv"])
def test_loss_is_cross_entropy_plus_lam_mean_discrepancy(cls, adv, batch):
    x, y = batch
    module = make(cls, lam=0.7)
    x_adv = module.adversarial_batch(x, y, 0.3)
    loss, _ = module.training_loss(x, y, x_adv)
    with torch.no_grad():
        d = interpretation_discrepancy(module.model, x, x_adv, y)
        base = ce(module, x_adv if adv else x, y)
    assert d.mean() > 0.1
    torch.testing.assert_close(loss.detach() - base, 0.7 * d.mean())
    # λ scales the term linearly.
    module.lam = 0.35
    torch.testing.assert_close(module.training_loss(x, y, x_adv)[0].detach() - base, 0.35 * d.mean())


def test_one_class_variant_uses_the_one_class_discrepancy(batch):
    x, y = batch
    x_adv = perturbed(x)
    one, full = make(IntOneClassTraining, lam=1.0), make(IntTraining, lam=1.0)
    full.model.load_state_dict(one.model.state_dict())
    with torch.no_grad():
        d_one = interpretation_discrepancy(one.model, x, x_adv, y, one_class=True).mean()
        d_full = interpretation_discrepancy(one.model, x, x_adv, y).mean()
        base = ce(one, x, y)
    loss_one, loss_full = one.training_loss(x, y, x_adv)[0].detach(), full.training_loss(x, y, x_adv)[0].detach()
    torch.testing.assert_close(loss_one - base, d_one)
    torch.testing.assert_close(loss_full - base, d_full)
    assert d_full - d_one > 0.05 * d_one  # the other-class term is really there, and really left out


def test_negative_lam_is_rejected_and_zero_accepted():
    for cls in INT_METHODS:
        with pytest.raises(ConfigError):
            cls(lam=-0.1)
        assert cls(lam=0.0).lam == 0.0
    with pytest.raises(ConfigError):
        IntTraining(steps=0)
    with pytest.raises(ConfigError):
        Int2Training(step_size=0.0)


def test_lightning_fit_with_int2_adv_updates_the_parameters(tmp_path):
    module = make(Int2AdvTraining, lam=0.01, lr=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=MNISTData(batch_size=16, val_size=16))
    assert trainer.global_step == 3
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "a parameter did not move"
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/discrepancy"] > 0
    assert 0 <= metrics["val/acc"] <= 1


def test_training_lowers_the_discrepancy_on_a_fixed_batch():
    """What the method is for: with a large λ the outer loss makes the maps of x and x* agree."""
    x, y = MNISTData().test_tensors(16)
    module = make(Int2Training, lam=1.0, lr=1e-3)
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def mean_d():
        torch.manual_seed(11)  # the same PGD start each time
        x_adv = module.adversarial_batch(x, y, 0.3)
        with torch.no_grad():
            return interpretation_discrepancy(module.model, x, x_adv, y).mean().item()

    start = mean_d()
    for _ in range(30):
        x_adv = module.adversarial_batch(x, y, 0.3)
        loss, _ = module.training_loss(x, y, x_adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_d() < 0.25 * start
