"""Interpretation maps of ProtoPNet (`robust_train.models.protopnet`), and what a report needs to show which
prototypes an image activates.

A ProtoPNet explains a decision by its prototypes: "this part of the image looks like that prototype". Its maps are
the prototype similarity maps S_j (N, P, H, W) at feature resolution (the official code upsamples them for display
only). For the per-class map that Kendall τ, top-k overlap and AAI need (`fn(model, x, classes) -> (N, H, W)`):

* `prototype` (`prototype_map`): M_c(h, w) = max_{j of class c} S_j(h, w), the best match of any of c's
  prototypes at each cell. Its maximum is the activation of c's most activated prototype (the term the logit
  reads), and it does not jump from one prototype's map to another's when the ranking of c's prototypes changes
  under a small perturbation, which matters for an attack that descends through it. Default for `--map prototype`.
* `prototype_top` (`top_prototype_map`): S_j* for j* the class's most activated prototype (max_hw S_j largest), the
  single map the official local analysis shows first.

Neither is CAM: on a ProtoPNet, `cam` is Σ_j W_cj S_j (see the model's docstring). Both maps are built from the
model's own layers, keep the graph and are differentiable in x (max is differentiable almost everywhere), change
neither the model's mode nor parameter gradients, and raise ConfigError for a model without prototypes.

`top_prototypes(model, x, k)` ranks all prototypes by activation (max_hw S_j, the official local analysis's
"most activated prototypes"); `prototype_sources` fetches the training images the prototypes were pushed from;
`prototype_figure` draws, per image (clean and, when given, adversarial), its top prototypes' similarity maps
over it next to the training patch each prototype was taken from.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret.registry import register_map


def _check(model: nn.Module) -> None:
    if not callable(getattr(model, "similarity_maps", None)) or not hasattr(model, "prototypes_per_class"):
        raise ConfigError(f"the 'prototype' maps need a ProtoPNet (arch protopnet, with `similarity_maps`); "
                          f"{type(model).__name__} has no prototypes: use map 'cam' or 'grad_cam'")


def _class_blocks(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """The similarity maps of each image's class's prototypes, (N, M, H, W); prototypes are ordered by class."""
    _check(model)
    sim = model.similarity_maps(x)
    if classes is None:
        classes = model.logits_from_features(sim).argmax(1)
    n, p, h, w = sim.shape
    m = model.prototypes_per_class
    blocks = sim.view(n, p // m, m, h, w)
    return blocks[torch.arange(n, device=sim.device), classes.to(sim.device)]


@register_map("prototype")
def prototype_map(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Cell-wise max (N, H, W) of the similarity maps of `classes`' prototypes (default: the predicted class) for
    images x in [0, 1]; keeps the graph."""
    return _class_blocks(model, x, classes).amax(dim=1)


@register_map("prototype_top")
def top_prototype_map(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Similarity map (N, H, W) of the most activated prototype of `classes` (default: predicted); keeps the graph
    (the choice of prototype itself is discrete)."""
    blocks = _class_blocks(model, x, classes)
    best = blocks.detach().amax(dim=(2, 3)).argmax(1)
    return blocks[torch.arange(blocks.shape[0], device=blocks.device), best]


def top_prototypes(model: nn.Module, x: torch.Tensor, k: int = 3,
                   classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (N, k), similarity scores (N, k)) of the k most activated prototypes of each image, best first;
    with `classes`, only among those classes' prototypes (indices are still global prototype indices).
    No gradients; the model's mode is left as it is (call it in eval mode for a report)."""
    _check(model)
    with torch.no_grad():
        scores = model.similarity_maps(x).amax(dim=(2, 3))  # (N, P)
        if classes is not None:
            own = model.prototype_class_identity.t()[classes.to(scores.device)].bool()  # (N, P)
            scores = scores.masked_fill(~own, float("-inf"))
            k_max = model.prototypes_per_class
        else:
            k_max = scores.shape[1]
        if not 0 < k <= k_max:
            raise ConfigError(f"k={k} must be between 1 and {k_max} (the prototypes to choose from)")
        values, indices = scores.topk(k, dim=1)
    return indices, values


def prototype_sources(model: nn.Module, dataset) -> list[torch.Tensor | None]:
    """For each prototype, the (C, H, W) training image its last push took it from (`dataset` must be the
    un-augmented training set the push ran over, e.g. `PrototypePush.dataset_for(datamodule)`), or None when the
    prototype was never pushed."""
    _check(model)
    out: list[torch.Tensor | None] = []
    for index in model.prototype_image_index.tolist():
        out.append(None if index < 0 else dataset[index][0])
    return out


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
    from matplotlib.patches import Rectangle

    from robust_train.interpret.figures import (RIGHT_COLOR, WRONG_COLOR, cam_overlay, class_name, evaluating,
                                                new_figure, save_png, show_image)

    _check(model)
    rows = [("clean", x)] + ([("adv", x_adv)] if x_adv is not None else [])
    per_proto = 2 if sources is not None else 1
    fig, axes = new_figure(len(rows) * x.shape[0], 1 + k * per_proto)
    with evaluating(model):
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


__all__ = ["prototype_figure", "prototype_map", "prototype_sources", "top_prototype_map", "top_prototypes"]
