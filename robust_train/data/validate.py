"""Checks on the data itself, run once when a data module reads it: empty sets, NaN or infinite pixels, images of
the wrong channel count or size, labels out of range, image and label counts that differ. Each failure is a
ConfigError whose one-line message names the file or folder, the problem and the fix, so the CLI prints it as
`robust-train: error: ...` with exit code 2 instead of a traceback (or, worse, a run that trains on garbage).

`check_images_and_labels` checks what the data modules hand to `ImageDataModule.tensor_datasets` (NCHW); the
helpers before it turn arrays read from a file (an npz's NCHW or NHWC, uint8 or float in [0, 1]) into that form,
checking the layout before any conversion."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from robust_train.errors import ConfigError


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()
    return np.asarray(a)


def _shape(a) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def expected_shape(in_channels: int, image_size: Sequence[int]) -> str:
    h, w = image_size
    return f"(N, {in_channels}, {h}, {w})"


def check_not_empty(source: str, name: str, images) -> None:
    if len(images.shape) == 0 or images.shape[0] == 0 or int(np.prod(_shape(images))) == 0:
        raise ConfigError(f"{source}: {name} is empty (shape {_shape(images)}): the data set needs at least one "
                          "image in each of its training and test parts")


def check_pixel_values(source: str, name: str, images) -> None:
    """uint8 is always fine; other integers must lie in [0, 255]; floats must be finite and in [0, 1]."""
    a = _numpy(images)
    if a.dtype == np.uint8:
        return
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            bad = a[~finite]
            counts = ((int(np.isnan(bad).sum()), "NaN"), (int(np.isinf(bad).sum()), "infinite"))
            what = " and ".join(f"{n} {w}" for n, w in counts if n)
            raise ConfigError(f"{source}: {name} has {what} pixel value(s): replace them with values in [0, 1] "
                              "(or store the images as uint8 0-255)")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise ConfigError(f"{source}: {name} has float pixels in [{lo:g}, {hi:g}], outside [0, 1]: divide "
                              "0-255 values by 255 or store them as uint8 (the models normalise, do not standardise)")
        return
    if a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ConfigError(f"{source}: {name} has integer pixels in [{lo}, {hi}], outside 0-255: store the "
                              "images as uint8 0-255 or as floats in [0, 1]")
        return
    raise ConfigError(f"{source}: {name} has dtype {a.dtype}, not an image type: store the images as uint8 "
                      "0-255 or as floats in [0, 1]")


def image_layout(source: str, name: str, shape: Sequence[int], in_channels: int, image_size: Sequence[int]) -> str:
    """'NCHW' or 'NHWC' when `shape` holds images of `in_channels` x `image_size`, else a ConfigError that says
    what the images look like and what is expected."""
    shape = tuple(int(s) for s in shape)
    h, w = (int(s) for s in image_size)
    if len(shape) == 4 and shape[1:] == (in_channels, h, w):
        return "NCHW"
    if len(shape) == 4 and shape[1:] == (h, w, in_channels):
        return "NHWC"
    if len(shape) != 4:
        found = f"shape {shape}, not a stack of images"
    else:  # a guess at what the user has, for the message: channels last when the last axis is small
        c, hh, ww = (shape[3], shape[1], shape[2]) if shape[3] <= 4 < shape[1] else shape[1:]
        found = f"shape {shape}: {c}-channel {hh}x{ww} images"
    raise ConfigError(f"{source}: {name} has {found}, but this data set needs {in_channels}-channel {h}x{w} images, "
                      f"{expected_shape(in_channels, image_size)} or (N, {h}, {w}, {in_channels}): convert the "
                      "images, or use a data module made for them (e.g. robust_train.data.ImageFolderData, which "
                      "resizes)")


def to_uint8_nchw(source: str, name: str, images, in_channels: int, image_size: Sequence[int]) -> torch.Tensor:
    """Images read from a file, NCHW or NHWC, uint8 (or integers 0-255) or float in [0, 1], as a uint8 NCHW
    tensor. The layout and the values are checked before anything is converted. Floats become round(x * 255)."""
    a = _numpy(images)
    check_not_empty(source, name, a)
    layout = image_layout(source, name, a.shape, in_channels, image_size)
    check_pixel_values(source, name, a)
    if a.dtype.kind == "f":
        a = np.rint(a.astype(np.float64) * 255)  # float64: x * 255 of a float32 near k + 0.5 must not flip
    a = a.astype(np.uint8, copy=False)
    if layout == "NHWC":
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_labels(source: str, name: str, labels) -> torch.Tensor:
    """Labels read from a file, shape (N,) or (N, 1), integers (or floats with integer values), as int64."""
    a = _numpy(labels)
    if a.ndim == 2 and a.shape[1] == 1:  # Keras' CIFAR-10 stores y as (N, 1)
        a = a[:, 0]
    if a.ndim != 1:
        raise ConfigError(f"{source}: {name} has shape {_shape(a)}: give one integer class label per image, "
                          "shape (N,)")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise ConfigError(f"{source}: {name} holds non-integer labels (NaN, infinite or fractional): give "
                              "integer class indices 0 .. num_classes - 1")
    elif a.dtype.kind not in "iub":
        raise ConfigError(f"{source}: {name} has dtype {a.dtype}: give integer class indices 0 .. num_classes - 1")
    return torch.from_numpy(a.astype(np.int64))


def check_labels(source: str, name: str, labels, num_classes: int) -> None:
    a = _numpy(labels)
    if a.ndim != 1:
        raise ConfigError(f"{source}: {name} has shape {_shape(a)}: give one integer class label per image, "
                          "shape (N,)")
    if a.dtype.kind not in "iu":
        raise ConfigError(f"{source}: {name} has dtype {a.dtype}: give integer class indices 0 .. {num_classes - 1}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_classes:
            bad = int(((a < 0) | (a >= num_classes)).sum())
            raise ConfigError(f"{source}: {bad} of the {a.size} labels of {name} lie outside 0 .. {num_classes - 1} "
                              f"(min {lo}, max {hi}), but there are {num_classes} classes: fix the labels or use a "
                              "data module with that many classes")


def check_images_and_labels(source: str, images, labels, in_channels: int, image_size: Sequence[int],
                            num_classes: int, split: str = "training") -> None:
    """Images (N, C, H, W) as uint8 or float in [0, 1] and labels (N,) of one split, as a data module hands them
    to training: not empty, the expected channels and size, finite pixels in range, one label per image, labels in
    0 .. num_classes - 1. ConfigError (one line, naming `source`) on the first problem found."""
    name = f"the {split} set"
    check_not_empty(source, name, images)
    shape = _shape(images)
    if image_layout(source, name, shape, in_channels, image_size) != "NCHW":
        raise ConfigError(f"{source}: {name} is channels-last {shape}, expected "
                          f"{expected_shape(in_channels, image_size)}: permute the images to (N, C, H, W)")
    check_pixel_values(source, name, images)
    if len(labels.shape) == 1 and labels.shape[0] != shape[0]:
        raise ConfigError(f"{source}: {shape[0]} {split} images but {labels.shape[0]} {split} labels: give exactly "
                          "one label per image, in the same order")
    check_labels(source, name, labels, num_classes)


def read_npz(path: str | Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz file, read without unpickling; ConfigError when the file cannot be read or
    lacks one of them."""
    keys = list(keys)
    fix = f"save the data with np.savez(path, {', '.join(f'{k}=...' for k in keys)})"
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path} cannot be read as an .npz file ({type(e).__name__}): {fix}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ConfigError(f"{path} holds one array, not an .npz archive of named arrays: {fix}")
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ConfigError(f"{path} has no {', '.join(missing)} array (it has: {', '.join(z.files) or 'none'}): "
                              f"{fix}")
        try:
            return {k: z[k] for k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # object arrays, truncated members
            raise ConfigError(f"{path} cannot be read as an .npz of plain arrays ({type(e).__name__}): {fix}, "
                              "with no object arrays") from None
