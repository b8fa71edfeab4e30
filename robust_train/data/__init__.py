"""Data modules by name (`DATA`): each yields float images in [0, 1] (NCHW) and exposes a `spec` for the model."""
from robust_train.data.base import ImageDataModule, TensorImageDataset
from robust_train.data.registry import DATA, register_data
from robust_train.data.cifar10 import CIFAR10Data
from robust_train.data.imagefolder import ImageFolderData
from robust_train.data.mnist import MNISTData

__all__ = ["CIFAR10Data", "DATA", "ImageDataModule", "ImageFolderData", "MNISTData", "TensorImageDataset",
           "register_data"]
