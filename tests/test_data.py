"""Data modules on real data, offline: bundled MNIST, the CIFAR-10 subset in shared/, a tiny generated ImageFolder."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from robust_train.data import DATA, CIFAR10Data, ImageFolderData, MNISTData
from robust_train.data.base import TensorImageDataset, collate, random_crop_flip
from robust_train.errors import ConfigError

# /work/main/tests -> /work/shared: the subset lives next to the repository, not in it.
CIFAR_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
SPEC_KEYS = {"name", "num_classes", "in_channels", "image_size", "mean", "std", "eps_grid", "class_names"}


def rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(img.flatten().numpy()) for img in x}


@pytest.fixture(scope="module")
def mnist() -> MNISTData:
    dm = MNISTData(val_size=1000, seed=0)
    dm.setup("fit")
    return dm


def test_mnist_spec_known_before_setup():
    spec = MNISTData().spec
    assert set(spec) == SPEC_KEYS
    assert spec["num_classes"] == 10 and spec["in_channels"] == 1 and spec["image_size"] == [28, 28]
    assert spec["eps_grid"] == [0, 0.05, 0.1, 0.2, 0.3, 0.35, 0.4]


def test_bundled_mnist_sizes_and_values(mnist):
    assert (len(mnist.train_set), len(mnist.val_set), len(mnist.test_set)) == (17_435 - 1000, 1000, 10_000)
    x, y = mnist.test_tensors()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.99
    assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
    x5, y5 = mnist.test_tensors(5)
    assert torch.equal(x5, x[:5]) and torch.equal(y5, y[:5])


def test_mnist_val_split_is_seeded_and_disjoint(mnist):
    # The bundled training images have no exact duplicates, so equal bytes would mean a leak.
    assert not rows(mnist.train_set.images) & rows(mnist.val_set.images)
    assert torch.equal(MNISTData(seed=0).split_indices(17_435, 1000)[0], mnist.split_indices(17_435, 1000)[0])
    assert not torch.equal(MNISTData(seed=1).split_indices(17_435, 1000)[0], mnist.split_indices(17_435, 1000)[0])
    other = MNISTData(seed=1)
    other.setup()
    assert not torch.equal(other.val_set.images, mnist.val_set.images)


def test_mnist_dataloaders_give_batches(mnist):
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (128,)
    x, y = next(iter(mnist.val_dataloader()))
    assert x.shape == (128, 1, 28, 28)
    assert len(mnist.test_dataloader()) == 79  # ceil(10,000 / 128): nothing dropped


def test_per_item_access_and_samplers_still_work():
    ds = TensorImageDataset(torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8), torch.arange(10))
    x, y = ds[3]
    assert x.shape == (1, 4, 4) and x.dtype == torch.float32 and int(y) == 3
    # What Lightning does under DDP: the same dataset and collate_fn, with a DistributedSampler injected.
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate)
    assert [b[1].tolist() for b in loader] == [[1, 3, 5, 7], [9]]


def test_mnist_wrong_root_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="bundled MNIST"):  # at construction, before the Trainer starts
        MNISTData(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "MNIST" / "raw").mkdir(parents=True)
    dm = MNISTData(root=str(tmp_path / "empty"))  # the folder exists but holds no MNIST files
    with pytest.raises(ConfigError, match="bundled MNIST"):
        dm.setup()


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"val_size": -1}, {"num_workers": -2}])
def test_bad_args_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        MNISTData(**kwargs)


def test_val_size_too_large_is_config_error():
    with pytest.raises(ConfigError, match="val_size"):
        MNISTData(val_size=17_435).setup()


def test_registry():
    assert DATA.names() == ["cifar10", "imagefolder", "mnist"]
    assert isinstance(DATA.create("mnist", batch_size=32), MNISTData)
    assert MNISTData.name == "mnist" and MNISTData(batch_size=32).spec["name"] == "mnist"
    with pytest.raises(ConfigError, match="mnist"):
        DATA.create("mnsit")


def test_crop_flip_keeps_shape_range_and_pixels():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # Each output is a shifted (maybe flipped) copy: its non-padding pixels come from the source image.
    torch.manual_seed(0)
    ones = random_crop_flip(torch.full((8, 1, 32, 32), 255, dtype=torch.uint8))
    assert ones.float().mean() > 0.7  # at most 4 of 32 rows/cols are padding
    flipped_only = random_crop_flip(x, padding=0)
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(flipped_only, x))


def test_cifar_subset():
    if not CIFAR_SUBSET.is_dir():
        pytest.skip(f"{CIFAR_SUBSET} is not on this machine")
    dm = CIFAR10Data(root=str(CIFAR_SUBSET), batch_size=64)
    assert dm.spec["class_names"][0] == "airplane" and dm.spec["in_channels"] == 3
    assert dm.spec["eps_grid"][4] == pytest.approx(8 / 255)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (5085 - 500, 500, 1017)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.min() >= 0 and y.max() <= 9
    # Augmentation is for training only: the test set comes out exactly as stored.
    with np.load(CIFAR_SUBSET / "cifar10_subset.npz") as z:
        expected = torch.from_numpy(z["x_test"][:8]).float() / 255
    assert torch.equal(dm.test_tensors(8)[0], expected)
    # The .npz file itself works as root too.
    assert CIFAR10Data(root=str(CIFAR_SUBSET / "cifar10_subset.npz")).subset is not None


def test_cifar_missing_without_download_is_config_error(tmp_path):
    dm = CIFAR10Data(root=str(tmp_path), download=False)
    with pytest.raises(ConfigError, match="CIFAR-10 not found"):
        dm.prepare_data()
    with pytest.raises(ConfigError, match="CIFAR-10 not found"):
        dm.setup()


def test_cifar_failed_download_is_config_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ConfigError, match="could not be downloaded"):
        CIFAR10Data(root=str(tmp_path), download=True).prepare_data()


def make_folder(root: Path, split: str, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "bird"):
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_carves_test_from_train(tmp_path):
    make_folder(tmp_path, "train", per_class=4)
    dm = ImageFolderData(root=str(tmp_path), image_size=16, batch_size=4, val_size=2, test_size=3)
    assert dm.spec["num_classes"] == 3 and dm.spec["class_names"] == ["bird", "cat", "dog"]
    assert dm.spec["image_size"] == [16, 16] and dm.spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (7, 2, 3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long
    x, y = dm.test_tensors()
    assert x.shape == (3, 3, 16, 16) and torch.equal(x, dm.test_tensors()[0])


def test_imagefolder_with_test_folder(tmp_path):
    make_folder(tmp_path, "train", per_class=3)
    make_folder(tmp_path, "val", per_class=2)
    dm = ImageFolderData(root=str(tmp_path), image_size=8, augment=False)
    dm.setup()
    assert (len(dm.train_set) + len(dm.val_set), len(dm.test_set)) == (9, 6)


def test_imagefolder_missing_or_empty_is_config_error(tmp_path):
    with pytest.raises(ConfigError):
        ImageFolderData(root=str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="class folders"):
        ImageFolderData(root=str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    dm = ImageFolderData(root=str(tmp_path))
    with pytest.raises(ConfigError, match="no images"):
        dm.setup()
