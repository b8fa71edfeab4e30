"""WideResNet: Zagoruyko & Komodakis, "Wide Residual Networks" (arXiv:1605.07146), in the form of the CIFAR code of
Madry et al. (arXiv:1706.06083) and TRADES (Zhang et al., arXiv:1901.08573): pre-activation basic blocks, widths
16/16k/32k/64k, (depth-4)/6 blocks per stage. WRN-34-10 has 46.16M parameters, WRN-28-10 36.48M (10 classes)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from robust_train.errors import ConfigError
from robust_train.models.base import Classifier
from robust_train.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference code, a projection shortcut takes the pre-activated input, an identity one the raw one.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(Classifier):
    def __init__(self, depth: int = 34, widen: int = 10, dropout: float = 0.0, num_classes: int = 10,
                 in_channels: int = 3, mean=(0.0,), std=(1.0,)):
        super().__init__(mean, std)
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 28 or 34), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)]
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for s in [stride] + [1] * (n - 1):
                layers.append(WideBlock(in_planes, planes, s, dropout))
                in_planes = planes
        # Final BN+ReLU in the body so the last feature map is the activation the pooled head reads.
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(in_planes, num_classes)
        # The reference code's init (He-normal, fan-out; zero linear bias): robust-training recipes are tuned to it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


@register_model("wide_resnet")
def wide_resnet(depth: int = 34, widen: int = 10, dropout: float = 0.0, **kwargs) -> WideResNet:
    """WideResNet-`depth`-`widen` (Madry et al.'s and TRADES' CIFAR form)."""
    return WideResNet(depth, widen, dropout, **kwargs)


@register_model("wide_resnet34_10")
def wide_resnet34_10(dropout: float = 0.0, **kwargs) -> WideResNet:
    """WideResNet-34-10, the robust-CIFAR benchmark network."""
    return WideResNet(34, 10, dropout, **kwargs)


@register_model("wide_resnet28_10")
def wide_resnet28_10(dropout: float = 0.0, **kwargs) -> WideResNet:
    """WideResNet-28-10."""
    return WideResNet(28, 10, dropout, **kwargs)
