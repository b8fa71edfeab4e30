"""Attentional pooling (Girdhar & Ramanan, "Attentional Pooling for Action Recognition", NIPS 2017) as the head of any
registered backbone: `create_model("attention_pool", backbone="small_cnn")`.

The formula is the one the official code implements (rohitgirdhar/AttentionalPoolingAction,
`nets_factory.py`, branch USE_POSE_PRELOGITS_BASED_ATTENTION with SINGLE_LAYER_ATT, rank 1; see
methods.md §2). With X the backbone's last feature map (N, K, H, W), n = H·W positions:

    b   = X·w_b + β_b                       bottom-up, class-agnostic saliency: 1×1 conv K -> 1, no activation
    a_c = drop(X)·W_c + β_c                 top-down class maps: 1×1 conv K -> num_classes, on dropout(X)
    score_c = mean_ij (a_c ⊙ b)(i, j)       the logits: a spatial MEAN (tf.reduce_mean), no extra bias
            = (1/n) (X a_c)ᵀ (X b) = (1/n) Tr(Xᵀ X b a_cᵀ)     (with X augmented by a ones column for the biases)

so a rank-1 approximation of second-order pooling. Both convs start from N(0, 0.001) weights and zero biases
(official init); the official dropout before the top-down conv is keep_prob 0.2 (80% dropped) for fine-tuning an
ImageNet ResNet-101, which is far too much for a small network trained from scratch, so here it is
`attention_dropout=0.0` by default (set 0.8 for the official value).

How it keeps the Classifier contract, exactly. The product a_c ⊙ b is linear in the top-down weights, so with the
bottom-up-weighted ("attended") features  F = [drop(X) ⊙ b, b]  (K + 1 channels)

    a_c ⊙ b = Σ_k W_ck (drop(X)_k ⊙ b) + β_c b = Σ_k' W̃_ck' F_k',   W̃_c = [W_c, β_c],

and score_c = W̃_c · GAP(F): attentional pooling *is* pooling with the bottom-up weights followed by the top-down
linear classifier. So `features(x)` returns F, `head` is `nn.Linear(K + 1, num_classes, bias=False)` holding
[W_c | β_c] (a 1×1 conv is a linear layer over channels), and `logits_from_features` is the base class's
`head(GAP(F))`. Consequently CAM on this model (`robust_train.interpret.cam`) is not a wrong map that happens to
run: it *is* the attention map a_c ⊙ b, exactly, with completeness logit_c = mean_ij map_c(i, j) (no bias term).
Everything built on CAM (Int/Int2, map stability, AAI, pictures, `evaluate --map cam`) therefore uses the model's
own attention map, and the `attention` map (`robust_train.interpret.attention`) gives the same numbers. Grad-CAM on
`features` is the attention map divided by H·W, as for any GAP + linear model. The backbone's own feature map X
is `backbone_features(x)`, the bottom-up map b is `bottom_up_map(x)`.

Not implemented (official options, all off by default): rank > 1, per-class bottom-up maps, softmax/ReLU on b, and
the pose-regularised bottom-up branch (config 003, which needs pose heat-map labels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.errors import ConfigError
from robust_train.models.base import Classifier
from robust_train.models.backbone import backbone_body, register_fixed_backbones
from robust_train.models.registry import register_model

INIT_STD = 0.001  # official: tf.random_normal_initializer(0.0, 0.001) for both 1×1 convs, zero biases


class AttentionPoolClassifier(Classifier):
    """Backbone `backbone` (a registered model name, or `tv_<name>`) with its GAP + linear head replaced by rank-1
    attentional pooling; see the module docstring for the formula and how it maps onto `features`/`head`.

    Args:
        backbone: registry name of the backbone; its `body` (image -> last feature map) is used, its head dropped.
        num_classes, in_channels, mean, std: as for every model (normalisation inside the model).
        attention_dropout: dropout on X before the top-down conv (official 0.8; default 0.0, see module doc).
        init_std: std of the normal init of both attention convs' weights (official 0.001); biases start at 0.
        **backbone_kwargs: passed to the backbone's factory (e.g. `widths` of small_cnn, `dropout` of wide_resnet).
    """

    def __init__(self, backbone: str = "small_cnn", num_classes: int = 10, in_channels: int = 3,
                 mean=(0.0,), std=(1.0,), attention_dropout: float = 0.0, init_std: float = INIT_STD,
                 **backbone_kwargs):
        if not 0.0 <= attention_dropout < 1.0:
            raise ConfigError(f"attention_pool: attention_dropout={attention_dropout} must be in [0, 1)")
        if not init_std > 0:
            raise ConfigError(f"attention_pool: init_std={init_std} must be > 0")
        net, channels = backbone_body("attention_pool", backbone, num_classes=num_classes, in_channels=in_channels,
                                      mean=mean, std=std, **backbone_kwargs)
        # The backbone's normalisation buffers become this model's. create_model fills mean/std with 0/1 for any
        # name not starting with tv_, so a pretrained tv_ backbone needs its statistics given explicitly.
        super().__init__(net.mean.flatten().tolist(), net.std.flatten().tolist())
        self.backbone_name = backbone
        self.body = net.body
        self.bottom_up = nn.Conv2d(channels, 1, kernel_size=1)  # w_b, β_b
        self.dropout = nn.Dropout(attention_dropout)
        # Top-down 1×1 conv as a linear layer over the attended features F = [drop(X) ⊙ b, b]: columns :K are W_c,
        # the last column is β_c. No separate bias: the official score has none.
        self.head = nn.Linear(channels + 1, num_classes, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.bottom_up.weight, 0.0, init_std)
            nn.init.zeros_(self.bottom_up.bias)
            nn.init.normal_(self.head.weight, 0.0, init_std)
            self.head.weight[:, -1].zero_()

    # -- the two factors ------------------------------------------------------------------------------------------
    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map X (N, K, H, W) for images x in [0, 1]."""
        return self.body(self.normalize(x))

    def bottom_up_map(self, x: torch.Tensor) -> torch.Tensor:
        """The class-agnostic bottom-up saliency b = X·w_b + β_b, (N, 1, H, W)."""
        return self.bottom_up(self.backbone_features(x))

    def top_down(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (C, K, 1, 1), β (C,)) of the top-down 1×1 conv, views of `head.weight` (keep the graph)."""
        w = self.head.weight
        return w[:, :-1, None, None], w[:, -1]

    def _attended(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(fmap), self.bottom_up(fmap)

    # -- the Classifier contract ------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The attended feature map F = [drop(X) ⊙ b, b] (N, K + 1, H, W), whose GAP the linear `head` reads."""
        xd, b = self._attended(self.backbone_features(x))
        return torch.cat([xd * b, b], dim=1)

    # logits_from_features is the base class's head(GAP(F)) = mean_ij (a_c ⊙ b).

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class attention maps a_c ⊙ b (N, num_classes, H, W) for images x in [0, 1]; their spatial mean is
        the logits (in train mode with attention_dropout > 0, each call draws its own dropout mask).
        Differentiable w.r.t. x and the parameters."""
        return self.attention_maps_from_backbone(self.backbone_features(x))

    def attention_maps_from_backbone(self, fmap: torch.Tensor) -> torch.Tensor:
        """a_c ⊙ b from the backbone's feature map X, computed the official way: two 1×1 convs and a product."""
        xd, b = self._attended(fmap)
        w, beta = self.top_down()
        return F.conv2d(xd, w, beta) * b


@register_model("attention_pool")
def attention_pool(backbone: str = "small_cnn", **kwargs) -> AttentionPoolClassifier:
    """Rank-1 attention pooling (Girdhar & Ramanan) on any backbone by name (default small_cnn, for MNIST)."""
    return AttentionPoolClassifier(backbone, **kwargs)


register_fixed_backbones("attention_pool", AttentionPoolClassifier, ("preact_resnet18", "vgg16_bn"))
