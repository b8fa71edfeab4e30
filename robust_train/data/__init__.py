"""Data modules by name: each yields float images in [0, 1] (NCHW) and exposes a `spec` for the model."""
from robust_train.data.base import ImageDataModule, TensorImageDataset
from robust_train.data.cifar10 import CIFAR10Data
from robust_train.data.imagefolder import ImageFolderData
from robust_train.data.mnist import MNISTData
from robust_train.registry import Registry

DATAMODULES: dict[str, type[ImageDataModule]] = {
    "mnist": MNISTData,
    "cifar10": CIFAR10Data,
    "imagefolder": ImageFolderData,
}

_REGISTRY: Registry[ImageDataModule] = Registry("data set")
for _name, _cls in DATAMODULES.items():
    _REGISTRY.register(_name)(_cls)


def create_datamodule(name: str, **kwargs) -> ImageDataModule:
    """`create_datamodule("cifar10", root=...)`; an unknown name is a ConfigError that suggests the closest one."""
    return _REGISTRY.create(name, **kwargs)


__all__ = [
    "DATAMODULES",
    "CIFAR10Data",
    "ImageDataModule",
    "ImageFolderData",
    "MNISTData",
    "TensorImageDataset",
    "create_datamodule",
]
