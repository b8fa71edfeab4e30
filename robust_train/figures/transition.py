"""`transition_figure`: one targeted L∞ PGD run (e.g. MNIST 7 -> 9) recorded as frames, each with the CAM of the true
class and of the target, showing the evidence for one fading as the evidence for the other appears."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

from robust_train.attacks.base import check_eps, check_positive, input_gradient, project, steepest_step
from robust_train.figures.base import (RIGHT_COLOR, WRONG_COLOR, cam_overlay, class_name, new_figure, save_png,
                                       show_image)
from robust_train.interpret.cam import all_class_cams
from robust_train.modes import model_mode


def stage_ends(steps: int, stages: int) -> list[int]:
    """Cumulative step counts at the end of each of `stages` near-equal stages of `steps` in all."""
    return [round(k * steps / stages) for k in range(1, stages + 1)]


def targeted_pgd_frames(model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, steps: int,
                        step_size: float, n_frames: int) -> tuple[torch.Tensor, list[int]]:
    """Targeted L∞ PGD from x itself (no random start), descending CE(target) inside the ε-ball around x.

    Returns (frames (n_frames, C, H, W): x, then the iterate after each of n_frames − 1 stages; the step count of
    each frame). The model's mode is restored afterwards.
    """
    frames, frame_steps = [x.detach().clone()], [0]
    x_adv, done = x.detach(), 0
    with model_mode(model, "eval", grad=True):
        for end in stage_ends(steps, n_frames - 1):
            for _ in range(end - done):
                # attack_loss with a target is −CE(target): ascending it drives the prediction to the target.
                grad, _, _ = input_gradient(model, x_adv, target, "ce", target)
                x_adv = project(steepest_step(x_adv, grad, step_size, "linf"), x, eps, "linf").detach()
            done = end
            frames.append(x_adv.clone())
            frame_steps.append(end)
    return torch.cat(frames), frame_steps


def transition_figure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int, eps: float, steps: int,
                      step_size: float | None = None, class_names: Sequence[str] | None = None, n_frames: int = 6,
                      path: str | os.PathLike | None = None) -> tuple[Figure, torch.Tensor]:
    """A targeted L∞ PGD (ε, `steps` steps of `step_size`, default 2.5·ε/steps) taking one image x (1, C, H, W) of
    class y (1,) to class `target`, recorded in `n_frames` frames (the clean image, then after each of n_frames − 1
    equal stages; the ε-ball is always around the original x).

    Layout: 3 rows x n_frames columns: the image, the CAM of the true class, the CAM of the target (each map min-max
    normalised on its own, so colours show *where*, not how much). Titles give the step, the prediction and
    p(target). Saves a PNG to `path` when given.

    Returns (Figure, frames): frames is the (n_frames, C, H, W) tensor of the pictured images, frame 0 being x.
    """
    if x.ndim != 4 or x.shape[0] != 1 or y.numel() != 1:
        raise ValueError(f"expected one image x (1, C, H, W) and y (1,), got {tuple(x.shape)} and {tuple(y.shape)}")
    eps = check_eps(eps)
    steps = int(check_positive("steps", steps))
    if n_frames < 2:
        raise ValueError(f"n_frames={n_frames}: need at least 2 (the clean image and one attacked frame)")
    step_size = 2.5 * eps / steps if step_size is None else float(check_positive("step_size", step_size))
    target_t = torch.full((1,), int(target), dtype=torch.long, device=x.device)
    frames, frame_steps = targeted_pgd_frames(model, x, target_t, eps, steps, step_size, n_frames)

    with model_mode(model, "eval", grad=False):
        maps, logits = all_class_cams(model, frames)
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    true_class, target_name = int(y.reshape(-1)[0]), class_name(int(target), class_names)

    fig, axes = new_figure(3, n_frames)
    for k in range(n_frames):
        show_image(axes[0, k], frames[k])
        axes[1, k].imshow(cam_overlay(frames[k], maps[k, true_class]), interpolation="nearest")
        axes[2, k].imshow(cam_overlay(frames[k], maps[k, int(target)]), interpolation="nearest")
        axes[0, k].set_title(f"step {frame_steps[k]} · pred {class_name(int(pred[k]), class_names)}\n"
                             f"p({target_name})={float(probs[k, int(target)]):.2f}", fontsize=8,
                             color=WRONG_COLOR if int(pred[k]) != true_class else RIGHT_COLOR)
    axes[0, 0].set_ylabel(f"ε={eps:g}", fontsize=8)
    axes[1, 0].set_ylabel(f"CAM {class_name(true_class, class_names)} (true)", fontsize=8)
    axes[2, 0].set_ylabel(f"CAM {target_name} (target)", fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig, frames
