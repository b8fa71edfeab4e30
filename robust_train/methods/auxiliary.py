"""Training the auxiliary models some methods need before their own fit starts (distillation's teacher, ensemble
adversarial training's static models): a plain loop outside Lightning, on the fit's training data."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from robust_train.errors import ConfigError
from robust_train.methods.base import DEFAULT_SPEC, RobustModule
from robust_train.models import create_model

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> scalar


def train_auxiliary(module: RobustModule, arch: str, arch_kwargs: dict | None, loss_fn: Loss, epochs: int,
                    name: str, max_batches: int | None = None) -> nn.Module:
    """A fresh `arch` for the module's data set, trained on the module's device with the module's optimiser settings
    on the attached trainer's training data: `epochs` passes of `loss_fn(logits, y)`, each stopped after
    `max_batches` batches if given, with a progress bar "<name>, epoch e/epochs" on rank 0. Returns it in eval mode.

    Random state: the initialisation and the loader's shuffling draw from the global generators, so the run's random
    stream afterwards depends on this training; callers that must not disturb it seed inside `fork_rng`.
    """
    datamodule = module.trainer.datamodule
    if datamodule is None:
        raise ConfigError(f"{name} is trained on the fit's data module: pass datamodule= to trainer.fit")
    spec = dict(module.hparams.data_spec or DEFAULT_SPEC)
    settings = module.configure_optimizers()
    settings = settings["optimizer"] if isinstance(settings, dict) else settings
    # Whatever grad or inference mode the caller runs under, this loop needs gradients and ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad():
        model = create_model(arch, num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                             mean=spec["mean"], std=spec["std"], **(arch_kwargs or {})).to(module.device)
        optimizer = type(settings)(model.parameters(), **settings.defaults)  # same settings, this model's weights
        model.train()
        loader = datamodule.train_dataloader()
        for epoch in range(epochs):
            for b, (x, y) in enumerate(tqdm(loader, desc=f"{name}, epoch {epoch + 1}/{epochs}", leave=False,
                                            disable=not module.trainer.is_global_zero)):
                if max_batches is not None and b >= max_batches:
                    break
                x, y = x.to(module.device), y.to(module.device)
                loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()
