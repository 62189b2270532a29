"""Preprocessing protocols: the uint8 resize / crop done in the workers, the element-wise rest on the device."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from mv2batch.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from transformers import MobileViTImageProcessorPil
    from transformers.image_utils import SizeDict

# Above this many pixels, the full resize that transformers does before cropping would cost gigabytes
# (a 1x10000 strip becomes 288x2,880,000); we then resize only the crop window, which can differ from
# transformers by one grey level on some pixels. No photo of ordinary aspect ratio comes near it.
FULL_RESIZE_MAX_PIXELS = 40_000_000

PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ResizeCrop:
    """Shortest-edge resize then centre crop, on uint8 RGB, with transformers' rounding and padding."""

    shortest_edge: int | None  # None: no resize
    crop_height: int | None  # None: no crop
    crop_width: int | None
    resample: int

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resize, as transformers' get_resize_output_image_size computes it."""
        if self.shortest_edge is None:
            return width, height
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image: Image.Image, channels: str = "RGB") -> np.ndarray:
        """Return the HWC uint8 array that the model's pixels are computed from, its channels in the order
        given ("RGB" or "BGR")."""
        new_w, new_h = self.output_size(*image.size)
        if self.crop_height is None:
            return _as_array(self._resize(image, new_w, new_h), channels)
        if new_w * new_h > FULL_RESIZE_MAX_PIXELS and new_w >= self.crop_width and new_h >= self.crop_height:
            return _as_array(self._resize_window(image, new_w, new_h), channels)
        resized = _as_array(self._resize(image, new_w, new_h), channels)
        return _center_crop(resized, self.crop_height, self.crop_width)

    def _resize(self, image: Image.Image, new_w: int, new_h: int) -> Image.Image:
        if (new_w, new_h) == image.size:
            return image
        return image.resize((new_w, new_h), resample=self.resample)

    def _resize_window(self, image: Image.Image, new_w: int, new_h: int) -> Image.Image:
        top, left = (new_h - self.crop_height) // 2, (new_w - self.crop_width) // 2
        sx, sy = image.width / new_w, image.height / new_h
        box = (left * sx, top * sy, (left + self.crop_width) * sx, (top + self.crop_height) * sy)
        return image.resize((self.crop_width, self.crop_height), resample=self.resample, box=box)


def _as_array(image: Image.Image, channels: str) -> np.ndarray:
    """An RGB image as HWC uint8 (read-only). Pillow packs its pixels into the bytes in either channel order at
    the same cost, so "BGR" here is ~0.01 ms where flipping the array afterwards is ~0.1 ms per 256x256 image."""
    if channels == "RGB":
        return np.asarray(image)
    return np.frombuffer(image.tobytes("raw", channels), dtype=np.uint8).reshape(image.height, image.width, 3)


def _center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' image_transforms.center_crop on HWC, zero-padding an image smaller than the crop."""
    height, width = array.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


@dataclass(frozen=True)
class PixelNorm:
    """The element-wise part, applied on the device to whole uint8 batches."""

    rescale_factor: float | None
    flip_bgr: bool


@dataclass(frozen=True)
class HostPixels:
    """The workers' part of a protocol: resize and crop to uint8 HWC, channels in the order the model takes
    where bgr (the protocol's BGR flip, done here instead of on the device)."""

    resize_crop: ResizeCrop
    bgr: bool = False

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.resize_crop(image, "BGR" if self.bgr else "RGB")


@dataclass(frozen=True)
class Preprocessing:
    """A named protocol: what the workers do and what the device does."""

    protocol: str
    resize_crop: ResizeCrop
    norm: PixelNorm

    def stages(self, flip_on_host: bool) -> tuple[HostPixels, PixelNorm]:
        """(the workers' part, the device's part), the BGR flip done by the workers where flip_on_host.

        Either way the model gets the same values. On the CPU the flip belongs on the host: there it is free
        while Pillow packs the pixels, whereas flipping the batch costs the model's cores ~0.1 ms per 256x256
        image (0.6 % of a bf16 run on 2 cores). On a GPU the device flips for nothing and the host is the limit.
        """
        flip = flip_on_host and self.norm.flip_bgr
        return HostPixels(self.resize_crop, bgr=flip), replace(self.norm, flip_bgr=self.norm.flip_bgr and not flip)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for run.json and the Parquet metadata."""
        info = {"protocol": self.protocol, **asdict(self.resize_crop), **asdict(self.norm)}
        info["resample"] = PIL_RESAMPLE_NAMES.get(self.resize_crop.resample, self.resize_crop.resample)
        return info


def paper_preprocessing() -> Preprocessing:
    """ml-cvnets' evaluation recipe behind Apple's published numbers: bicubic 288, centre crop 256."""
    return Preprocessing(
        protocol="paper",
        resize_crop=ResizeCrop(shortest_edge=288, crop_height=256, crop_width=256, resample=Image.BICUBIC),
        norm=PixelNorm(rescale_factor=1 / 255, flip_bgr=True),
    )


def hf_preprocessing(processor: MobileViTImageProcessorPil) -> Preprocessing:
    """The checkpoint's own MobileViTImageProcessor settings, as transformers applies them."""
    size = _shortest_edge(processor) if processor.do_resize else None
    crop = _crop(processor) if processor.do_center_crop else (None, None)
    return Preprocessing(
        protocol="hf",
        resize_crop=ResizeCrop(shortest_edge=size, crop_height=crop[0], crop_width=crop[1],
                               resample=int(processor.resample if processor.resample is not None else 2)),
        norm=PixelNorm(
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            # MobileViTImageProcessor never normalises (its do_normalize is ignored), so neither do we.
            flip_bgr=bool(getattr(processor, "do_flip_channel_order", False)),
        ),
    )


def fixed_size_preprocessing(protocol: str, processor: Callable[[], MobileViTImageProcessorPil], model: str
                             ) -> Preprocessing:
    """Classification and embeddings: the paper's protocol, or the checkpoint's processor (called only then),
    which must centre-crop: images are batched at one size."""
    if protocol == "paper":
        return paper_preprocessing()
    chosen = hf_preprocessing(processor())
    if chosen.resize_crop.crop_height is None:
        raise ConfigError(f"{model}'s preprocessor does no centre crop: classification needs fixed-size inputs")
    return chosen


def _field(size: dict[str, int] | SizeDict, key: str) -> int | None:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _shortest_edge(processor: MobileViTImageProcessorPil) -> int:
    edge = _field(processor.size, "shortest_edge")
    if edge is None:
        raise ModelError(f"unsupported preprocessor size {processor.size!r}: mv2batch expects 'shortest_edge'")
    return int(edge)


def _crop(processor: MobileViTImageProcessorPil) -> tuple[int, int]:
    height, width = _field(processor.crop_size, "height"), _field(processor.crop_size, "width")
    if height is None or width is None:
        raise ModelError(f"unsupported crop_size {processor.crop_size!r}: expected height and width")
    return int(height), int(width)
