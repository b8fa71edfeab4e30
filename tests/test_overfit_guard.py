"""The catastrophic-overfitting guard: a collapse forced on a robust toy model is caught and undone exactly, a model
that does not collapse is left alone (and trains exactly as without the guard), the model's mode and gradients
survive a check, FGSM's step shrinks (and stays shrunk across a resume), and bad options are refused."""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from robust_train.attacks import FGSM
from robust_train.callbacks import OverfitGuard
from robust_train.callbacks.overfit_guard import count_correct, cpu_copy, seeded_rng
from robust_train.errors import ConfigError
from robust_train.methods import FastFGSMTraining, FGSMTraining, PGDTraining
from tests.conftest import quiet_trainer
from tests.test_cli import run

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"name": "toy", "num_classes": 2, "in_channels": 1, "image_size": [8, 8], "mean": [0.5], "std": [0.5]}
TINY = {"arch": "small_cnn", "arch_kwargs": {"widths": [4, 8, 8]}, "data_spec": SPEC, "eps": 0.1}


def toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8x8 images, pixels 0.2 ± 0.1 and 0.8 ± 0.1: at ε = 0.1 the classes stay 0.2 apart per pixel,
    so a briefly trained model is robust on all of them, and a collapse shows as a drop from 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return 0.2 + 0.6 * y[:, None, None, None] + (torch.rand(n, 1, 8, 8, generator=g) - 0.5) * 0.2, y


def toy_data(batch_size: int = 16) -> pl.LightningDataModule:
    return pl.LightningDataModule.from_datasets(train_dataset=TensorDataset(*toy(256, 0)),
                                                val_dataset=TensorDataset(*toy(64, 1)), batch_size=batch_size)


@pytest.fixture(scope="module")
def robust_weights() -> dict:
    """small_cnn weights after 20 clean Adam steps on the toy data: robust accuracy 1 under PGD at ε = 0.1, and a
    loss not yet so small that the gradients vanish (the training steps must move the weights)."""
    torch.manual_seed(0)
    model = FastFGSMTraining(**TINY).model
    x, y = toy(256, 0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(20):
        rows = torch.randint(0, len(y), (32,))
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    return cpu_copy(model.state_dict())


def robust_module(weights: dict, cls=FastFGSMTraining, **kwargs):
    torch.manual_seed(1)
    module = cls(**{**TINY, "lr": 1e-3, **kwargs})
    module.model.load_state_dict(weights)
    return module


def fit(module, callbacks, tmp_path, steps: int, **trainer_kwargs) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=toy_data())
    return trainer


def assert_same(a, b):
    """Two nested states (state_dicts) hold exactly the same keys, numbers and tensors."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        assert a == b


class Destroy(pl.Callback):
    """At step `at`, flips the sign of the head: every prediction of 2 classes becomes the other one."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.head.weight.neg_()
                pl_module.model.head.bias.neg_()


class Record(pl.Callback):
    """After the guard: model and optimizer state, step ratio and the guard's logged numbers at every step."""

    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.at[trainer.global_step] = {
            "model": cpu_copy(pl_module.model.state_dict()), "optimizer": cpu_copy(trainer.optimizers[0].state_dict()),
            "step_ratio": getattr(pl_module, "step_ratio", None),
            "acc": float(metrics["guard/robust_acc"]) if "guard/robust_acc" in metrics else None,
            "collapses": float(metrics["guard/collapses"]) if "guard/collapses" in metrics else None}


