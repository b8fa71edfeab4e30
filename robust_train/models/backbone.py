"""Heads on a backbone (attention pooling, ProtoPNet): how they take a registered model's body and which names they
register with the backbone fixed."""
from __future__ import annotations

from typing import Callable

from torch import nn

from robust_train.errors import ConfigError
from robust_train.models.registry import create_model, register_model

# Models that are themselves a head on a backbone: their `body` is not the feature map their head reads.
HEAD_MODELS = ("attention_pool", "protopnet")


def backbone_body(owner: str, backbone, **kwargs) -> tuple[nn.Module, int]:
    """(the backbone model `backbone`, the channels of its last feature map) for the head model `owner`; the
    backbone must be a plain Classifier (`body` and a linear `head`), not another head model."""
    if not isinstance(backbone, str):
        raise ConfigError(f"{owner}: backbone must be a model name such as 'small_cnn', got {backbone!r}")
    if backbone.startswith(HEAD_MODELS):
        raise ConfigError(f"{owner}: backbone {backbone!r} is itself a head on a backbone; name a plain backbone "
                          "such as small_cnn, preact_resnet18 or vgg16_bn")
    net = create_model(backbone, **kwargs)
    channels = getattr(getattr(net, "head", None), "in_features", None)
    if not isinstance(getattr(net, "body", None), nn.Module) or not isinstance(channels, int):
        raise ConfigError(f"{owner}: backbone {backbone!r} has no `body` and linear `head` (the Classifier "
                          "contract), so its last feature map cannot be found")
    return net, channels


def register_fixed_backbones(owner: str, build: Callable[..., nn.Module], backbones: tuple[str, ...]) -> None:
    """Register `<owner>_<backbone>` for each backbone: `build(backbone, **kwargs)` with the backbone fixed (the
    names for CIFAR-sized inputs, whose feature maps are 4×4 or 2×2 at 32×32)."""
    for backbone in backbones:
        def fixed(_backbone=backbone, **kwargs) -> nn.Module:
            if "backbone" in kwargs:
                raise ConfigError(f"{owner}_{_backbone} fixes the backbone; use arch {owner} with "
                                  f"backbone={kwargs['backbone']!r} instead")
            return build(_backbone, **kwargs)

        fixed.__doc__ = f"{owner} on {backbone}, for CIFAR-sized inputs"
        register_model(f"{owner}_{backbone}")(fixed)
