"""Each training method's step on real MNIST batches, the shared base's machinery, and the methods' math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robust_train.attacks import FGSM
from robust_train.callbacks import AttackAccuracy, RobustCheckpoint
from robust_train.data import MNISTData
from robust_train.methods import (METHODS, FastFGSMTraining, FGSMTraining, PGDTraining, RobustModule,
                                  StandardTraining, TRADESTraining)
from tests.conftest import quiet_trainer

SMALL = {name: {"steps": 3} for name in ("PGDTraining", "TRADESTraining", "IntTraining", "IntAdvTraining",
                                          "IntOneClassTraining", "Int2Training", "Int2AdvTraining")}
SMALL["ParsevalTraining"] = {"optimizer": "sgd", "lr": 0.05}
SMALL["EnsembleAdvTraining"] = {"static_epochs": 1, "static_max_batches": 2}
# Distillation trains a whole teacher first: tests/test_distillation.py covers its fit on a few batches.
TRAINED_HERE = sorted(set(METHODS) - {"DistillationTraining"})


@pytest.fixture(scope="module")
def mnist():
    dm = MNISTData(batch_size=32, val_size=100)
    dm.setup("fit")
    return dm


def make(name: str, **kwargs) -> RobustModule:
    torch.manual_seed(0)
    return METHODS[name](**{**SMALL.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", TRAINED_HERE)
def test_each_method_trains_a_few_steps_and_logs_robust_accuracy(name, mnist, tmp_path):
    module = make(name)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=3,
                            callbacks=[AttackAccuracy(steps=2, max_batches=1)])
    trainer.fit(module, datamodule=mnist)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "no parameter moved"
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 <= metrics["val/robust_acc"] <= 1 and 0 <= metrics["val/acc"] <= 1
    assert module.training, "the attack inside training_step must hand the model back in train mode"


@pytest.mark.parametrize("name", ["FGSMTraining", "FastFGSMTraining", "PGDTraining", "TRADESTraining"])
def test_adversarial_batch_stays_in_the_ball_and_leaves_the_model_alone(name, mnist):
    module = make(name)
    x, y = next(iter(mnist.train_dataloader()))
    module.train()
    x_adv = module.adversarial_batch(x, y, 0.3)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert module.training and all(p.grad is None for p in module.parameters())


def test_standard_training_uses_no_adversarial_batch(mnist):
    x, y = next(iter(mnist.train_dataloader()))
    assert StandardTraining().adversarial_batch(x, y, 0.3) is None


def test_fast_fgsm_defaults_are_wong_et_al():
    m = FastFGSMTraining()
    assert m.step_ratio == 1.25 and m.random_start
    assert not FGSMTraining().random_start


def test_fgsm_training_crafts_exactly_fgsm(mnist):
    module = make("FGSMTraining")
    x, y = next(iter(mnist.train_dataloader()))
    assert torch.equal(module.adversarial_batch(x, y, 0.2), FGSM(0.2)(module.model, x, y))


def test_trades_loss_is_ce_plus_beta_kl(mnist):
    module = make("TRADESTraining", beta=2.0)
    x, y = next(iter(mnist.train_dataloader()))
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    loss, _ = module.training_loss(x, y, x_adv)
    logits, logits_adv = module.model(x), module.model(x_adv)
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
    assert loss.item() == pytest.approx((F.cross_entropy(logits, y) + 2.0 * kl).item(), rel=1e-5)
    loss_same, _ = module.training_loss(x, y, x)
    assert loss_same.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


class _FakeTrainer:
    num_training_batches = 100


def test_eps_warmup_ramps_linearly_between_start_and_end():
    module = PGDTraining(eps=0.3, eps_warmup_start=1.0, eps_warmup_end=3.0)
    module._trainer = _FakeTrainer()
    seen = {}
    for step in (0, 100, 150, 200, 300, 1000):
        module.__dict__["_fake_step"] = step
        type(module).global_step = property(lambda self: self.__dict__["_fake_step"])
        seen[step] = module.current_eps()
    del type(module).global_step  # restore the LightningModule property
    assert seen == pytest.approx({0: 0.0, 100: 0.0, 150: 0.075, 200: 0.15, 300: 0.3, 1000: 0.3})


def test_attack_bn_mode_train_does_not_touch_running_stats():
    module = PGDTraining(arch="preact_resnet18", data_spec={"num_classes": 10, "in_channels": 3,
                                                            "mean": [0.5] * 3, "std": [0.25] * 3},
                         eps=8 / 255, steps=2, step_size=2 / 255, attack_bn_mode="train")
    module.train()
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    module.adversarial_batch(torch.rand(4, 3, 32, 32), torch.arange(4), 8 / 255)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])


@pytest.mark.parametrize("bad", [{"eps": 1.5}, {"eps": -0.1}, {"lr": 0.0}, {"arch": "nope"},
                                 {"eps_warmup_start": 3.0, "eps_warmup_end": 1.0}])
def test_bad_hyper_parameters_raise_config_errors(bad):
    from robust_train.errors import ConfigError

    with pytest.raises(ConfigError):
        StandardTraining(**bad)


def test_pgd_training_rejects_zero_steps():
    from robust_train.errors import ConfigError

    with pytest.raises(ConfigError):
        PGDTraining(steps=0)
    with pytest.raises(ConfigError):
        TRADESTraining(steps=0)


def test_last_checkpoint_follows_every_epoch_even_when_the_monitor_stops_improving(mnist, tmp_path):
    # A standard model's robust accuracy at eps 0.3 stays 0: no new best after epoch 0, yet last.ckpt must move on.
    ckpt = RobustCheckpoint(dirpath=tmp_path, monitor="val/robust_acc", mode="max", save_last=True,
                            filename="{epoch}")
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                            enable_checkpointing=True, callbacks=[AttackAccuracy(eps=[1.0], steps=1), ckpt])
    trainer.fit(make("StandardTraining"), datamodule=mnist)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0.ckpt", "last.ckpt"]
