"""Models by name, timm style: `create_model("preact_resnet18", num_classes=10, in_channels=3)`.

Every entry takes num_classes, in_channels, mean and std (the data set's, for the normalisation inside the model)
plus its own keyword arguments; `tv_<name>` builds any torchvision classifier, e.g. `tv_resnet50`.
"""
from __future__ import annotations

from robust_train.registry import Registry

MODELS: Registry = Registry("model")
register_model = MODELS.register


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, mean=None, std=None, **kwargs):
    if name.startswith("tv_") and name not in MODELS:
        from robust_train.models.torchvision_model import torchvision_classifier

        return torchvision_classifier(name[3:], num_classes=num_classes, in_channels=in_channels,
                                      mean=mean, std=std, **kwargs)
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs)
