"""Accuracy under attack at validation and test time, so a run is judged (and its best checkpoint chosen) by
robust accuracy, and `validate`/`test --ckpt_path` report it too."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics.classification import MulticlassAccuracy

from robust_train.attacks.base import check_eps
from robust_train.attacks.registry import create_attack


class AttackAccuracy(pl.Callback):
    """Logs `<stage>/robust_acc` (at the first ε) and `<stage>/robust_acc@<ε>` for every ε.

    Args:
        attack: a registered attack name (`python -m robust_train attacks`; default `pgd`, on cross-entropy).
        eps: budgets to evaluate; None means the training method's own ε.
        steps, restarts: override the preset's (validation runs every epoch, so keep it affordable).
        max_batches: attack only the first N batches of each epoch (None: all; under DDP, of each rank).

    Under DDP each rank attacks its share of the validation images (none repeated: see `ImageDataModule._loader`)
    and the counts are summed, so a deterministic attack (`fgsm`, or PGD without random start) gives exactly the
    single-process accuracy; random starts are drawn per rank, so those agree in distribution only.
    """

    def __init__(self, attack: str = "pgd", eps: list[float] | None = None, steps: int | None = 20,
                 restarts: int | None = 1, max_batches: int | None = None):
        self.attack_name, self.steps, self.restarts, self.max_batches = attack, steps, restarts, max_batches
        self.eps = [check_eps(e) for e in eps] if eps is not None else None
        create_attack(attack, 0.0, steps=steps, restarts=restarts)  # fail at construction, not after an epoch
        self.metrics: dict[float, MulticlassAccuracy] = {}
        self.attacks: dict = {}

    def _budgets(self, pl_module) -> list[float]:
        return self.eps if self.eps is not None else [float(pl_module.eps)]

    def _start(self, pl_module):
        num_classes = pl_module.model.head.out_features
        self.metrics = {e: MulticlassAccuracy(num_classes, average="micro").to(pl_module.device)
                        for e in self._budgets(pl_module)}
        self.attacks = {e: create_attack(self.attack_name, e, steps=self.steps, restarts=self.restarts)
                        for e in self.metrics}

    def _batch(self, pl_module, batch, batch_idx):
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        # Lightning evaluates under no_grad or inference mode; attacks need gradients. Cloning inside
        # inference_mode(False) turns inference tensors into ordinary ones, so this works with either setting.
        with torch.inference_mode(False), torch.enable_grad():
            x, y = (t.clone() for t in batch[:2])
            for eps, metric in self.metrics.items():
                x_adv = self.attacks[eps](pl_module.model, x, y)
                with torch.no_grad():
                    metric.update(pl_module.model(x_adv), y)

    def _end(self, pl_module, stage: str):
        for i, (eps, metric) in enumerate(self.metrics.items()):
            value = metric.compute()  # torchmetrics sums the counts over DDP ranks: every rank holds the global value
            if i == 0:
                pl_module.log(f"{stage}/robust_acc", value, prog_bar=True, sync_dist=True)
            pl_module.log(f"{stage}/robust_acc@{eps:g}", value, sync_dist=True)
            metric.reset()

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._end(pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(pl_module, batch, batch_idx)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end(pl_module, "test")
