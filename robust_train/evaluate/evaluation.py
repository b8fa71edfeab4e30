"""What the report sections share: the options, the checkpoint's model and test images, the ε grid and its main ε,
this process's share of the work, and what earlier sections left for later ones (`results`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.distributed import Split
from robust_train.errors import ConfigError
from robust_train.evaluate.accuracy import predictions
from robust_train.evaluate.options import EvaluateOptions

# The data set's usual budget, for a checkpoint trained at ε = 0 evaluated on a grid without a positive ε.
USUAL_EPS = {"mnist": 0.3, "cifar10": 8 / 255}


def main_eps(info: dict, grid: Sequence[float]) -> float:
    """The one ε of the parts that run at a single budget (masking checks, transfer, the transition picture): the
    training ε when positive, else the middle of the grid's positive values, else the data set's usual one."""
    train = float(info.get("eps") or 0)
    if train > 0:
        return train
    positive = sorted(e for e in grid if e > 0)
    if positive:
        return positive[len(positive) // 2]
    return USUAL_EPS.get(info["data_spec"].get("name"), 0.3)


def datamodule_from_checkpoint(ckpt: dict, data_root: str | None = None):
    """The data module a checkpoint was trained with (its saved class and options), `root` replaced by data_root."""
    from robust_train.data import DATA  # Lightning: seconds to import, so not before a bad option has been refused

    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    by_class = {DATA.get(name).__name__: DATA.get(name) for name in DATA.names()}
    class_name = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    spec_name = ckpt["robust_train"]["data_spec"].get("name", "")
    cls = by_class.get(class_name) or (DATA.get(spec_name) if spec_name in DATA else None)
    if cls is None:
        raise ConfigError(f"cannot tell which data set checkpoint was trained on ({class_name or 'unknown'}); "
                          f"known: {', '.join(DATA.names())}")
    kwargs = {k: v for k, v in saved.items() if not k.startswith("_")}
    if data_root is not None:
        kwargs["root"] = data_root
    return cls(**kwargs)


def has_feature_map(model: nn.Module) -> bool:
    """Whether the model keeps the Classifier contract that maps need: `features`, a linear `head` after GAP."""
    return (callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Linear)
            and callable(getattr(model, "logits_from_features", None)))


@dataclass
class Evaluation:
    options: EvaluateOptions
    ckpt: dict
    model: nn.Module
    device: torch.device | str
    datamodule: object
    x: torch.Tensor
    y: torch.Tensor
    clean: torch.Tensor  # per example: correct on the clean image
    grid: list[float]
    split: Split
    notes: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)  # what a section leaves for later ones, e.g. "worst_by_eps"

    @classmethod
    def load(cls, options: EvaluateOptions, split: Split | None = None, device=None) -> "Evaluation":
        """Read the checkpoint and the first `options.n` test images onto the device."""
        ckpt = read_checkpoint(options.ckpt)
        info = ckpt["robust_train"]
        device = device or options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = classifier_from_checkpoint(ckpt).to(device)
        grid = list(options.eps if options.eps is not None else info["data_spec"].get("eps_grid") or [info["eps"]])
        datamodule = datamodule_from_checkpoint(ckpt, options.data_root)
        x, y = datamodule.test_tensors(options.n)
        x, y = x.to(device), y.to(device)
        clean = predictions(model, x, options.batch_size) == y
        return cls(options, ckpt, model, device, datamodule, x, y, clean, grid, split or Split())

    @property
    def info(self) -> dict:
        return self.ckpt["robust_train"]

    @property
    def main_eps(self) -> float:
        return main_eps(self.info, self.grid)

    @property
    def has_maps(self) -> bool:
        return has_feature_map(self.model)

    @property
    def progress(self) -> bool:
        return self.options.progress and self.split.main

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
