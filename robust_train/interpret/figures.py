"""Pictures for evaluation reports: what an attack does to the image and to the model's evidence.

A robust-accuracy number says *how often* an attack succeeds; these figures show *what* succeeds. Each picture pairs
an image with its class activation map (CAM, see `robust_train.interpret.cam`) overlaid in a jet colormap, so that a
reader sees both the perturbation and where the model now looks for the class it predicts:

- `attack_gallery`: a grid of images (rows) under growing ε (columns; ε = 0 is the clean image), each shown with the
  CAM of its *predicted* class and titled with that class and its softmax probability, in red when it is wrong.
  A robust model's maps stay on the digit; a brittle one's jump to the noise.
- `transition_figure`: one targeted L∞ PGD run (e.g. MNIST 7 -> 9) recorded as frames, each with the CAM of the true
  class and of the target, showing the evidence for one fading as the evidence for the other appears.
- `figure_to_array`: any of them as an (H, W, 3) uint8 array, to log as an image (e.g. `wandb.Image`).

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never pyplot: nothing global changes (no
backend switch, no figure registry to leak), and no display is needed. PNGs are written atomically (a temporary file
in the same folder, then `os.replace`), so a reader never sees half a picture. The model's mode is left as found:
predictions and CAMs are taken in eval mode under `torch.no_grad`, attacks restore the mode themselves.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable, Iterator, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from robust_train.attacks.base import attack_mode, check_eps, check_positive, input_gradient, project, steepest_step
from robust_train.interpret.cam import all_class_cams

AttackFn = Callable[..., torch.Tensor]  # attack(model, x, y, target=None) -> x_adv
WRONG_COLOR, RIGHT_COLOR = "tab:red", "black"
PANEL_INCHES = 1.9  # side of one image panel
DPI = 100


# ----------------------------------------------------------------------------------------------- overlays
def image_to_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) image in [0, 1], C = 1 or 3 -> (H, W, 3) float array in [0, 1]."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1 or 3, H, W) image, got shape {tuple(image.shape)}")
    rgb = image.detach().float().clamp(0, 1).expand(3, -1, -1)
    return rgb.permute(1, 2, 0).cpu().numpy()


def normalized_cam(cam_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) CAM -> (H, W) array in [0, 1]: bilinear upsampling to `size`, then min-max; a constant map gives 0."""
    if cam_map.ndim != 2:
        raise ValueError(f"expected an (h, w) CAM, got shape {tuple(cam_map.shape)}")
    up = F.interpolate(cam_map.detach().float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = up.min(), up.max()
    span = high - low
    if not torch.isfinite(span) or span <= 0:
        return np.zeros(size, dtype=np.float32)
    return ((up - low) / span).cpu().numpy()


def cam_overlay(image: torch.Tensor, cam_map: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """The image (C, H, W) with its CAM (h, w) upsampled and min-max normalised, in the jet colormap (blue cold, red
    hot), blended at `alpha`: an (H, W, 3) float array in [0, 1]."""
    rgb = image_to_rgb(image)
    heat = matplotlib.colormaps["jet"](normalized_cam(cam_map, rgb.shape[:2]))[..., :3]
    return np.clip((1 - alpha) * rgb + alpha * heat, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients for the duration; every module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def new_figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    """A figure on an Agg canvas with a rows x cols grid of bare image axes (a 2-D array of Axes)."""
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG to `path` atomically: a temporary file in the same folder, then `os.replace`."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with mode 0o666, not tempfile.mkstemp: the PNG gets the umask's permissions, not mkstemp's 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 RGB array, e.g. for `wandb.Image`."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def class_name(index: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[index]) if class_names is not None else str(index)


def show_image(ax, image: torch.Tensor) -> None:
    ax.imshow(image_to_rgb(image), vmin=0.0, vmax=1.0, interpolation="nearest")


# ----------------------------------------------------------------------------------------------- gallery
def predict_with_cams(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted classes (N,), their softmax probabilities (N,), their CAMs (N, h, w)) in eval mode, no grad."""
    with evaluating(model):
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


# ----------------------------------------------------------------------------------------------- transition
def stage_ends(steps: int, stages: int) -> list[int]:
    """Cumulative step counts at the end of each of `stages` near-equal stages of `steps` in all."""
    return [round(k * steps / stages) for k in range(1, stages + 1)]


def targeted_pgd_frames(model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, steps: int,
                        step_size: float, n_frames: int) -> tuple[torch.Tensor, list[int]]:
    """Targeted L∞ PGD from x itself (no random start), descending CE(target) inside the ε-ball around x.

    Returns (frames (n_frames, C, H, W): x, then the iterate after each of n_frames − 1 stages; the step count of
    each frame). The model's mode is restored by `attack_mode`.
    """
    frames, frame_steps = [x.detach().clone()], [0]
    x_adv, done = x.detach(), 0
    with attack_mode(model, "eval"):
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

    with evaluating(model):
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


__all__ = ["attack_gallery", "cam_overlay", "figure_to_array", "transition_figure"]
