"""Any data set laid out for torchvision's ImageFolder (CUB-200, an ImageNet subset, your own): `root/train/<class>/*`
and optionally `root/test/<class>/*` (or `root/val/`). Images are decoded from disk per sample, so use num_workers."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from robust_train.data.registry import register_data
from robust_train.data.base import ImageDataModule
from robust_train.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_data("imagefolder")
class ImageFolderData(ImageDataModule):
    """Any ImageFolder tree (`root/train/<class>/*`, e.g. CUB-200), resized and cropped."""

    in_channels = 3  # ImageFolder's loader converts every image to RGB
    eps_grid = tuple(e / 255 for e in (0, 2, 4, 6, 8, 9, 10))

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        image_size: int = 224,
        resize: int | None = None,
        augment: bool = True,
        test_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        """val_size / test_size: None means a tenth of the images in train/. test_size only matters when there is
        no test/ or val/ folder, in which case the test images are carved from train/ as well, with the seed.
        resize: the side evaluation images are resized to before the centre crop; None means image_size * 8/7
        (256 for 224, the usual ImageNet ratio)."""
        super().__init__(root, batch_size, val_size, seed, num_workers, pin_memory)
        if root is None:
            raise ConfigError("imagefolder needs a folder: set --data.root to a folder holding train/<class>/ images")
        if image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {image_size}: set --data.image_size to e.g. 224")
        if test_size is not None and test_size < 0:
            raise ConfigError(f"test_size must be >= 0, got {test_size}: set --data.test_size to a number of images")
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError("mean and std need 3 values (R, G, B): fix --data.mean / --data.std")
        self.train_dir = Path(root).expanduser() / "train"
        if not self.train_dir.is_dir():
            raise ConfigError(f"no train/ folder under {root}: lay it out as {root}/train/<class>/<image>")
        test_dirs = [Path(root).expanduser() / d for d in ("test", "val")]
        self.test_dir = next((d for d in test_dirs if d.is_dir()), None)
        # Class names are folder names, so the spec is known without opening an image.
        try:
            self.class_names, _ = find_classes(str(self.train_dir))
        except FileNotFoundError as e:
            raise ConfigError(f"no class folders under {self.train_dir}: put each class's images in a folder") from e
        self.num_classes = len(self.class_names)
        self.image_size = (image_size, image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        resize = resize or round(image_size * 8 / 7)
        evaluate = [T.Resize(resize), T.CenterCrop(image_size)]
        train = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if augment else evaluate
        # ToTensor gives [0, 1]; no Normalize: the models normalise.
        self.train_transform = T.Compose([*train, T.ToTensor()])
        self.eval_transform = T.Compose([*evaluate, T.ToTensor()])
        self.test_size = test_size

    def _folder(self, path: Path, transform) -> ImageFolder:
        try:
            ds = ImageFolder(str(path), transform=transform)
        except FileNotFoundError as e:  # class folders without any image file (torchvision names them)
            found = " ".join(str(e).split(". Supported extensions")[0].split())
            raise ConfigError(f"no images found under {path} ({found}): put image files ({', '.join(IMG_EXTENSIONS)}) "
                              f"in every class folder, or remove the empty ones") from None
        if ds.classes != self.class_names:
            raise ConfigError(f"the class folders of {path} differ from those of {self.train_dir}: make them match")
        return ds

    def _make_datasets(self) -> tuple[Subset, Subset, ImageFolder | Subset]:
        # Two views of the same files: augmented for training, plain for validation and a carved test set.
        train_view = self._folder(self.train_dir, self.train_transform)
        eval_view = self._folder(self.train_dir, self.eval_transform)
        n = len(train_view)
        val_size = n // 10 if self.val_size is None else self.val_size
        if self.test_dir is not None:
            val_idx, train_idx = self.split_indices(n, val_size)
            test = self._folder(self.test_dir, self.eval_transform)
        else:
            test_size = n // 10 if self.test_size is None else self.test_size
            test_idx, val_idx, train_idx = self.split_indices(n, test_size, val_size)
            test = Subset(eval_view, test_idx.tolist())
        return Subset(train_view, train_idx.tolist()), Subset(eval_view, val_idx.tolist()), test
