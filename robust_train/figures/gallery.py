"""`attack_gallery`: a grid of images (rows) under growing ε (columns; ε = 0 is the clean image), each shown with the
CAM of its *predicted* class (`robust_train.interpret.cam`) in a jet overlay and titled with that class and its
softmax probability, in red when it is wrong. A robust model's maps stay on the object; a brittle one's jump to the
noise. The model's mode is left as found: predictions and CAMs are taken in eval mode under `torch.no_grad`, attacks
restore the mode themselves.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

from robust_train.figures.base import (RIGHT_COLOR, WRONG_COLOR, cam_overlay, class_name, new_figure, save_png,
                                       show_image)
from robust_train.interpret.cam import all_class_cams
from robust_train.modes import model_mode

AttackFn = Callable[..., torch.Tensor]  # attack(model, x, y, target=None) -> x_adv


def predict_with_cams(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted classes (N,), their softmax probabilities (N,), their CAMs (N, h, w)) in eval mode, no grad."""
    with model_mode(model, "eval", grad=False):
        maps, logits = all_class_cams(model, x)
        probs, pred = logits.softmax(1).max(1)
        return pred, probs, maps[torch.arange(len(pred), device=pred.device), pred]


def attack_gallery(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float],
                   attack_for_eps: Callable[[float], AttackFn], class_names: Sequence[str] | None = None,
                   path: str | os.PathLike | None = None) -> Figure:
    """Images x (N, C, H, W) in [0, 1] with labels y (N,) under each ε of `eps_list` (ε = 0: the clean image).

    Layout: 2N rows x len(eps_list) columns; row 2i shows image i (attacked by `attack_for_eps(ε)`), row 2i + 1 the
    CAM of its predicted class over it. Titles read "ε=0.3 · pred 7 (0.98)", in red when the prediction is wrong.
    Saves a PNG to `path` when given; returns the Figure.
    """
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    fig, axes = new_figure(2 * x.shape[0], len(eps_list))
    for col, eps in enumerate(eps_list):
        x_eps = x if eps == 0 else attack_for_eps(eps)(model, x, y)
        pred, prob, cams = predict_with_cams(model, x_eps)
        for i in range(x.shape[0]):
            image_ax, cam_ax = axes[2 * i, col], axes[2 * i + 1, col]
            show_image(image_ax, x_eps[i])
            cam_ax.imshow(cam_overlay(x_eps[i], cams[i]), interpolation="nearest")
            wrong = bool(pred[i] != y[i])
            image_ax.set_title(f"ε={eps:g} · pred {class_name(int(pred[i]), class_names)} ({float(prob[i]):.2f})",
                               fontsize=8, color=WRONG_COLOR if wrong else RIGHT_COLOR)
            if col == 0:
                image_ax.set_ylabel(f"true {class_name(int(y[i]), class_names)}", fontsize=8)
                cam_ax.set_ylabel("CAM of pred", fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig
