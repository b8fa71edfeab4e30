"""What every report picture shares: an image and its map as an overlay, a grid of bare axes on an Agg canvas, and
atomic PNG writing.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never pyplot: nothing global changes (no
backend switch, no figure registry to leak), and no display is needed. PNGs are written atomically (a temporary file
in the same folder, then `os.replace`), so a reader never sees half a picture.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WRONG_COLOR, RIGHT_COLOR = "tab:red", "black"
PANEL_INCHES = 1.9  # side of one image panel
DPI = 100


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
