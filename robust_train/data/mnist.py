"""MNIST. With no root it reads the copy shipped inside the package (the first 17,435 official training images and
the full official test set), so `fit` works offline; a user with the full data set points `root` at a torchvision
MNIST download."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from robust_train.data.base import ImageDataModule, TensorImageDataset
from robust_train.data.registry import register_data
from robust_train.errors import ConfigError

BUNDLED = Path(__file__).parent / "mnist"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array: two zero bytes, type code 0x08 (uint8), the number of
    dimensions, then each dimension as a big-endian int32, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _bundled(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(BUNDLED / f"{split}-images-idx3-ubyte.gz")
    y = read_idx(BUNDLED / f"{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()


def _torchvision(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root, train=train, download=False)
    except RuntimeError as e:  # torchvision's "Dataset not found"
        raise ConfigError(
            f"MNIST not found under {root} (torchvision expects {root}/MNIST/raw/): "
            f"leave --data.root unset to use the bundled MNIST"
        ) from e
    return ds.data.unsqueeze(1), ds.targets.long()


@register_data("mnist")
class MNISTData(ImageDataModule):
    """MNIST: the bundled 17,435 training images and the official test set, or a torchvision folder (`root`)."""

    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    eps_grid = (0.0, 0.05, 0.1, 0.2, 0.3, 0.35, 0.4)
    class_names = [str(d) for d in range(10)]

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 1000,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__(root, batch_size, val_size, seed, num_workers, pin_memory)
        raw = Path(root).expanduser() / "MNIST" / "raw" if root is not None else None
        if raw is not None and not raw.is_dir():  # fail before the Trainer starts, not after it printed a page
            raise ConfigError(f"MNIST not found under {root} (torchvision expects {raw}/): "
                              "leave --data.root unset to use the bundled MNIST")

    def _make_datasets(self) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
        if self.root is None:
            train, test = _bundled("train"), _bundled("t10k")
            source = f"the bundled MNIST ({BUNDLED})"
        else:
            root = str(Path(self.root).expanduser())
            train, test = _torchvision(root, train=True), _torchvision(root, train=False)
            source = str(Path(root) / "MNIST" / "raw")
        # No augmentation: the usual MNIST adversarial-training recipes (Madry et al., TRADES) use none.
        return self.tensor_datasets(train, test, source=source)
