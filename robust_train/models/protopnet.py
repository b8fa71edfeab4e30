"""ProtoPNet (Chen et al., "This Looks Like That: Deep Learning for Interpretable Image Recognition", NeurIPS 2019)
on any registered backbone: `create_model("protopnet", backbone="small_cnn", prototypes_per_class=10)`.

The model is the one the official code builds (cfchen-duke/ProtoPNet `model.py`, `settings.py`; methods.md §1.1):

    Z   = add_on(body(x))        1×1 conv C -> D, ReLU, 1×1 conv D -> D, Sigmoid ('regular' add-on layers)
    d_j = ‖Z(h, w) − p_j‖²       for the P = M·K prototypes p_j ∈ R^{D×1×1}, through the conv expansion
                                 ‖z‖² − 2 z·p_j + ‖p_j‖², clamped at 0 (float noise can make it slightly negative)
    S_j = log((d_j + 1) / (d_j + 1e-4))      the 'log' similarity, decreasing in d, at most log(1e4) ≈ 9.21 at d = 0
    logit_c = Σ_j W_cj · max_hw S_j          = W · sim(min_hw d): the last layer, no bias

Prototypes j·M .. (j+1)·M − 1 belong to class j (`prototype_class_identity[j, j // M] = 1`). Initialisation as
the official code: add-on convs Kaiming-normal (fan_out, relu) with zero bias, prototypes U[0, 1) (the range of
the sigmoid), last layer +1 for a prototype's own class and `incorrect_class_connection` = −0.5 for the others.

How it keeps the Classifier contract. `features(x)` returns the prototype similarity maps S (N, P, H, W) and
`head` is the last layer (nn.Linear(P, K, bias=False), also reachable as `last_layer`); `logits_from_features`
max-pools S over H×W (not the base class's mean) before `head`. So everything written for "feature map + linear
head" runs on this model, but two things differ from a GAP + linear model: CAM (`robust_train.interpret.cam`) is
Σ_j W_cj S_j, a last-layer-weighted sum of similarity maps whose mean is *not* the logit (the logit reads each
map's maximum), and the evidence ProtoPNet itself gives is per prototype. The right map for this model is the
`prototype` map of `robust_train.interpret.prototype`: for class c, the cell-wise max of the similarity maps of c's
prototypes (its maximum is c's most activated prototype's activation); `prototype_top` is the single most activated
prototype's map. The add-on output Z is `latent_features(x)`, the per-cell distances `prototype_distances(x)`.

`prototype_image_index` and `prototype_patch_index` (buffers, so checkpoints carry them) record where the last push
(`robust_train.callbacks.PrototypePush`) took each prototype from: the index into the un-augmented training set and
the (h, w) cell of the latent map; −1 until a push has happened.

M (`prototypes_per_class`) defaults to the official 10 per class (CUB: 2000 prototypes for 200 classes) and D
(`prototype_dim`) to the official 128 of settings.py; on MNIST with small_cnn (7×7×100 maps) that is 100
prototypes and costs a few per cent of the backbone's compute, so there was no reason to shrink either.
Not implemented: prototypes larger than 1×1, the 'bottleneck' add-on layers, pruning.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.errors import ConfigError
from robust_train.models.base import Classifier
from robust_train.models.backbone import backbone_body, register_fixed_backbones
from robust_train.models.registry import register_model

LOG_EPSILON = 1e-4  # official: log((d + 1) / (d + 1e-4))


class ProtoPNet(Classifier):
    """A prototype layer on the last feature map of backbone `backbone` (a registered model name, or `tv_<name>`).

    Args:
        backbone: registry name; its `body` (image -> last feature map) is used, its head dropped.
        num_classes, in_channels, mean, std: as for every model (normalisation inside the model).
        prototypes_per_class: M (official 10); P = M · num_classes prototypes, ordered by class.
        prototype_dim: D, the depth of the add-on output and of each 1×1 prototype (official 128).
        activation: "log" (official default, log((d + 1)/(d + 1e-4))) or "linear" (−d).
        incorrect_class_connection: initial last-layer weight from a prototype to the other classes (−0.5).
        **backbone_kwargs: passed to the backbone's factory.
    """

    def __init__(self, backbone: str = "small_cnn", num_classes: int = 10, in_channels: int = 3,
                 mean=(0.0,), std=(1.0,), prototypes_per_class: int = 10, prototype_dim: int = 128,
                 activation: Literal["log", "linear"] = "log", incorrect_class_connection: float = -0.5,
                 **backbone_kwargs):
        for label, value in (("prototypes_per_class", prototypes_per_class), ("prototype_dim", prototype_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"protopnet: {label}={value!r} must be a positive integer")
        if activation not in ("log", "linear"):
            raise ConfigError(f"protopnet: activation={activation!r}: use 'log' (official) or 'linear'")
        net, channels = backbone_body("protopnet", backbone, num_classes=num_classes, in_channels=in_channels,
                                      mean=mean, std=std, **backbone_kwargs)
        super().__init__(net.mean.flatten().tolist(), net.std.flatten().tolist())
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.prototypes_per_class = prototypes_per_class
        self.num_prototypes = prototypes_per_class * num_classes
        self.prototype_dim = prototype_dim
        self.activation = activation
        self.body = net.body
        self.add_on = nn.Sequential(nn.Conv2d(channels, prototype_dim, 1), nn.ReLU(),
                                    nn.Conv2d(prototype_dim, prototype_dim, 1), nn.Sigmoid())
        self.prototype_vectors = nn.Parameter(torch.rand(self.num_prototypes, prototype_dim, 1, 1))
        self.head = nn.Linear(self.num_prototypes, num_classes, bias=False)
        identity = torch.zeros(self.num_prototypes, num_classes)
        identity[torch.arange(self.num_prototypes), torch.arange(self.num_prototypes) // prototypes_per_class] = 1
        self.register_buffer("prototype_class_identity", identity)
        self.register_buffer("prototype_image_index", torch.full((self.num_prototypes,), -1, dtype=torch.long))
        self.register_buffer("prototype_patch_index", torch.full((self.num_prototypes, 2), -1, dtype=torch.long))
        for m in self.add_on.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.set_last_layer_incorrect_connection(incorrect_class_connection)

    # -- parts -----------------------------------------------------------------------------------------------------
    @property
    def last_layer(self) -> nn.Linear:
        """The official name of `head`: Linear(P, K, bias=False) from max-pooled similarities to logits."""
        return self.head

    @property
    def prototype_classes(self) -> torch.Tensor:
        """(P,) the class of each prototype."""
        return self.prototype_class_identity.argmax(1)

    def set_last_layer_incorrect_connection(self, incorrect_strength: float = -0.5) -> None:
        """Last layer := +1 from each prototype to its own class, `incorrect_strength` to every other class."""
        own = self.prototype_class_identity.t()
        with torch.no_grad():
            self.head.weight.copy_(own + incorrect_strength * (1 - own))

    def off_class_mask(self) -> torch.Tensor:
        """(K, P) mask of the last-layer weights from prototypes to classes other than their own (the L1 term's)."""
        return 1 - self.prototype_class_identity.t()

    # -- distances and similarities --------------------------------------------------------------------------------
    def latent_features(self, x: torch.Tensor) -> torch.Tensor:
        """The add-on output Z (N, D, H, W), in (0, 1), for images x in [0, 1]; prototypes live in this space."""
        return self.add_on(self.body(self.normalize(x)))

    def distances_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances (N, P, H, W) from every latent cell to every prototype, by the official expansion
        ‖z‖² − 2 z·p + ‖p‖² (a 1×1 convolution), clamped at 0."""
        p = self.prototype_vectors
        z2 = (z * z).sum(1, keepdim=True)
        p2 = (p * p).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        return F.relu(z2 - 2 * F.conv2d(z, p) + p2)

    def distance_to_similarity(self, d: torch.Tensor) -> torch.Tensor:
        if self.activation == "log":
            return torch.log((d + 1) / (d + LOG_EPSILON))
        return -d

    def prototype_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell squared distances (N, P, H, W) for images x in [0, 1]."""
        return self.distances_from_latent(self.latent_features(x))

    def min_distances(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P) the smallest distance of each prototype over the cells (global min pooling)."""
        return self.prototype_distances(x).amin(dim=(2, 3))

    def similarity_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype similarity maps S (N, P, H, W) at feature resolution; differentiable in x and parameters."""
        return self.distance_to_similarity(self.prototype_distances(x))

    def forward_with_distances(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), min distances (N, P)): the official forward, which the losses need."""
        min_d = self.min_distances(x)
        return self.head(self.distance_to_similarity(min_d)), min_d

    # -- the Classifier contract ------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The similarity maps S (N, P, H, W); `logits_from_features` max-pools them and applies `head`."""
        return self.similarity_maps(x)

    def logits_from_features(self, fmap: torch.Tensor) -> torch.Tensor:
        # max_hw S_j = sim(min_hw d_j) since the similarity decreases in d: the same logits as forward().
        return self.head(fmap.amax(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_distances(x)[0]


def is_prototype_model(model: nn.Module) -> bool:
    """Whether `model` is a ProtoPNet: the one test every prototype-specific attack, map and report uses."""
    return isinstance(model, ProtoPNet)


@register_model("protopnet")
def protopnet(backbone: str = "small_cnn", **kwargs) -> ProtoPNet:
    """ProtoPNet's prototype layer (Chen et al.) on any backbone by name (default small_cnn, for MNIST)."""
    return ProtoPNet(backbone, **kwargs)


register_fixed_backbones("protopnet", ProtoPNet, ("preact_resnet18", "vgg16_bn"))
