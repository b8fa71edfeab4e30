"""CIFAR-10, from a torchvision folder (downloaded when there is network) or from `cifar10_subset.npz`, the real
CIFAR-10 subset kept for offline tests and benchmarks (5,085 training and 1,017 test images)."""
from __future__ import annotations

import tarfile
from pathlib import Path
from urllib.error import URLError

import torch

from robust_train.data.registry import register_data
from robust_train.data.base import ImageDataModule, TensorImageDataset, random_crop_flip
from robust_train.data.validate import read_npz, to_labels, to_uint8_nchw
from robust_train.errors import ConfigError

SUBSET_FILE = "cifar10_subset.npz"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DEFAULT_ROOT = "~/.cache/robust_train/cifar10"
# Fixed by the data set; known here so that `spec` is complete before anything is read.
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@register_data("cifar10")
class CIFAR10Data(ImageDataModule):
    """CIFAR-10 from a torchvision folder, or from a `cifar10_subset.npz` (`root`)."""

    num_classes = 10
    in_channels = 3
    image_size = (32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2471, 0.2435, 0.2616)
    eps_grid = tuple(e / 255 for e in (0, 2, 4, 6, 8, 9, 10))
    class_names = CLASSES

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        download: bool = True,
        augment: bool = True,
    ):
        """root: a torchvision CIFAR-10 folder (default ~/.cache/robust_train/cifar10), a folder holding
        cifar10_subset.npz, or that file itself. val_size: None means 1000 images for the full set and 500 for the
        subset, where 1000 would take a fifth of its 5,085 training images; 500 keeps 90% for training and still
        measures accuracy to about ±2%."""
        super().__init__(root, batch_size, val_size, seed, num_workers, pin_memory)
        self.download = download
        self.augment = augment
        path = Path(root or DEFAULT_ROOT).expanduser()
        npz = path if path.suffix == ".npz" else path / SUBSET_FILE
        self.subset = npz if npz.is_file() else None
        self.folder = str(path)
        if val_size is None:
            self.val_size = 500 if self.subset else 1000

    def _torchvision(self, train: bool, download: bool):
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(self.folder, train=train, download=download)
        except (URLError, OSError, RuntimeError, tarfile.TarError) as e:
            if self.download:
                problem = f"it could not be downloaded (no network?: {type(e).__name__})"
            else:
                problem = "download is off (--data.download false)"
            raise ConfigError(
                f"CIFAR-10 not found under {self.folder} and {problem}: point --data.root at a torchvision "
                f"CIFAR-10 folder or at {SUBSET_FILE}"
            ) from e

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, so only one of them downloads.
        if self.subset is None:
            for train in (True, False):
                self._torchvision(train, self.download)

    def _make_datasets(self) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
        if self.subset is not None:
            train, test = self._load_npz()
        else:
            train, test = [self._load_folder(t) for t in (True, False)]
        source = str(self.subset or self.folder)
        return self.tensor_datasets(train, test, random_crop_flip if self.augment else None, source=source)

    def _load_npz(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """x_train, y_train, x_test, y_test: images (N, 3, 32, 32) as in cifar10_subset.npz, or channels-last
        (N, 32, 32, 3) as torchvision and Keras keep CIFAR-10; uint8, or float in [0, 1] (rounded to x * 255)."""
        source = str(self.subset)
        z = read_npz(self.subset, NPZ_KEYS)
        return tuple(
            (to_uint8_nchw(source, f"x_{split}", z[f"x_{split}"], self.in_channels, self.image_size),
             to_labels(source, f"y_{split}", z[f"y_{split}"]))
            for split in ("train", "test")
        )

    def _load_folder(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._torchvision(train, download=False)  # prepare_data downloaded it if it could
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()
