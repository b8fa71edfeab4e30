"""ProtoPNet's prototype push (Chen et al., NeurIPS 2019; official `push.py::push_prototypes`, methods.md §1.4):
replace every prototype by the latent patch, among all cells of all training images *of its own class*, that is
closest to it, so that each prototype is literally a part of a training image ("this looks like that").

As officially: the model in eval mode, no gradients, class-specific, over the **un-augmented** training images
(the data module's training set with its augmentation bypassed: a `TensorImageDataset`'s `augment` is dropped,
an image folder's training view is given the module's `eval_transform`; MNISTData has none to bypass). Images stay
in [0, 1]: the model normalises them itself. Where each prototype came from (index into that un-augmented training
set, latent cell (h, w)) is written into the model's `prototype_image_index` / `prototype_patch_index` buffers,
so the checkpoint carries it and a report can draw the source patches (`robust_train.interpret.prototype`).
The receptive-field boxes and 95th-percentile crops the official code also saves are not computed.

When the push runs: with `epochs=None` (default) at the end of every training epoch for which the LightningModule's
`push_due(epoch)` says so (`ProtoPNetTraining`'s schedule, which also puts its last-layer epochs right after each
push); with a list, at the end of those (0-based) epochs. It runs in `on_train_epoch_end`, i.e. after that epoch's
validation. Under DDP every process pushes over the whole set and gets the same prototypes.
"""
from __future__ import annotations

import copy
from typing import Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from robust_train.attacks.base import check_positive
from robust_train.data.base import TensorImageDataset, collate
from robust_train.errors import ConfigError
from robust_train.models.protopnet import is_prototype_model
from robust_train.modes import model_mode


def without_augmentation(dataset: Dataset, datamodule=None) -> Dataset:
    """A view of `dataset` with its training augmentation bypassed (see the module docstring); the images and their
    order are the same, so indices into it are indices into the training set."""
    if isinstance(dataset, Subset):
        return Subset(without_augmentation(dataset.dataset, datamodule), dataset.indices)
    if isinstance(dataset, TensorImageDataset):
        if dataset.augment is None:
            return dataset
        plain = copy.copy(dataset)
        plain.augment = None
        return plain
    eval_transform = getattr(datamodule, "eval_transform", None)
    if eval_transform is not None and hasattr(dataset, "transform"):
        plain = copy.copy(dataset)
        plain.transform = eval_transform
        return plain
    if getattr(datamodule, "augment", False):
        rank_zero_warn(f"PrototypePush: cannot bypass the augmentation of a {type(dataset).__name__}; pushing onto "
                       "augmented images")
    return dataset


