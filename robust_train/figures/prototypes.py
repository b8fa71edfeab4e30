"""`prototype_figure`: the prototypes a ProtoPNet image activates most, clean and attacked, each with its similarity
map over the image and the training patch the prototype was pushed from ("this looks like that")."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from matplotlib.patches import Rectangle
from torch import nn

from robust_train.errors import ConfigError
from robust_train.figures.base import (RIGHT_COLOR, WRONG_COLOR, cam_overlay, class_name, new_figure, save_png,
                                       show_image)
from robust_train.interpret.prototype import check_prototype_model
from robust_train.modes import model_mode


def _patch_box(model: nn.Module, j: int, image_hw: tuple[int, int], latent_hw: tuple[int, int]):
    """(x0, y0, width, height) in image pixels of the latent cell prototype j was pushed from: the cell's share of
    the image (the receptive field's centre region, not the whole receptive field)."""
    h, w = model.prototype_patch_index[j].tolist()
    sy, sx = image_hw[0] / latent_hw[0], image_hw[1] / latent_hw[1]
    return w * sx - 0.5, h * sy - 0.5, sx, sy


def prototype_figure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None,
                     k: int = 3, sources: Sequence[torch.Tensor | None] | None = None,
                     class_names: Sequence[str] | None = None, path: str | os.PathLike | None = None):
    """The top-k prototypes each image activates, for the clean images x (N, C, H, W) with labels y and, when
    given, their adversarial versions x_adv (one row each).

    Row layout: the image (titled with the prediction, red when wrong), then for each of its k most activated
    prototypes the prototype's similarity map over the image (titled "p<j> (class) <score>") and, when `sources`
    (see `prototype_sources`) has the prototype's training image, that image with the pushed cell boxed.
    Predictions and maps in eval mode under no_grad; the model's modes are restored. Saves a PNG to `path`.
    """
    check_prototype_model(model)
    rows = [("clean", x)] + ([("adv", x_adv)] if x_adv is not None else [])
    per_proto = 2 if sources is not None else 1
    fig, axes = new_figure(len(rows) * x.shape[0], 1 + k * per_proto)
    with model_mode(model, "eval", grad=False):
        for r, (label, images) in enumerate(rows):
            sim = model.similarity_maps(images)
            logits = model.logits_from_features(sim)
            if not 0 < k <= sim.shape[1]:
                raise ConfigError(f"k={k} must be between 1 and {sim.shape[1]} (the number of prototypes)")
            scores, indices = sim.amax(dim=(2, 3)).topk(k, dim=1)
            pred = logits.argmax(1)
            classes = model.prototype_classes
            for i in range(images.shape[0]):
                row = axes[i * len(rows) + r]
                show_image(row[0], images[i])
                wrong = bool(pred[i] != y[i])
                row[0].set_title(f"{label} · pred {class_name(int(pred[i]), class_names)}", fontsize=8,
                                 color=WRONG_COLOR if wrong else RIGHT_COLOR)
                row[0].set_ylabel(f"true {class_name(int(y[i]), class_names)}", fontsize=8)
                for t in range(k):
                    j = int(indices[i, t])
                    ax = row[1 + t * per_proto]
                    ax.imshow(cam_overlay(images[i], sim[i, j]), interpolation="nearest")
                    ax.set_title(f"p{j} ({class_name(int(classes[j]), class_names)}) {float(scores[i, t]):.2f}",
                                 fontsize=8)
                    if sources is not None:
                        src_ax = row[2 + t * per_proto]
                        source = sources[j]
                        if source is None:
                            src_ax.set_title("not pushed", fontsize=8)
                            continue
                        show_image(src_ax, source)
                        box = _patch_box(model, j, tuple(source.shape[-2:]), tuple(sim.shape[-2:]))
                        src_ax.add_patch(Rectangle(box[:2], box[2], box[3], fill=False, edgecolor="yellow",
                                                   linewidth=1.5))
                        src_ax.set_title(f"p{j} from train #{int(model.prototype_image_index[j])}", fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig
