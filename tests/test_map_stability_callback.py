"""The MapStability callback: keys and ranges of what it logs during fit, its gallery image, its schedule, inference
mode at validate time, the model's mode, and the CLI's forced `map_stability` section on a tiny run."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger

from robust_train.callbacks import MapStability
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.methods import StandardTraining

REPO = Path(__file__).resolve().parents[1]
EPS, ATTACKS, BATCH = [0.1, 0.3], ["aai", "pgd"], 32
KINDS = ("map_tau", "map_topk", "map_n_used")


class ImageRecorder(Logger):
    """A logger that keeps what it is given, with WandbLogger's `log_image(key, images, step)`."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, list, int | None]] = []
        self.metrics: list[dict] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))


@pytest.fixture(scope="module")
def mnist():
    dm = MNISTData(batch_size=BATCH, val_size=100)
    dm.setup("fit")
    return dm


def callback(**kwargs) -> MapStability:
    return MapStability(**{"every_n_epochs": 1, "eps": EPS, "attacks": ATTACKS, "steps": 3, "max_batches": 1,
                           **kwargs})


def trainer(tmp_path, cb, logger=None, **kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=logger if logger is not None else False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_train_batches=2, limit_val_batches=2, max_epochs=2, inference_mode=False,
                default_root_dir=tmp_path, callbacks=[cb], num_sanity_val_steps=0)
    return pl.Trainer(**{**args, **kwargs})


def keys(stage: str) -> set[str]:
    return {f"{stage}/{kind}/{a}@{e:g}" for kind in KINDS for a in ATTACKS for e in EPS}


def check_values(metrics: dict, stage: str, n_max: int = BATCH) -> None:
    for a in ATTACKS:
        for e in EPS:
            tau = float(metrics[f"{stage}/map_tau/{a}@{e:g}"])
            topk = float(metrics[f"{stage}/map_topk/{a}@{e:g}"])
            n_used = float(metrics[f"{stage}/map_n_used/{a}@{e:g}"])
            assert 0 <= n_used <= n_max and n_used == int(n_used)
            if n_used == 0:
                assert math.isnan(tau) and math.isnan(topk)
            else:
                assert -1 - 1e-9 <= tau <= 1 + 1e-9 and 0 <= topk <= 1


def test_fit_logs_every_attack_and_eps_and_a_gallery(mnist, tmp_path):
    torch.manual_seed(0)
    module, logger = StandardTraining(), ImageRecorder()
    t = trainer(tmp_path, callback(), logger=logger)
    t.fit(module, datamodule=mnist)
    assert keys("val") <= set(t.callback_metrics)
    check_values(t.callback_metrics, "val")
    logged_epochs = [m for m in logger.metrics if "val/map_tau/aai@0.1" in m]
    assert len(logged_epochs) == 2  # every_n_epochs=1, two epochs
    assert len(logger.images) == 2
    key, images, step = logger.images[-1]
    assert key == "val/map_gallery" and step == t.global_step and len(images) == 1
    picture = images[0]
    assert isinstance(picture, np.ndarray) and picture.dtype == np.uint8
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    assert module.training, "Lightning hands the module back in train mode after fit; the callback must not change it"


def test_disabled_logs_nothing(mnist, tmp_path):
    logger = ImageRecorder()
    t = trainer(tmp_path, callback(every_n_epochs=0), logger=logger, max_epochs=1)
    t.fit(StandardTraining(), datamodule=mnist)
    t.validate(t.lightning_module, datamodule=mnist, verbose=False)
    assert not any("map_" in k for k in t.callback_metrics)
    assert not any("map_" in k for m in logger.metrics for k in m) and not logger.images


def test_a_map_smaller_than_topk_is_skipped_with_one_warning(mnist, tmp_path):
    """fast_mnist_cnn's CAM is 1x1: top-8 cannot be taken, and the run must go on rather than fail at epoch 5."""
    logger = ImageRecorder()
    t = trainer(tmp_path, callback(), logger=logger, max_epochs=2)
    with pytest.warns(UserWarning, match="map stability skipped") as warned:
        t.fit(StandardTraining(arch="fast_mnist_cnn"), datamodule=mnist)
    assert len([w for w in warned if "map stability skipped" in str(w.message)]) == 1, "warned once, not per epoch"
    assert t.current_epoch == 2 and not any("map_" in k for k in t.callback_metrics)


