"""Shape-bias probes (Zhang & Zhu, "Interpreting Adversarially Trained Convolutional Neural Networks", ICML 2019,
code PKUAI26/AT-CNN): image transforms that keep shapes and destroy texture (saturation) or keep local texture and
destroy shape (patch shuffling). A model relying on shapes keeps its accuracy under the first and loses it under
the second; the paper finds adversarially trained CNNs do better under saturation and worse under shuffling.

    saturation, level p > 0:  v' = sign(2v − 1)·|2v − 1|^(2/p)·½ + ½ on [0, 1] images (before normalisation);
                               p = 2 is the identity, large p pushes every pixel to 0 or 1.
    patch_shuffle, level k:   the image cut into a k×k grid of patches, the patches permuted at random (one
                               permutation per image, from a seeded generator). Where k does not divide the side,
                               the first (side mod k) rows/columns of patches are one pixel larger, and a patch only
                               moves to a place of its own size (the grid of sizes is kept), so nothing is resampled.
"""
from __future__ import annotations

import math
import torch

from robust_train.errors import ConfigError
from robust_train.registry import Registry

PROBES: Registry = Registry("probe")


class Probe:
    """A transform with levels: `probe(x, level, generator)` on images in [0, 1]; `check_level` refuses a level
    out of range with one line naming it."""

    levels: tuple = ()

    def check_level(self, level, side: int | None = None):
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, level, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@PROBES.register("saturation")
class Saturation(Probe):
    """Saturation: sign(2v − 1)·|2v − 1|^(2/p)·½ + ½ (shapes kept, texture flattened)."""

    levels = (1, 4, 8, 16, 64, 1024)

    def check_level(self, level, side: int | None = None) -> float:
        try:
            p = math.nan if isinstance(level, bool) else float(level)
        except (TypeError, ValueError):
            p = math.nan
        if not math.isfinite(p) or p <= 0:
            raise ConfigError(f"saturation level {level} is out of range: use p > 0 (2 is the identity, 1024 "
                              "binarises)")
        return p

    def __call__(self, x, level, generator=None):
        centred = 2 * x - 1
        return (centred.sign() * centred.abs().pow(2.0 / float(level)) * 0.5 + 0.5).clamp(0, 1)


def _cuts(side: int, k: int) -> list[int]:
    base, extra = divmod(side, k)
    sizes = [base + 1] * extra + [base] * (k - extra)
    return [0, *torch.tensor(sizes).cumsum(0).tolist()]


@PROBES.register("patch_shuffle")
class PatchShuffle(Probe):
    """Patch shuffling: the k×k grid of patches permuted (texture kept, shape destroyed)."""

    levels = (2, 4, 8)

    def check_level(self, level, side: int | None = None) -> int:
        try:
            k = float(level)
        except (TypeError, ValueError):
            k = math.nan
        if isinstance(level, bool) or not math.isfinite(k) or k != int(k) or k < 2:
            raise ConfigError(f"patch_shuffle level {level} is out of range: use a whole number of patches per "
                              "side, at least 2")
        if side is not None and k > side:
            raise ConfigError(f"patch_shuffle level {level} is out of range: the images are only {side} pixels a "
                              "side")
        return int(k)

    def __call__(self, x, level, generator=None):
        k = int(level)
        n, _, h, w = x.shape
        rows, cols = _cuts(h, k), _cuts(w, k)
        cells = [(i, j) for i in range(k) for j in range(k)]
        size = {c: (rows[c[0] + 1] - rows[c[0]], cols[c[1] + 1] - cols[c[1]]) for c in cells}
        out = x.clone()
        for b in range(n):
            for shape in sorted(set(size.values())):
                group = [c for c in cells if size[c] == shape]
                order = torch.randperm(len(group), generator=generator).tolist()
                for dst, src in zip(group, (group[o] for o in order)):
                    out[b, :, rows[dst[0]]:rows[dst[0] + 1], cols[dst[1]]:cols[dst[1] + 1]] = \
                        x[b, :, rows[src[0]]:rows[src[0] + 1], cols[src[1]]:cols[src[1] + 1]]
        return out


def parse_probes(text: str | None) -> list[str]:
    """'saturation,patch_shuffle' -> the names, each checked; None -> []."""
    if text is None:
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--probes {text!r} names no probe: use {', '.join(PROBES.names())}, or --probes alone "
                          "for all")
    for name in names:
        PROBES.get(name)
    return names
