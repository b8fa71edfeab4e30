"""A supervised variational autoencoder (Tang et al. 2019, "Adversarial attack type I: cheat classifiers by
significant changes"): an encoder q(z|x) = N(μ(x), diag σ²(x)), a decoder p(x|z) (Bernoulli pixels: x̂ = sigmoid),
a classifier p(y|z) on the latent code (`head`, linear) and a latent discriminator D(z), an MLP giving the logit of
"z is a prior sample" against "z is an encoded image". The Type-I attack (`robust_train.attacks.type1`) moves z and
decodes it; D keeps the moved z where the prior puts its mass.

As a model of the registry it keeps the contract of the others: images in [0, 1] (NCHW) in, class logits out,
`forward(x) = head(μ(x))`, so `robust_train.load` gives a usable classifier; the data set's mean and std normalise the
encoder's input. It has no feature map (no `features`), so CAM and the map-based parts of the evaluation skip it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.models.registry import register_model


class SupervisedVAE(nn.Module):
    """Encoder conv 16-32 (kernel 4, stride 2) → linear to (μ, log σ²); decoder linear → transposed convs 32-16 →
    sigmoid, mirror of the encoder; `head` linear on z; `disc` MLP on z.

    Args:
        image_size: (H, W) of the images, each divisible by 4 (the two stride-2 stages); other sizes are refused.
        latent: dimension d of z; hidden: width of the encoder/decoder's fully connected layer and of D's layers.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), latent: int = 16, hidden: int = 128,
                 image_size: Sequence[int] = (28, 28), widths: Sequence[int] = (16, 32)):
        super().__init__()
        h, w = (int(s) for s in image_size)
        if h % 4 or w % 4 or h < 4 or w < 4:
            raise ConfigError(f"svae: image_size {h}x{w} is not supported: each side must be a multiple of 4 "
                              "(two stride-2 stages), e.g. 28x28 (MNIST) or 32x32")
        if int(latent) < 1 or int(hidden) < 1:
            raise ConfigError(f"svae: latent={latent} and hidden={hidden} must be positive integers")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.image_size, self.in_channels, self.latent = (h, w), int(in_channels), int(latent)
        c1, c2 = (int(c) for c in widths)
        self._inner = (c2, h // 4, w // 4)
        flat = c2 * (h // 4) * (w // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * self.latent),
        )
        self.decoder_fc = nn.Sequential(nn.Linear(self.latent, hidden), nn.ReLU(), nn.Linear(hidden, flat), nn.ReLU())
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, in_channels, 4, stride=2, padding=1),
        )
        self.head = nn.Linear(self.latent, num_classes)
        self.disc = nn.Sequential(nn.Linear(self.latent, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"svae expects images (N, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²), each (N, d), of q(z|x) for images x in [0, 1]."""
        self._check(x)
        mu, logvar = self.encoder((x - self.mean) / self.std).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoded image in [0, 1], (N, C, H, W) (the Bernoulli means of p(x|z))."""
        return torch.sigmoid(self.decode_logits(z))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits of p(x|z) (what the reconstruction's BCE takes, numerically safer than the sigmoid)."""
        return self.decoder_conv(self.decoder_fc(z).view(-1, *self._inner))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of p(y|z), (N, num_classes)."""
        return self.head(z)

    def discriminator(self, z: torch.Tensor) -> torch.Tensor:
        """Logit (N,) of D(z) = P(z is a prior sample rather than an encoded image)."""
        return self.disc(z).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits from the posterior mean: head(μ(x))."""
        return self.classify(self.encode(x)[0])


@register_model("svae")
def svae(**kwargs) -> SupervisedVAE:
    """Supervised VAE (Tang et al. 2019): encoder, decoder, p(y|z) head and latent discriminator, for Type-I attacks."""
    return SupervisedVAE(**kwargs)