@pytest.mark.parametrize("action,max_shrinks", [("stop", 3), ("shrink", 3), ("shrink", 0)])
def test_a_forced_collapse_restores_the_last_good_state_and_acts(action, max_shrinks, robust_weights, tmp_path,
                                                                 caplog):
    module = robust_module(robust_weights)
    guard = OverfitGuard(every_n_steps=1, steps=5, n_images=32, action=action, shrink_factor=0.5,
                         max_shrinks=max_shrinks)
    record = Record()
    with caplog.at_level(logging.WARNING, logger="robust_train.callbacks.overfit_guard"):
        trainer = fit(module, [Destroy(at=3), guard, record], tmp_path, steps=5)
    shrinks = action == "shrink" and max_shrinks > 0
    assert record.at[2]["acc"] == 1.0 and guard.best == 1.0  # premise: a robust model, so a drop can show
    assert record.at[3]["acc"] == 0.0 and record.at[3]["collapses"] == 1 and guard.collapses == 1
    # exactly the state of the last check that passed (step 2), which is not the state of step 1: training moved
    assert_same(record.at[3]["model"], record.at[2]["model"])
    assert_same(record.at[3]["optimizer"], record.at[2]["optimizer"])
    assert not torch.equal(record.at[2]["model"]["head.weight"], record.at[1]["model"]["head.weight"])
    assert int(record.at[3]["optimizer"]["state"][0]["step"]) == 2  # Adam's step count went back too
    assert trainer.should_stop is (not shrinks)
    assert trainer.global_step == (5 if shrinks else 3)
    assert module.step_ratio == (0.625 if shrinks else 1.25) and guard.shrinks == int(shrinks)
    assert record.at[2]["step_ratio"] == 1.25 and record.at[3]["step_ratio"] == module.step_ratio
    if shrinks:  # training went on from the restored weights with the smaller step, and stayed robust
        assert module.training_attack.at(0.1).step_size == pytest.approx(0.0625)
        assert record.at[5]["acc"] == 1.0 and record.at[5]["collapses"] == 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "robust_train.callbacks.overfit_guard"]
    assert "fell to 0.000 at step 3" in line and "best 1.000" in line and "of step 2" in line
    assert ("shrinks the training step by x0.5 (step_ratio 1.25 -> 0.625)" in line) if shrinks \
        else line.endswith("stops training" + (" after 0 shrinks" if action == "shrink" else ""))


def test_a_shrunk_step_and_the_guard_counts_survive_a_resume(robust_weights, tmp_path):
    module = robust_module(robust_weights)
    guard = OverfitGuard(every_n_steps=1, steps=5, n_images=32)
    trainer = fit(module, [Destroy(at=2), guard], tmp_path, steps=3)
    assert module.step_ratio == 0.625 and guard.collapses == guard.shrinks == 1
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    resumed, guard2 = robust_module(robust_weights), OverfitGuard(every_n_steps=1, steps=5, n_images=32)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[guard2])
    trainer.fit(resumed, datamodule=toy_data(), ckpt_path=tmp_path / "run.ckpt")
    assert resumed.step_ratio == 0.625 and resumed.training_attack.at(0.1).step_size == pytest.approx(0.0625)
    assert (guard2.best, guard2.collapses, guard2.shrinks) == (1.0, 1, 1)
    assert OverfitGuard().state_dict() == {}  # a guard that is off adds nothing to checkpoints


def test_a_model_that_does_not_change_raises_no_alarm(robust_weights, tmp_path):
    # lr 1e-30: updates far below float32's resolution of the weights, so the model stays exactly as it is
    module = robust_module(robust_weights, optimizer="sgd", lr=1e-30, momentum=0.0)
    guard = OverfitGuard(every_n_steps=1, steps=5, n_images=32, drop=1e-6, action="stop")
    record = Record()
    trainer = fit(module, [guard, record], tmp_path, steps=4)
    assert_same(cpu_copy(module.model.state_dict()), robust_weights)
    assert guard.collapses == 0 and not trainer.should_stop and trainer.global_step == 4
    # the same weights measure the same accuracy at every check (a fixed seed for the attack's random start)
    assert [record.at[s]["acc"] for s in range(1, 5)] == [1.0] * 4 and record.at[4]["collapses"] == 0


