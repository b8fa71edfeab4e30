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
"most activated prototypes"); `prototype_sources` fetches the training images the prototypes were pushed from, for
`robust_train.figures.prototype_figure`.
"""
from __future__ import annotations

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret.registry import register_map
from robust_train.models.protopnet import is_prototype_model


def check_prototype_model(model: nn.Module) -> None:
    if not is_prototype_model(model):
        raise ConfigError(f"the 'prototype' maps need a ProtoPNet (arch protopnet, with `similarity_maps`); "
                          f"{type(model).__name__} has no prototypes: use map 'cam' or 'grad_cam'")


def _class_blocks(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """The similarity maps of each image's class's prototypes, (N, M, H, W); prototypes are ordered by class."""
    check_prototype_model(model)
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
    check_prototype_model(model)
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
    check_prototype_model(model)
    out: list[torch.Tensor | None] = []
    for index in model.prototype_image_index.tolist():
        out.append(None if index < 0 else dataset[index][0])
    return out


__all__ = ["prototype_map", "prototype_sources", "top_prototype_map", "top_prototypes"]
