"""Pictures for the page: tensors in [0, 1] to PNG data URIs, maps to coloured overlays, and uploads to tensors.

Everything is encoded here, on the server, with Pillow and matplotlib's colour maps, so the page needs no
image library and fetches nothing from anywhere."""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
OVERLAY_SIZE = 112  # maps are upsampled to at least this many pixels a side: smooth overlays on 28-pixel digits


class UploadError(ValueError):
    """An upload the model cannot take; the message is shown on the page as it is."""


def png_uri(array: np.ndarray) -> str:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> a data: URI."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # fast; the page is local
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) uint8."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()


def image_uri(image: torch.Tensor) -> str:
    return png_uri(to_uint8(image))


def perturbation_uri(delta: torch.Tensor) -> str:
    """x' − x amplified to fill the grey range (0.5 is no change), so that even a small ε is visible."""
    scale = float(delta.abs().max())
    return image_uri(0.5 + delta / (2 * scale) if scale > 0 else torch.full_like(delta, 0.5))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) maps -> (N, H, W), bilinear, at least OVERLAY_SIZE a side."""
    scale = max(1, -(-OVERLAY_SIZE // max(size)))
    out = (size[0] * scale, size[1] * scale)
    return F.interpolate(maps[:, None].float(), size=out, mode="bilinear", align_corners=False)[:, 0]


def heatmap_uri(values: torch.Tensor, vmin: float, vmax: float, cmap: str = "jet", alpha: float = 0.6) -> str:
    """(H, W) -> RGBA PNG through a matplotlib colour map, values mapped from [vmin, vmax]."""
    span = vmax - vmin if vmax > vmin else 1.0
    normed = ((values.detach().float().cpu() - vmin) / span).clamp(0, 1).numpy()
    rgba = colormaps[cmap](normed)
    rgba[..., 3] = alpha
    return png_uri((rgba * 255).round().astype(np.uint8))


def map_uris(maps: torch.Tensor, size: tuple[int, int]) -> list[str]:
    """Each map min-max scaled on its own (a map's ranking is what it says), jet, as overlays."""
    big = upsample(maps, size)
    return [heatmap_uri(m, float(m.min()), float(m.max())) for m in big]


def difference_uris(diffs: torch.Tensor, size: tuple[int, int]) -> list[str]:
    """Signed maps on one symmetric scale for the whole batch (blue less, red more), so growth over ε shows."""
    big = upsample(diffs, size)
    bound = float(big.abs().max()) or 1.0
    return [heatmap_uri(d, -bound, bound, cmap="RdBu_r", alpha=0.85) for d in big]


def describe_bands(bands: tuple[str, ...]) -> str:
    names = {1: "grayscale (1 channel)", 3: "colour (3 channels)"}
    colour = [b for b in bands if b != "A"]
    return names.get(len(colour), f"{len(colour)} channels ({''.join(bands)})")


def decode_upload(data: bytes, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A PNG or JPEG upload -> (1, channels, H, W) in [0, 1], resized to the model's input; UploadError saying
    what is wrong and what to do otherwise. A transparent background is composited on black (MNIST's)."""
    if not data:
        raise UploadError("the upload is empty: choose a PNG or JPEG file")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"the file is {len(data) / 2**20:.1f} MB; upload an image under "
                          f"{MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        image = Image.open(io.BytesIO(data))
        kind = image.format
        if kind not in ("PNG", "JPEG"):
            raise UploadError(f"the file is {kind or 'not an image'}, not PNG or JPEG: save it as PNG or JPEG")
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise UploadError(f"the image is {image.width}×{image.height} pixels; upload one of at most "
                              "4096×4096 (it is resized to the model's input anyway)")
        image.load()
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise UploadError("the file is not a readable PNG or JPEG image: choose an image file") from None
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I", "F"):
        image = image.convert("L")
    bands = image.getbands()
    colour = len([b for b in bands if b != "A"])
    if colour != channels:
        want = describe_bands(("L",) if channels == 1 else ("R", "G", "B"))
        raise UploadError(f"the model reads {want} images and this one is {describe_bands(bands)}: "
                          f"convert it to {'grayscale' if channels == 1 else 'RGB'} first")
    if "A" in bands:
        background = Image.new("RGBA" if channels == 3 else "LA", image.size)
        image = Image.alpha_composite(background, image.convert(background.mode))
    image = image.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (array[None] if channels == 1 else array.permute(2, 0, 1))[None].contiguous()