def test_a_guard_that_never_fires_leaves_training_as_without_it(robust_weights, tmp_path):
    """The guard's attack draws random numbers (random starts) from a forked generator: the run's random starts of
    fast FGSM training, hence its weights, are exactly those of a run without the guard."""
    results = []
    for callbacks in ([], [OverfitGuard(every_n_steps=1, steps=5, n_images=32, attack="pgd_madry")]):
        module = robust_module(robust_weights)
        torch.manual_seed(2)
        fit(module, callbacks, tmp_path, steps=4)
        results.append(cpu_copy(module.model.state_dict()))
    assert callbacks[0].best == 1.0 and callbacks[0].collapses == 0
    assert not torch.equal(results[0]["head.weight"], robust_weights["head.weight"])  # premise: it trained
    assert_same(results[1], results[0])


class CountingGuard(OverfitGuard):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checked = []

    def check(self, trainer, pl_module):
        self.checked.append(trainer.global_step)
        return super().check(trainer, pl_module)


def test_checks_run_every_n_optimizer_steps_once_the_warm_up_has_begun(robust_weights, tmp_path):
    # 16 batches an epoch, 2 per optimizer step; ε is 0 up to step 2 (epoch 2/16) and ramps from there
    module = robust_module(robust_weights, eps_warmup_start=0.125, eps_warmup_end=0.5)
    guard = CountingGuard(every_n_steps=2, steps=5, n_images=32)
    trainer = fit(module, [guard], tmp_path, steps=6, accumulate_grad_batches=2)
    assert trainer.global_step == 6 and guard.checked == [4, 6]


class Probe(pl.Callback):
    """Before the guard: puts one layer in eval mode (a model may be half in eval on purpose) and records every
    module's mode and every parameter's .grad; after the guard (`check=True`): compares."""

    def __init__(self, before: Probe | None = None):
        self.before, self.modes, self.grads, self.checked = before, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        model = pl_module.model
        if self.before is None:
            model.body[0].eval()
            self.modes = [m.training for m in model.modules()]
            self.grads = [p.grad.clone() for p in model.parameters()]
            return
        assert [m.training for m in model.modules()] == self.before.modes
        assert self.before.modes[0] and not model.body[0].training  # premise: a mixed mode
        for p, g in zip(model.parameters(), self.before.grads):
            assert torch.equal(p.grad, g)
        self.checked += 1


def test_a_check_leaves_the_model_mode_and_gradients_as_they_were(robust_weights, tmp_path):
    module = robust_module(robust_weights)
    guard = OverfitGuard(every_n_steps=1, steps=5, n_images=32)
    before = Probe()
    after = Probe(before)
    fit(module, [before, guard, after], tmp_path, steps=3)
    assert after.checked == 3 and guard.best == 1.0  # the guard did check, at every step


def test_without_a_validation_set_the_first_training_images_are_held_out(robust_weights, tmp_path):
    module = robust_module(robust_weights)
    guard = OverfitGuard(every_n_steps=1, steps=5, n_images=40, action="stop")
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[guard])
    x, y = toy(256, 0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=16))
    held_x = torch.cat([b[0] for b in guard.held_out])
    assert torch.equal(held_x, x[:40])  # batches 1-3, the third cut to 8 images; checks start at step 3
    assert guard.best == 1.0 and guard.collapses == 0


class FlipInTraining(torch.nn.Module):
    """Negates the logits in train mode: a model that is wrong unless it is judged in eval mode."""

    def forward(self, logits):
        return -logits if self.training else logits


def test_count_correct_attacks_and_classifies_in_eval_mode(robust_weights):
    model = torch.nn.Sequential(robust_module(robust_weights).model, FlipInTraining()).train()
    x, y = toy(32, 1)
    assert count_correct(model, FGSM(0.1), [(x, y), (x[:5], y[:5])]) == (37, 37)
    assert count_correct(model, FGSM(0.1), [(x, 1 - y)]) == (0, 32)
    assert count_correct(model, FGSM(0.5), [(x, y)])[0] < 32  # ε 0.5 crosses the gap between the classes
    assert all(m.training for m in model.modules())


