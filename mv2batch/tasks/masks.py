"""Masks as files: lossless single-channel PNG bytes, VOC palette PNGs, and overlays for people to look at."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def voc_palette(count: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), as (count, 3) uint8."""
    palette = np.zeros((count, 3), dtype=np.uint8)
    for label in range(count):
        value, red, green, blue = label, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[label] = (red, green, blue)
    return palette


def mask_image(mask: np.ndarray) -> Image.Image:
    """Class ids as an 8-bit image, or 16-bit when a model has more than 256 classes."""
    if mask.max(initial=0) < 256:
        return Image.fromarray(mask.astype(np.uint8), mode="L")
    return Image.fromarray(mask.astype(np.uint16))


def encode_png(mask: np.ndarray) -> bytes:
    """Lossless single-channel PNG of class ids at the mask's size."""
    buffer = io.BytesIO()
    mask_image(mask).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The class-id array back from mask_png bytes."""
    return np.asarray(Image.open(io.BytesIO(data)))


def palette_png(mask: np.ndarray, num_classes: int) -> bytes:
    """A mask file viewers show in colour: VOC palette for 21-class models, plain ids otherwise."""
    image = mask_image(mask)
    if num_classes <= 256 and image.mode == "L":
        image = image.convert("P")
        image.putpalette(voc_palette().reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_palette(mask: np.ndarray) -> np.ndarray:
    """The VOC colours, enough of them for every class id in the mask (ADE20k's 150, 255 = void)."""
    return voc_palette(max(256, int(mask.max(initial=0)) + 1))


def blend(photo: Image.Image | None, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The photo (of the mask's size) blended with the coloured mask; the colours alone without a photo."""
    colours = mask_palette(mask)[mask.astype(np.int64)]
    base = np.asarray(photo.convert("RGB") if photo is not None else colours, dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + colours * alpha).astype(np.uint8))


def overlay_jpeg(photo: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> bytes:
    """The photo blended with the coloured mask."""
    buffer = io.BytesIO()
    blend(photo, mask, alpha).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def mask_file_name(item_id: str, suffix: str) -> str:
    """A file name under the masks / overlays folder that mirrors the image id (subfolders kept), and stays
    inside that folder whatever the id holds (out.safe_names: `..`, an absolute part, control characters and
    length are escaped or cut)."""
    from mv2batch.out.safe_names import safe_relative_name

    return safe_relative_name(item_id, suffix)
