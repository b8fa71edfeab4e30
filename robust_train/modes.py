"""Switching a model's train/eval mode for a while and handing it back exactly as it was found.

Attacks, maps, pictures and the prototype push all run a model in a mode of their own choosing; the user's model
must come back with every module's `.training` flag as it was (a model may be half in eval mode on purpose, e.g.
frozen BatchNorm layers), and, when the borrowed mode is "train", with its BatchNorm running statistics untouched.
This module sits below `attacks/` and `interpret/`, so both may use it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import nn

from robust_train.errors import ConfigError

Mode = Literal["eval", "train"]


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: Mode = "eval", grad: bool | None = None) -> Iterator[None]:
    """Run the block with `model` in `mode` and restore every module's mode afterwards.

    grad: True enables gradients for the block (an attack inside `no_grad` validation), False disables them
    (a forward pass for a picture), None leaves the current setting. In "train" mode BatchNorm layers use batch
    statistics; their running statistics are saved and put back, so the forward passes of an attack do not pollute
    them (fast_adversarial's train-mode attack does pollute them).
    """
    if mode not in ("eval", "train"):
        raise ConfigError(f"bn_mode={mode!r}: use 'eval' or 'train'")
    modes = [(m, m.training) for m in model.modules()]
    saved_stats = []
    if mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved_stats.append((m, [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]))
    model.train(mode == "train")
    grad_context = contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad)
    try:
        with grad_context:
            yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, (mean, var, count) in saved_stats:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
