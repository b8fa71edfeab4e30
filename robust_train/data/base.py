"""What every data module shares: float images in [0, 1] (NCHW, never normalised: the models do that, so an attack's
ε is in pixel units), a `spec` the CLI can link into the model before any data is read, a seeded validation split
carved from the training set, and a fast in-memory dataset that hands the DataLoader whole batches."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, default_collate

from robust_train.errors import ConfigError

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) and labels kept in memory. The DataLoader calls `__getitems__` with a whole batch of
    indices, so a batch costs one tensor gather instead of `batch_size` Python calls: the training loop stays
    compute-bound on CPU. `__getitem__`/`__len__` stay so that any sampler (DistributedSampler under DDP) works.
    A DataLoader over it needs `collate_fn=collate` (below): the default one would try to stack the finished batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: BatchTransform | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        # index_select, not images[idx]: advanced indexing is 10-100x slower on CPU.
        x = self.images.index_select(0, idx)
        if self.augment is not None:
            x = self.augment(x)  # on uint8: a quarter of the memory traffic of float
        return x.div(255), self.labels.index_select(0, idx)  # uint8 / 255 is float32 in one op


class EpochShuffle(RandomSampler):
    """A random order per epoch drawn from (seed, epoch) alone; Lightning calls `set_epoch` before each epoch (and
    replaces this sampler with a DistributedSampler, seeded the same way, under DDP)."""

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def collate(batch):
    """A tuple is a batch `__getitems__` already built; anything else is a list of samples to stack as usual."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


def random_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation for a whole batch: random crop after zero padding, then a random horizontal
    flip, each image drawing its own offsets. One `gather` over the flattened padded images instead of a Python
    loop (or advanced indexing, which is several times slower on CPU)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1))
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1))
    cols = torch.arange(w).expand(n, 1, w)
    cols = torch.where(torch.rand(n, 1, 1) < 0.5, cols.flip(-1), cols) + dx  # reversed columns = flipped crop
    rows = torch.arange(h).view(1, h, 1) + dy
    flat = (rows * (w + 2 * padding) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)


class ImageDataModule(LightningDataModule):
    """Subclasses set the class attributes below (or the same names on the instance in `__init__`, when they depend
    on the data, as for an image folder) and implement `_make_datasets`."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    eps_grid: Sequence[float]
    class_names: Sequence[str] | None = None

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int | None = 1000,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        # Collects the subclass's init arguments too (Lightning walks the super().__init__ chain).
        self.save_hyperparameters()
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}: set --data.batch_size to e.g. 128")
        if val_size is not None and val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {val_size}: set --data.val_size to a number of images")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}: set --data.num_workers to 0 or more")
        self.root = root
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        # None: pinned (page-locked) batches when a GPU is there, so the copy to it can overlap the step
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def spec(self) -> dict:
        # Plain lists, not tuples: the spec ends up in the model's hparams.yaml, which must load with safe_load.
        return {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "in_channels": int(self.in_channels),
            "image_size": [int(s) for s in self.image_size],
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "eps_grid": [float(e) for e in self.eps_grid],
            "class_names": None if self.class_names is None else [str(c) for c in self.class_names],
        }

    def _make_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """(train, val, test), read from disk. Called once, from `setup`."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        # All three sets at once whatever the stage: they are cheap (in memory, or lists of file names), and
        # `fit` followed by `test` on one module should not read the data twice.
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._make_datasets()

    def split_indices(self, n: int, *sizes: int) -> list[torch.Tensor]:
        """A fixed-seed random partition of range(n): one sorted index tensor per size in `sizes`, then the rest
        (the training images). The same seed gives the same split on every rank and every run."""
        if sum(sizes) >= n:
            raise ConfigError(
                f"the held-out split ({' + '.join(map(str, sizes))} images) leaves no training images out of {n}: "
                f"use a smaller --data.val_size" + (" or --data.test_size" if len(sizes) > 1 else "")
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        parts = list(torch.split(perm, [*sizes, n - sum(sizes)]))
        return [p.sort().values for p in parts]

    def tensor_datasets(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        augment: BatchTransform | None = None,
        source: str | None = None,
    ) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
        """Train/val/test for data held in memory as uint8 tensors (N, C, H, W); only the training part is
        augmented. Both parts are checked first (`robust_train.data.validate`): a ConfigError naming `source` (the
        file or folder read) when one is empty, has the wrong shape or has labels out of range."""
        from robust_train.data.validate import check_images_and_labels

        for split, (images, labels) in (("training", train), ("test", test)):
            check_images_and_labels(source or str(self.root or self.name), images, labels, self.in_channels,
                                    self.image_size, self.num_classes, split)
        x, y = train
        val_idx, train_idx = self.split_indices(len(y), self.val_size or 0)
        return (
            TensorImageDataset(x[train_idx], y[train_idx], augment),
            TensorImageDataset(x[val_idx], y[val_idx]),
            TensorImageDataset(*test),
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler, generator = None, None
        if shuffle:
            # The order of an epoch depends on (seed, epoch) alone and the loader draws from its own generator, not
            # from the global one: a run resumed from a checkpoint sees the batches, and the attacks the random
            # numbers, that the uninterrupted run saw (see robust_train.callbacks.rng_state).
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + self.seed
            sampler, shuffle = EpochShuffle(dataset, seed), False
            generator = torch.Generator().manual_seed(seed)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            # Validation and test under DDP: each rank takes every world-size-th image and none is repeated, so the
            # synced metrics count every image exactly once, as one process would (Lightning's default sampler
            # pads the ranks to equal length with repeated images). Lightning keeps a DistributedSampler it is given.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def test_tensors(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n test images (all when n is None) and their labels, always in the same order, so that two
        evaluations with the same n see the same images."""
        if self.test_set is None:
            self.prepare_data()  # the evaluation command uses the module without a Trainer
            self.setup("test")
        count = len(self.test_set) if n is None else max(0, min(n, len(self.test_set)))
        if count == 0:
            return torch.empty(0, self.in_channels, *self.image_size), torch.empty(0, dtype=torch.long)
        if isinstance(self.test_set, TensorImageDataset):  # in memory: one gather, no loop over batches
            return self.test_set.__getitems__(range(count))
        subset = Subset(self.test_set, range(count))
        loader = DataLoader(subset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)