def test_schedule_every_n_epochs_and_the_last_epoch(mnist, tmp_path):
    """every_n_epochs=2 over 3 epochs: epoch 2 (index 1) by the schedule, epoch 3 (index 2) as the last one."""
    logger = ImageRecorder()
    t = trainer(tmp_path, callback(every_n_epochs=2, attacks=["pgd"], eps=[0.1], steps=1, log_images=False),
                logger=logger, max_epochs=3, limit_train_batches=1, limit_val_batches=1)
    t.fit(StandardTraining(), datamodule=mnist)
    epochs = [m["epoch"] for m in logger.metrics if "val/map_tau/pgd@0.1" in m]
    assert epochs == [1, 2] and not logger.images  # log_images=False: no gallery


def test_validate_with_inference_mode_and_the_default_eps(mnist, tmp_path):
    torch.manual_seed(0)
    module = StandardTraining(eps=0.2)
    t = trainer(tmp_path, callback(every_n_epochs=5, eps=None), inference_mode=True)
    t.validate(module, datamodule=mnist, verbose=False)
    for a in ATTACKS:  # eps=None: the module's own ε; validate runs whatever the epoch schedule says
        assert f"val/map_tau/{a}@0.2" in t.callback_metrics
    tau = float(t.callback_metrics["val/map_tau/aai@0.2"])
    assert math.isnan(tau) or -1 <= tau <= 1


def test_test_stage_logs_test_keys(mnist, tmp_path):
    module = StandardTraining()
    t = trainer(tmp_path, callback(), limit_test_batches=1, inference_mode=True)
    t.test(module, datamodule=mnist, verbose=False)
    assert keys("test") <= set(t.callback_metrics)
    check_values(t.callback_metrics, "test")


@pytest.mark.parametrize("training", [True, False])
def test_core_method_restores_the_model_mode_and_works_under_inference_mode(mnist, training):
    torch.manual_seed(0)
    model = StandardTraining().model
    model.train(training)
    x, y = next(iter(mnist.val_dataloader()))
    cb = callback()
    with torch.inference_mode():  # as inside Trainer(inference_mode=True): batches are inference tensors
        x_inf, y_inf = x.clone(), y.clone()
        results = cb.stability(model, [(x_inf, y_inf)], EPS)
    assert set(results) == {(a, e) for a in ATTACKS for e in EPS}
    for r in results.values():
        assert r["n_total"] == BATCH and 0 <= r["n_used"] <= BATCH
    assert all(m.training == training for m in model.modules())
    picture = cb.gallery(model, x, y, EPS)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_eps_zero_gives_tau_one(mnist):
    model = StandardTraining().model.eval()
    x, y = next(iter(mnist.val_dataloader()))
    r = callback(attacks=["pgd"]).stability(model, [(x, y)], [0.0])[("pgd", 0.0)]
    assert r["kendall_tau"] == pytest.approx(1.0) and r["n_used"] + r["n_constant"] == BATCH


@pytest.mark.parametrize("kwargs", [{"every_n_epochs": -1}, {"eps": [1.5]}, {"attacks": ["nope"]}, {"attacks": []},
                                    {"steps": 0}, {"max_batches": 0}, {"map": "nope"}, {"topk": 0}])
def test_bad_arguments_fail_at_construction(kwargs):
    with pytest.raises(ConfigError):
        MapStability(**kwargs)


def test_cli_fit_with_map_stability(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
           "ROBUST_TRAIN_OUTPUT": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "robust_train", "fit", "--recipe", "standard", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size",
         "32", "--attack_accuracy.steps", "2", "--map_stability.every_n_epochs", "1", "--map_stability.steps", "2",
         "--map_stability.max_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = list((tmp_path / "standard").iterdir())
    assert (run_dir / "last.ckpt").is_file()