@torch.no_grad()
def push_prototypes(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str | None = None) -> dict:
    """Project every prototype of `model` (a ProtoPNet) onto its nearest latent cell among the images of its class
    in `batches` ((x, y) pairs, x in [0, 1], in the dataset's order, so the k-th image overall is index k).

    Returns {"distance": (P,) squared distance before the push (inf: no image of the class), "image_index": (P,),
    "patch_index": (P, 2)}; prototypes without an image of their class are left unchanged (index −1). The model's
    modes are restored; eval mode during the push.
    """
    if not is_prototype_model(model):
        raise ConfigError(f"prototype push needs a ProtoPNet (arch protopnet); got {type(model).__name__}")
    protos = model.prototype_vectors
    device = device if device is not None else protos.device
    n_protos, dim = protos.shape[:2]
    if protos.shape[2:] != (1, 1):
        raise ConfigError("prototype push supports 1×1 prototypes only")
    classes = model.prototype_classes.to(device)
    best_d = torch.full((n_protos,), float("inf"), device=device)
    best_vec = protos.detach().flatten(1).clone().to(device)
    best_img = torch.full((n_protos,), -1, dtype=torch.long, device=device)
    best_hw = torch.full((n_protos, 2), -1, dtype=torch.long, device=device)
    with model_mode(model, "eval", grad=False):
        seen = 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            z = model.latent_features(x)  # (N, D, H, W)
            d = model.distances_from_latent(z)  # (N, P, H, W)
            n, _, h, w = d.shape
            own = y[:, None] == classes[None, :]  # (N, P)
            d = d.masked_fill(~own[:, :, None, None], float("inf"))
            flat = d.permute(1, 0, 2, 3).reshape(n_protos, n * h * w)
            dist, where = flat.min(dim=1)
            better = dist < best_d
            if better.any():
                cells = z.permute(0, 2, 3, 1).reshape(n * h * w, dim)[where]  # (P, D)
                best_d = torch.where(better, dist, best_d)
                best_vec = torch.where(better[:, None], cells, best_vec)
                img, rest = where // (h * w), where % (h * w)
                best_img = torch.where(better, seen + img, best_img)
                best_hw = torch.where(better[:, None], torch.stack([rest // w, rest % w], 1), best_hw)
            seen += n
        pushed = best_img >= 0
        protos.data[pushed] = best_vec[pushed].view(-1, dim, 1, 1).to(protos.device, protos.dtype)
        model.prototype_image_index[pushed] = best_img[pushed].to(model.prototype_image_index.device)
        model.prototype_patch_index[pushed] = best_hw[pushed].to(model.prototype_patch_index.device)
    return {"distance": best_d.cpu(), "image_index": best_img.cpu(), "patch_index": best_hw.cpu()}


class PrototypePush(pl.Callback):
    """Pushes the prototypes of `pl_module.model` at the end of the scheduled training epochs (module docstring).

    Args:
        epochs: 0-based epochs after which to push; None follows the module's `push_due(epoch)`.
        batch_size: images per forward pass (None: the data module's batch size, else 128; official 75).
        max_batches: push over only the first N batches of the un-augmented training set (None: all of it;
            for quick tests, not for training).
    """

    def __init__(self, epochs: list[int] | None = None, batch_size: int | None = None,
                 max_batches: int | None = None):
        self.epochs = None if epochs is None else sorted({int(e) for e in epochs})
        if self.epochs is not None and any(e < 0 for e in self.epochs):
            raise ConfigError(f"epochs={epochs}: push epochs are 0-based and must be >= 0")
        self.batch_size = None if batch_size is None else int(check_positive("batch_size", batch_size))
        self.max_batches = None if max_batches is None else int(check_positive("max_batches", max_batches))
        self.last_push: dict | None = None  # the last push's result, with "epoch"

    @staticmethod
    def dataset_for(datamodule) -> Dataset:
        """The un-augmented training set of a data module (what push runs over, and what image indices index)."""
        datamodule.setup("fit")
        return without_augmentation(datamodule.train_set, datamodule)

    def due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        epoch = trainer.current_epoch
        if self.epochs is not None:
            return epoch in self.epochs
        push_due = getattr(pl_module, "push_due", None)
        if not callable(push_due):
            raise ConfigError(f"PrototypePush(epochs=None) follows the training method's push schedule, but "
                              f"{type(pl_module).__name__} has none: give epochs=[...] or use ProtoPNetTraining")
        return bool(push_due(epoch))

    def loader(self, trainer: pl.Trainer) -> DataLoader:
        dm = trainer.datamodule
        if dm is not None and getattr(dm, "train_set", None) is not None:
            dataset = self.dataset_for(dm)
        else:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            if dataset is None:
                raise ConfigError("PrototypePush needs the training images: fit with a data module (or a single "
                                  "DataLoader over a dataset)")
            dataset = without_augmentation(dataset, dm)
        batch_size = self.batch_size or getattr(dm, "batch_size", None) or 128
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                          num_workers=getattr(dm, "num_workers", 0) or 0)

    def batches(self, trainer: pl.Trainer):
        for i, batch in enumerate(self.loader(trainer)):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield batch[0], batch[1]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer, pl_module):
            return
        result = push_prototypes(pl_module.model, self.batches(trainer), pl_module.device)
        missing = int((result["image_index"] < 0).sum())
        if missing:
            rank_zero_warn(f"PrototypePush: {missing} prototypes had no training image of their class and were "
                           "left unchanged")
        finite = result["distance"][torch.isfinite(result["distance"])]
        moved = float(finite.sqrt().mean()) if len(finite) else float("nan")
        pl_module.log("train/push_distance", moved, on_step=False, on_epoch=True)
        rank_zero_info(f"Prototype push after epoch {trainer.current_epoch}: mean distance moved {moved:.4f}")
        self.last_push = {"epoch": trainer.current_epoch, **result}
