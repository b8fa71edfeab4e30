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
from robust_train.methods.base import DEFAULT_SPEC
from tests.conftest import quiet_trainer

SMALL = {name: {"steps": 3} for name in ("PGDTraining", "TRADESTraining", "IntTraining", "IntAdvTraining",
                                          "IntOneClassTraining", "Int2Training", "Int2AdvTraining",
                                          "IGNormTraining", "IGNormSumTraining", "MARTTraining")}
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
    return METHODS.get(name)(**{**SMALL.get(name, {}), **kwargs})


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


def test_checkpoint_metadata_is_plain_and_in_the_format_readers_expect():
    from robust_train.checkpoint import checkpoint_metadata

    meta = checkpoint_metadata("PGDTraining", "small_cnn", None, DEFAULT_SPEC, 0.3, {"recipe": "pgd"})
    assert meta == {"format": 1, "method": "PGDTraining", "arch": "small_cnn", "arch_kwargs": {},
                    "data_spec": DEFAULT_SPEC, "eps": 0.3, "recipe": "pgd"}
    assert list(meta) == ["format", "method", "arch", "arch_kwargs", "data_spec", "eps", "recipe"]
    assert meta["data_spec"] is not DEFAULT_SPEC  # a copy: later edits of the spec do not reach saved files


def test_a_written_classifier_reads_back_with_the_same_logits(tmp_path):
    import robust_train
    from robust_train.checkpoint import (checkpoint_metadata, classifier_from_checkpoint, read_checkpoint,
                                         save_classifier)

    module = make("StandardTraining", arch_kwargs={"widths": [4, 8, 16]})
    meta = checkpoint_metadata("Probe", "small_cnn", {"widths": [4, 8, 16]}, DEFAULT_SPEC, 0.1, {"note": "x"})
    save_classifier(module.model, meta, tmp_path / "probe.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["probe.ckpt"]  # no temporary file left behind
    raw = torch.load(tmp_path / "probe.ckpt", weights_only=True)
    assert raw["robust_train"] == meta and set(raw["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()}
    x = torch.rand(4, 1, 28, 28)
    expected = module.model.eval()(x)
    for model in (classifier_from_checkpoint(read_checkpoint(tmp_path / "probe.ckpt")),
                  robust_train.load(tmp_path / "probe.ckpt")):
        assert not model.training and torch.equal(model(x), expected)


def test_the_modules_checkpoint_metadata_keeps_plain_run_info_only():
    module = make("PGDTraining", steps=2)
    module.run_info = {"recipe": "pgd", "run_dir": "/runs/pgd/1", "steps": 2, "callback": object()}
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["robust_train"] == {"format": 1, "method": "PGDTraining", "arch": "small_cnn",
                                          "arch_kwargs": {}, "data_spec": DEFAULT_SPEC, "eps": 0.3,
                                          "recipe": "pgd", "run_dir": "/runs/pgd/1", "steps": 2}


class _TinyData:
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 28, 28, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0.5).long()  # a learnable rule: brightness

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)


class _AuxTrainer:
    is_global_zero = True

    def __init__(self):
        self.datamodule = _TinyData()


def attached(name: str = "StandardTraining", **kwargs) -> RobustModule:
    module = make(name, lr=1e-2, **kwargs)
    module._trainer = _AuxTrainer()
    return module


def test_train_auxiliary_lowers_the_loss_and_returns_an_eval_model():
    from robust_train.methods.auxiliary import train_auxiliary

    module = attached()
    data = module.trainer.datamodule
    torch.manual_seed(1)
    fresh = train_auxiliary(module, "small_cnn", {"widths": [4, 8, 16]}, F.cross_entropy, 0, "probe")
    torch.manual_seed(1)
    trained = train_auxiliary(module, "small_cnn", {"widths": [4, 8, 16]}, F.cross_entropy, 5, "probe")
    assert not trained.training and all(not m.training for m in trained.modules())
    with torch.no_grad():
        assert F.cross_entropy(trained(data.x), data.y) < 0.7 * F.cross_entropy(fresh(data.x), data.y)
    assert not any(p is q for p in trained.parameters() for q in module.parameters())


def test_train_auxiliary_stops_at_max_batches_and_names_its_progress_bars(monkeypatch):
    import robust_train.methods.auxiliary as auxiliary

    bars, losses = [], []
    real_tqdm = auxiliary.tqdm
    monkeypatch.setattr(auxiliary, "tqdm", lambda it, **kw: bars.append(kw["desc"]) or real_tqdm(it, **kw))

    def loss_fn(logits, y):
        losses.append(len(y))
        return F.cross_entropy(logits, y)

    auxiliary.train_auxiliary(attached(), "small_cnn", None, loss_fn, 2, "probe", max_batches=3)
    assert bars == ["probe, epoch 1/2", "probe, epoch 2/2"] and losses == [16] * 6


def test_train_auxiliary_draws_from_the_global_generator_deterministically():
    from robust_train.methods.auxiliary import train_auxiliary

    module, runs = attached(), []
    for _ in range(2):
        torch.manual_seed(5)
        model = train_auxiliary(module, "small_cnn", None, F.cross_entropy, 1, "probe")
        runs.append((model.state_dict(), torch.rand(3)))
    (first, after_first), (second, after_second) = runs
    assert all(torch.equal(first[k], second[k]) for k in first) and torch.equal(after_first, after_second)
    torch.manual_seed(5)
    assert not torch.equal(torch.rand(3), after_first)  # as documented: initialisation and shuffling drew from it


def test_the_ensembles_static_training_is_seeded_per_index_and_leaves_the_run_stream_alone():
    module = attached("EnsembleAdvTraining", static_epochs=1, static_max_batches=2)
    torch.manual_seed(7)
    first = module.train_static(0).state_dict()
    after = torch.rand(3)
    torch.manual_seed(8)
    again = module.train_static(0).state_dict()
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)  # fork_rng: the run's stream as if no static model were trained
    assert all(torch.equal(first[k], again[k]) for k in first)  # seed i, whatever the run's state
    other = module.train_static(1).state_dict()
    assert [v.shape for v in other.values()] != [v.shape for v in first.values()]


def test_train_auxiliary_without_a_data_module_is_a_config_error():
    from robust_train.errors import ConfigError
    from robust_train.methods.auxiliary import train_auxiliary

    module = attached()
    module.trainer.datamodule = None
    with pytest.raises(ConfigError, match="datamodule="):
        train_auxiliary(module, "small_cnn", None, F.cross_entropy, 1, "probe")
