"""Ensemble adversarial training (methods.md §7): the uniform source draw, frozen static models outside the module,
static sources independent of the trained weights, the ½(clean + adv) loss, self-trained static models written once
and reused, path + SHA-256 in the checkpoint, and the recipe. Static models train on 2 batches here."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robust_train.attacks import FGSM
from robust_train.errors import ConfigError
from robust_train.methods import METHODS
from robust_train.methods.distillation import file_sha256
from robust_train.methods.ensemble_adv import EnsembleAdvTraining
from tests.conftest import quiet_trainer

TINY_STATIC = {"static_epochs": 1, "static_max_batches": 2}


def chi2(draws: list[int], k: int) -> float:
    counts = torch.bincount(torch.tensor(draws), minlength=k).double()
    expected = len(draws) / k
    return float(((counts - expected) ** 2 / expected).sum())


def test_registered_under_its_class_name():
    assert METHODS.get("EnsembleAdvTraining") is EnsembleAdvTraining


@pytest.mark.parametrize("static", [None, ["a.ckpt", "b.ckpt", "c.ckpt", "d.ckpt"]])
def test_the_source_is_uniform_over_the_static_models_and_the_current_one(static):
    module = EnsembleAdvTraining(static_checkpoints=static)  # checkpoints are only read at fit start
    k = module.num_sources
    assert k == (3 if static is None else 5)
    draws = [module.draw_source() for _ in range(10_000)]
    assert set(draws) == set(range(k))
    # χ² critical values at p = 0.001 for k − 1 = 2 and 4 degrees of freedom: a fair sampler fails 1 time in 1000.
    assert chi2(draws, k) < {3: 13.816, 5: 18.467}[k]
    again = EnsembleAdvTraining(static_checkpoints=static)
    assert [again.draw_source() for _ in range(50)] == draws[:50]  # seeded per module: reproducible
    other = EnsembleAdvTraining(static_checkpoints=static, source_seed=1)
    assert [other.draw_source() for _ in range(50)] != draws[:50]


@pytest.mark.parametrize("bad", [{"attack": "pgd"}, {"attack": "rand_fgsm", "rand_alpha": 0.5},
                                 {"static_epochs": 0}, {"static_max_batches": 0}, {"static_archs": []},
                                 {"static_archs": [{"arch": 3}]}, {"static_archs": [{"name": "small_cnn"}]}])
def test_bad_arguments_are_config_errors(bad):
    with pytest.raises(ConfigError):
        EnsembleAdvTraining(**bad)


def fit(root, batches=3, **kwargs):
    from robust_train.data import MNISTData

    torch.manual_seed(0)
    module = EnsembleAdvTraining(**{"static_dir": str(root / "static"), **TINY_STATIC, **kwargs})
    trainer = quiet_trainer(root, max_epochs=1, limit_train_batches=batches, limit_val_batches=0)
    trainer.fit(module, datamodule=MNISTData(batch_size=32))
    return module, trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble_adv")
    module, trainer = fit(root)
    return root, module, trainer


@pytest.fixture(scope="module")
def batch():
    from robust_train.data import MNISTData
    return MNISTData().test_tensors(32)


def static_files(root: Path) -> list[Path]:
    return sorted((root / "static").glob("static*.ckpt"))


def test_self_trained_static_models_are_two_different_architectures(fitted):
    root, module, _ = fitted
    files = static_files(root)
    assert len(files) == 2 and len(module.static_models) == 2
    infos = [torch.load(f, weights_only=True)["robust_train"] for f in files]
    assert infos[0]["arch_kwargs"] != infos[1]["arch_kwargs"]
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in module.static_models]
    assert shapes[0] != shapes[1]


def test_static_files_are_classifier_checkpoints_with_their_training_record(fitted):
    import robust_train
    from robust_train.methods.base import DEFAULT_SPEC
    root, module, _ = fitted
    x = torch.rand(4, 1, 28, 28)
    for i, (path, static) in enumerate(zip(static_files(root), module.static_models)):
        ckpt = torch.load(path, weights_only=True)
        assert set(ckpt) == {"robust_train", "state_dict"}
        assert ckpt["robust_train"] == {"format": 1, "method": "EnsembleStaticModel", "arch": "small_cnn",
                                        "arch_kwargs": module.static_archs[i]["arch_kwargs"],
                                        "data_spec": DEFAULT_SPEC, "eps": 0.0, "static": module._static_record(i)}
        with torch.no_grad():
            assert torch.equal(robust_train.load(path)(x), static.cpu()(x))


def test_static_models_are_frozen_in_eval_mode_and_outside_the_module(fitted):
    _, module, trainer = fitted
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    module_tensors = {id(t) for t in module.state_dict(keep_vars=True).values()}
    for static in module.static_models:
        assert not static.training and all(not m.training for m in static.modules())
        assert all(not p.requires_grad for p in static.parameters())
        assert all(p.device == module.device for p in static.parameters())
        assert optimised.isdisjoint(id(p) for p in static.parameters())
        assert module_tensors.isdisjoint(id(t) for t in static.state_dict(keep_vars=True).values())
    assert all(k.startswith(("model.", "train_acc", "val_acc", "test_acc")) for k in module.state_dict())
    assert set(dict(module.named_parameters())) == {f"model.{k}" for k, _ in module.model.named_parameters()}


def test_static_parameters_are_bit_identical_after_training_steps(fitted):
    root, module, trainer = fitted
    assert trainer.global_step == 3
    for path, static in zip(static_files(root), module.static_models):  # files are written before any step
        saved = torch.load(path, weights_only=True)["state_dict"]
        for name, p in static.state_dict().items():
            assert torch.equal(saved[f"model.{name}"], p.cpu())


def test_adversarial_examples_of_a_static_source_ignore_the_trained_weights(fitted, batch):
    _, module, _ = fitted
    x, _ = batch
    current = module.num_sources - 1
    static_before, current_before = module.craft(0, x, 0.3), module.craft(current, x, 0.3)
    saved = {k: v.clone() for k, v in module.model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(module.craft(0, x, 0.3), static_before)
        assert not torch.equal(module.craft(current, x, 0.3), current_before)  # the check can see a change
    finally:
        module.model.load_state_dict(saved)


def test_each_source_attacks_its_own_predicted_labels(fitted, batch):
    _, module, _ = fitted
    x, _ = batch
    sources = [*module.static_models, module.model]
    training = module.model.training
    try:
        for i, source in enumerate(sources):
            with torch.no_grad():
                y_hat = source.eval()(x).argmax(1)
            assert torch.equal(module.craft(i, x, 0.3), FGSM(0.3)(source, x, y_hat))
    finally:
        module.model.train(training)


def test_adversarial_batch_uses_the_drawn_source_and_the_loss_is_half_clean_plus_adv(fitted, batch):
    _, module, _ = fitted
    x, y = batch
    state = module.source_generator.get_state()
    x_adv = module.adversarial_batch(x, y, 0.3)
    module.source_generator.set_state(state)
    source = module.draw_source()
    assert module.last_source == source and torch.equal(x_adv, module.craft(source, x, 0.3))
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and not torch.equal(x_adv, x)
    loss, _ = module.training_loss(x, y, x_adv)
    expected = 0.5 * (F.cross_entropy(module.model(x), y) + F.cross_entropy(module.model(x_adv), y))
    assert torch.equal(loss, expected)


def test_rand_fgsm_stays_in_the_ball(fitted, batch):
    _, module, _ = fitted
    x, _ = batch
    rand = EnsembleAdvTraining(attack="rand_fgsm")  # the attack is built with the module: borrow the static models
    object.__setattr__(rand, "static_models", module.static_models)
    x_adv = rand.craft(0, x, 0.3)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, module.craft(0, x, 0.3))


def test_the_drawn_source_is_logged(fitted):
    _, module, trainer = fitted
    assert 0 <= trainer.callback_metrics["train/source"] < module.num_sources


def test_the_checkpoint_references_the_static_models_by_path_and_hash(fitted):
    import robust_train
    root, _, trainer = fitted
    trainer.save_checkpoint(root / "ensemble.ckpt")
    ckpt = torch.load(root / "ensemble.ckpt", weights_only=True)
    refs = ckpt["robust_train"]["static_models"]
    assert [r["path"] for r in refs] == [str(p.resolve()) for p in static_files(root)]
    assert [r["sha256"] for r in refs] == [file_sha256(p) for p in static_files(root)]
    assert all(k.startswith(("model.", "train_acc", "val_acc", "test_acc")) for k in ckpt["state_dict"])
    robust_train.load(root / "ensemble.ckpt")  # the trained model alone, as for every method


def test_self_trained_static_models_are_reused(fitted):
    root, module, _ = fitted
    mtimes = [os.stat(p).st_mtime_ns for p in static_files(root)]
    again, _ = fit(root, batches=1)
    assert [os.stat(p).st_mtime_ns for p in static_files(root)] == mtimes and len(mtimes) == 2
    for a, b in zip(again.static_models, module.static_models):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_named_static_checkpoints_are_loaded_frozen_and_referenced(fitted, tmp_path):
    root, _, _ = fitted
    files = static_files(root)
    module, _ = fit(tmp_path, batches=1, static_checkpoints=[str(f) for f in files])
    assert not (tmp_path / "static").exists()  # nothing trained
    assert [r["path"] for r in module.static_refs] == [str(f.resolve()) for f in files]
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in module.static_models)


def test_a_missing_static_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        fit(tmp_path, batches=1, static_checkpoints=[str(tmp_path / "missing.ckpt")])


def test_the_recipe_parses():
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "robust_train", "fit", "--recipe", "ensemble_adv", "--print_config"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: robust_train.methods.EnsembleAdvTraining" in out.stdout
