"""The small MNIST CNN of Boopathy et al. (ICML 2020), "smallgap": conv 16-32-100, kernels 4-4-7, strides 2-2-1,
global average pooling, linear head. ReLU comes before every conv but the first, so the last feature map is the
pre-activation output of the last conv and CAM is exact: logit_c = mean_ij CAM_c(i, j) + b_c."""
from __future__ import annotations

from torch import nn

from robust_train.models.base import Classifier
from robust_train.models.registry import register_model


class SmallCNN(Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=(0.0,), std=(1.0,),
                 widths: tuple[int, int, int] = (16, 32, 100)):
        super().__init__(mean, std)
        c1, c2, c3 = widths
        # Paddings 1, 1, 3 reproduce TF "SAME": 28 -> 14 -> 7 -> 7 on MNIST.
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 7, stride=1, padding=3),
        )
        self.head = nn.Linear(c3, num_classes)


@register_model("small_cnn")
def small_cnn(**kwargs) -> SmallCNN:
    """Boopathy et al.'s MNIST CNN: conv 16-32-100, GAP and a linear head, so CAM is exact."""
    return SmallCNN(**kwargs)