def test_seeded_rng_repeats_its_draws_and_leaves_the_caller_stream_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    draws = []
    for _ in range(2):
        with seeded_rng(torch.device("cpu"), 7):
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], expected)
    assert torch.equal(torch.rand(3), expected)


def test_shrink_step_takes_effect_at_the_next_batch(robust_weights):
    module = robust_module(robust_weights, cls=FGSMTraining, step_ratio=1.0)
    x, y = toy(16, 3)
    module.shrink_step(0.25)
    assert module.step_ratio == 0.25 and module.step_shrink == 0.25
    expected = FGSM(0.1, step_size=0.025)(module.model, x, y)
    assert torch.equal(module.adversarial_batch(x, y, 0.1), expected)
    assert (module.adversarial_batch(x, y, 0.1) - x).abs().max() == pytest.approx(0.025, abs=1e-6)


@pytest.mark.parametrize("options,named", [
    ({"every_n_steps": 0}, "every_n_steps=0 must be an integer ≥ 1, or null to turn the guard off"),
    ({"every_n_steps": -5}, "every_n_steps"),
    ({"every_n_steps": 1, "drop": 0}, "drop"), ({"every_n_steps": 1, "drop": 1.5}, "drop"),
    ({"every_n_steps": 1, "shrink_factor": 1}, "shrink_factor"),
    ({"every_n_steps": 1, "shrink_factor": 0}, "shrink_factor"),
    ({"every_n_steps": 1, "action": "restart"}, "action"), ({"every_n_steps": 1, "attack": "pgdd"}, "pgdd"),
    ({"every_n_steps": 1, "steps": 0}, "steps"), ({"every_n_steps": 1, "n_images": 0}, "n_images"),
    ({"every_n_steps": 1, "max_shrinks": -1}, "max_shrinks"),
    ({"every_n_steps": 2.5}, "every_n_steps"), ({"every_n_steps": "often"}, "every_n_steps"),
])
def test_bad_options_are_refused(options, named):
    with pytest.raises(ConfigError, match=named):
        OverfitGuard(**options)


def test_shrink_needs_a_method_with_a_step_to_shrink(tmp_path):
    module = PGDTraining(**TINY, steps=2)
    with pytest.raises(ConfigError, match="action=shrink needs a method with a step to shrink.*action stop"):
        fit(module, [OverfitGuard(every_n_steps=1)], tmp_path, steps=1)
    fit(module, [OverfitGuard(every_n_steps=None)], tmp_path, steps=1)  # off: no complaint
    fit(module, [OverfitGuard(every_n_steps=1, steps=2, n_images=16, action="stop")], tmp_path, steps=1)


def test_the_cli_refuses_every_n_steps_0_in_one_line(tmp_path):
    res = run("fit", "--recipe", "fgsm_rs", "--overfit_guard.every_n_steps", "0", "--trainer.max_steps", "1",
              env={"ROBUST_TRAIN_OUTPUT": str(tmp_path)})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("robust-train: error:") and "every_n_steps=0" in lines[0], lines[0]
    assert not list(tmp_path.glob("*/*")), list(tmp_path.rglob("*"))  # no run folder left behind


def test_the_single_step_recipes_turn_the_guard_on():
    from pathlib import Path

    import yaml

    for name in ("fgsm_rs", "n_fgsm", "gradalign"):
        recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml").read_text())
        guard = OverfitGuard(**recipe["overfit_guard"])
        assert guard.enabled and guard.action == "shrink", name


def test_the_check_runs_at_its_own_eps_when_given(robust_weights, tmp_path):
    own, default = OverfitGuard(every_n_steps=1, eps=0.05), OverfitGuard(every_n_steps=1)
    fit(robust_module(robust_weights), [own], tmp_path / "own", steps=1)
    fit(robust_module(robust_weights), [default], tmp_path / "default", steps=1)
    assert own.attack.eps == 0.05 and default.attack.eps == TINY["eps"]
    with pytest.raises(ConfigError, match="eps"):
        OverfitGuard(every_n_steps=1, eps=1.5)
