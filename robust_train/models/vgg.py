"""VGG-16 with batch norm: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(arXiv:1409.1556); BN after Ioffe & Szegedy (arXiv:1502.03167). CIFAR form: 3x3 convs, no big fully connected layers,
global average pooling and one linear layer."""
from __future__ import annotations

from torch import nn

from robust_train.models.base import Classifier
from robust_train.models.registry import register_model

# The usual CIFAR config ends with a fifth "M", which pools 32x32 inputs down to a 1x1 map; we drop it so the last
# feature map stays 2x2, since a 1x1 map makes CAM and other spatial attributions meaningless. GAP then replaces it.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(Classifier):
    def __init__(self, cfg=VGG16, num_classes: int = 10, in_channels: int = 3, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)


@register_model("vgg16_bn")
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with batch norm, CIFAR form (3x3 convs, GAP and a linear head)."""
    return VGG(VGG16, **kwargs)
