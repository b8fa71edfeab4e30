"""The learning-rate schedules come from torch's schedulers, stepped once per batch, with the shapes they promise."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from robust_train.errors import ConfigError
from robust_train.methods import StandardTraining
from tests.conftest import quiet_trainer


class RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def lrs_over_training(tmp_path, steps: int = 50, **kwargs) -> list[float]:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(steps * 4, 1, 28, 28), torch.randint(0, 10, (steps * 4,)))
    module = StandardTraining(arch="fast_mnist_cnn", lr=0.01, **kwargs)
    record = RecordLR()
    quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[record]).fit(
        module, train_dataloaders=DataLoader(data, batch_size=4))
    return record.lrs


def test_onecycle_rises_to_lr_at_the_peak_then_falls_to_almost_zero(tmp_path):
    lrs = lrs_over_training(tmp_path, lr_schedule="onecycle", lr_peak_at=0.4)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(0.01 / 25) and lrs[peak] == pytest.approx(0.01)
    assert abs(peak - 0.4 * 50) <= 1 and lrs[-1] < 0.01 / 25
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])), "linear rise"
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1:])), "linear fall"


def test_cyclic_makes_triangles_from_zero(tmp_path):
    lrs = lrs_over_training(tmp_path, lr_schedule="cyclic", lr_cycles=2, lr_peak_at=0.5)
    assert lrs[0] == 0.0
    assert lrs[12] == pytest.approx(0.01) and lrs[37] == pytest.approx(0.01), "peaks at 1/4 and 3/4 of training"
    assert lrs[25] == pytest.approx(0.0, abs=1e-12), "back to 0 between the cycles"


def test_cosine_decays_to_zero(tmp_path):
    lrs = lrs_over_training(tmp_path, lr_schedule="cosine")
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] < 1e-4
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("bad", [dict(lr_schedule="triangle"), dict(lr_peak_at=0.0), dict(lr_peak_at=1.0),
                                 dict(lr_cycles=0), dict(lr=float("nan")), dict(lr=-1.0), dict(lr=float("inf"))])
def test_bad_schedules_are_refused_at_construction(bad):
    with pytest.raises(ConfigError):
        StandardTraining(**bad)
