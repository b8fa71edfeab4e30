"""Callbacks that break a run on purpose, for tests/test_faults.py (given to the CLI as --trainer.callbacks+=...)."""
from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch


class KillAt(pl.Callback):
    """SIGKILL this process (no cleanup, no exception handler) before training batch number `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAt(pl.Callback):
    """Set one weight to NaN before training batch number `step`, so that the loss becomes NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")

