"""PreAct ResNet-18 for 32x32 images: He et al., "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027),
in the CIFAR form used by Wong et al., "Fast is better than free" (arXiv:2001.03994) and Rice et al., "Overfitting in
adversarially robust deep learning" (arXiv:2002.11569): 3x3 stem, no max-pool, stages 64/128/256/512 with strides
1/2/2/2, two blocks each. 11.17M parameters for 10 classes."""
from __future__ import annotations

import torch
from torch import nn

from robust_train.models.base import Classifier
from robust_train.models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # A projection shortcut sees the pre-activated input, as in the reference implementation.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(Classifier):
    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)]
        in_planes = 64
        for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
            for s in [stride] + [1] * (n - 1):
                layers.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
        # Pre-activation blocks end on a sum, so the final BN+ReLU goes in the body: the feature map CAM sees is
        # the one the pooled head actually reads.
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(in_planes, num_classes)


@register_model("preact_resnet18")
def preact_resnet18(**kwargs) -> PreActResNet:
    """PreAct ResNet-18 for 32x32 images (the fast-AT and robust-overfitting papers' network)."""
    return PreActResNet((2, 2, 2, 2), **kwargs)
