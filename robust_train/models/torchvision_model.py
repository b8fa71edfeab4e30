"""Any torchvision classifier whose head is global average pooling + (dropout) + one linear layer, wrapped as a
Classifier: `create_model("tv_resnet50")`. Families: ResNet/ResNeXt/Wide-ResNet (He et al., arXiv:1512.03385),
RegNet (Radosavovic et al., arXiv:2003.13678), ShuffleNetV2 (Ma et al., arXiv:1807.11164), DenseNet (Huang et al.,
arXiv:1608.06993), MobileNetV2 (Sandler et al., arXiv:1801.04381), EfficientNet (Tan & Le, arXiv:1905.11946) and
MNASNet (Tan et al., arXiv:1807.11626)."""
from __future__ import annotations

import difflib
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from robust_train.errors import ConfigError
from robust_train.models.base import Classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Families that are not GAP + linear, so there is no last feature map whose pooled value a linear layer reads.
_NOT_GAP_LINEAR = {
    "mobilenetv3": "its classifier is Linear-Hardswish-Dropout-Linear",
    "convnext": "its classifier applies LayerNorm before the linear layer",
    "vgg": "its classifier is three fully connected layers",
    "alexnet": "its classifier is three fully connected layers",
    "squeezenet": "its classifier is a convolution",
    "googlenet": "it has auxiliary heads",
    "inception": "it has auxiliary heads",
    "vision_transformer": "it is a transformer classifying a token",
    "swin_transformer": "its head applies LayerNorm before the linear layer",
    "maxvit": "its classifier has LayerNorm and a hidden layer",
}
_EXAMPLES = "e.g. tv_resnet18, tv_regnet_y_400mf, tv_densenet121, tv_mobilenet_v2 or tv_efficientnet_b0"


class TorchvisionClassifier(Classifier):
    def __init__(self, body: nn.Module, head: nn.Linear, mean, std):
        super().__init__(mean, std)
        self.body = body
        self.head = head


def torchvision_classifier(name: str, num_classes: int = 10, in_channels: int = 3, mean=None, std=None,
                           weights=None, **kwargs) -> TorchvisionClassifier:
    """torchvision model `name` (no `tv_` prefix) as a Classifier; mean/std default to ImageNet's."""
    model = _build(name, num_classes, weights, kwargs)
    body, head = _split(model, name)
    if head.out_features != num_classes:  # pretrained weights come with ImageNet's 1000 classes
        head = nn.Linear(head.in_features, num_classes)
    if in_channels != 3:
        _adapt_first_conv(body, in_channels, pretrained=weights is not None)
    if mean is None or std is None:
        # For other channel counts (e.g. grayscale) the channel-averaged ImageNet statistics, as timm does.
        mean = IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,) * in_channels
        std = IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,) * in_channels
    return TorchvisionClassifier(body, head, tuple(mean), tuple(std))


def _build(name: str, num_classes: int, weights, kwargs) -> nn.Module:
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean 'tv_{close[0]}'?" if close else ""
        raise ConfigError(f"unknown torchvision model {name!r}.{hint} List the names with "
                          "torchvision.models.list_models(module=torchvision.models)")
    family = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    if family not in _SPLITS:
        reason = _NOT_GAP_LINEAR.get(family, "no body/head split is implemented for its family")
        raise ConfigError(f"torchvision model {name!r} is not a GAP+linear model ({reason}), so it has no feature "
                          f"map + linear head to split; use a GAP+linear one, {_EXAMPLES}")
    try:
        if weights is None:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad keyword argument for torchvision model {name!r}: {e}") from e
    except KeyError as e:
        options = ", ".join(["DEFAULT"] + [w.name for w in torchvision.models.get_model_weights(name)])
        raise ConfigError(f"unknown weights {weights!r} for torchvision model {name!r}; choose one of {options}") from e
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad checksum a RuntimeError
        msg = " ".join(str(e).split())
        raise ConfigError(f"could not load weights {weights!r} for torchvision model {name!r} ({msg}); download "
                          "them where there is network into $TORCH_HOME, or use weights=None") from e


def _children_but(model: nn.Module, *skip: str) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, m) for n, m in model.named_children() if n not in skip))


def _single_linear(classifier: nn.Module, name: str) -> nn.Linear:
    # Dropout before the linear layer is left out: the contract's head is a bare Linear on the pooled features,
    # which is what makes CAM exact.
    layers = list(classifier) if isinstance(classifier, nn.Sequential) else [classifier]
    layers = [m for m in layers if not isinstance(m, (nn.Dropout, nn.Flatten, nn.Identity))]
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
        raise ConfigError(f"torchvision model {name!r} is not a GAP+linear model (its classifier is {classifier}); "
                          f"use {_EXAMPLES}")
    return layers[0]


# Per family: model -> (body, linear head). ResNet, RegNet and ShuffleNetV2 run their children in registration order
# before pooling; DenseNet applies a ReLU after `features` inside forward, so it joins the body.
_SPLITS = {
    "resnet": lambda m, name: (_children_but(m, "avgpool", "fc"), m.fc),
    "regnet": lambda m, name: (_children_but(m, "avgpool", "fc"), m.fc),
    "shufflenetv2": lambda m, name: (_children_but(m, "fc"), m.fc),
    "densenet": lambda m, name: (nn.Sequential(OrderedDict(features=m.features, relu=nn.ReLU())),
                                 _single_linear(m.classifier, name)),
    "mobilenetv2": lambda m, name: (m.features, _single_linear(m.classifier, name)),
    "efficientnet": lambda m, name: (m.features, _single_linear(m.classifier, name)),
    "mnasnet": lambda m, name: (m.layers, _single_linear(m.classifier, name)),
}


def _split(model: nn.Module, name: str) -> tuple[nn.Module, nn.Linear]:
    family = type(model).__module__.rsplit(".", 1)[-1]
    return _SPLITS[family](model, name)


def _adapt_first_conv(body: nn.Module, in_channels: int, pretrained: bool) -> None:
    path, old = next((n, m) for n, m in body.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None)
    if pretrained:
        # Keep what the stem learned: with channel-averaged RGB kernels scaled by 3/C, a gray image replicated to C
        # channels gives the same response the RGB stem gave to the gray image replicated to 3.
        with torch.no_grad():
            new.weight.copy_(old.weight.mean(1, keepdim=True).expand_as(new.weight) * 3 / in_channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(body.get_submodule(parent_path), attr, new)
