"""The images a user picks from: the first n test images of the checkpoint's own data set, or a torchvision
ImageFolder, with each image's prediction and the smallest ε of the data set's grid at which PGD-10 breaks it (the
page's "broken at small ε" filter)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robust_train.attacks import create_attack
from robust_train.errors import ConfigError
from robust_train.evaluate.accuracy import predictions


@dataclass
class Gallery:
    x: torch.Tensor  # (N, C, H, W) in [0, 1], on the CPU
    y: torch.Tensor  # (N,)
    source: str
    pred: torch.Tensor | None = None
    broken_eps: torch.Tensor | None = None  # (N,): 0 if misclassified, NaN if PGD-10 breaks it at no grid ε

    def select(self, show: str = "all", cls: int | None = None, small_eps: float = math.inf) -> list[int]:
        keep = torch.ones(len(self.y), dtype=torch.bool)
        if cls is not None:
            keep &= self.y == cls
        if show == "misclassified":
            keep &= self.pred != self.y
        elif show == "fragile":
            keep &= (self.broken_eps > 0) & (self.broken_eps <= small_eps)
        elif show != "all":
            raise ValueError(f"unknown filter {show!r}: use all, misclassified or fragile")
        return keep.nonzero().squeeze(1).tolist()


def checkpoint_images(ckpt: dict, n: int, data_root: str | None) -> Gallery:
    from robust_train.evaluate.evaluation import datamodule_from_checkpoint

    datamodule = datamodule_from_checkpoint(ckpt, data_root)
    x, y = datamodule.test_tensors(n)
    return Gallery(x, y, f"{datamodule.name} test set, first {len(y)} images")


def folder_images(root: str, n: int, spec: dict) -> Gallery:
    """An ImageFolder (one folder per class) resized and converted to the model's input. Folder names that are the
    model's class names map to those classes; otherwise there must be one folder per class, in the model's order."""
    from torchvision import datasets, transforms

    if not Path(root).is_dir():
        raise ConfigError(f"--images {root} is not a folder: give a folder with one subfolder of images per class")
    size = tuple(spec["image_size"])
    steps = [transforms.Resize(size)] + ([transforms.Grayscale()] if spec["in_channels"] == 1 else []) + \
        [transforms.ToTensor()]
    try:
        folder = datasets.ImageFolder(root, transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"--images {root}: {str(e).splitlines()[0]}; put each class's images in a subfolder") \
            from None
    names = list(spec.get("class_names") or [])
    if set(folder.classes) <= set(names):
        to_model = [names.index(c) for c in folder.classes]
    elif len(folder.classes) == spec["num_classes"]:
        to_model = list(range(len(folder.classes)))
    else:
        raise ConfigError(f"--images {root} has {len(folder.classes)} class folders and the model "
                          f"{spec['num_classes']} classes: name the folders after the model's classes "
                          f"({', '.join(names[:10])}...)")
    take = range(min(n, len(folder)))
    pairs = [folder[i] for i in take]
    if not pairs:
        raise ConfigError(f"--images {root} holds no images")
    x = torch.stack([p[0] for p in pairs])
    y = torch.tensor([to_model[p[1]] for p in pairs])
    return Gallery(x, y, f"image folder {root}, first {len(y)} images")


def measure(gallery: Gallery, model: nn.Module, eps_grid: list[float], device, batch_size: int = 250,
            progress: bool = False) -> Gallery:
    """Fill in predictions and, per image, the smallest grid ε at which PGD-10 (α = ε on a cosine) breaks it."""
    x, y = gallery.x.to(device), gallery.y.to(device)
    gallery.pred = predictions(model, x, batch_size).cpu()
    # float64: the grid's ε come back exactly as given (0.1 stays 0.1 in the page's filter and tooltips)
    broken = torch.full(gallery.y.shape, math.nan, dtype=torch.float64).masked_fill(gallery.pred != gallery.y, 0.0)
    grid = sorted(e for e in eps_grid if e > 0)
    if progress:
        from tqdm import tqdm
        grid = tqdm(grid, desc="explore: PGD-10 over the ε grid", leave=False)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(0)  # the same checkpoint always shows the same "broken at small ε" images
        for eps in grid:
            left = broken.isnan().nonzero().squeeze(1)
            for rows in left.split(batch_size):
                attack = create_attack("pgd", eps, steps=10)
                x_adv = attack(model, x[rows.to(device)], y[rows.to(device)])
                wrong = (predictions(model, x_adv, batch_size) != y[rows.to(device)]).cpu()
                broken[rows[wrong]] = eps
    gallery.broken_eps = broken
    return gallery
