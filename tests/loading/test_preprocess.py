"""The worker + device stages reproduce transformers' MobileViTImageProcessor pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mv2batch.loading.preprocess import (
    FULL_RESIZE_MAX_PIXELS,
    PixelNorm,
    ResizeCrop,
    hf_preprocessing,
    paper_preprocessing,
)
from mv2batch.model.device import PixelStage, rescale, rescale_by_lookup


def _processor(shortest_edge: int, crop: int, resample: int):
    from transformers import MobileViTImageProcessorPil

    return MobileViTImageProcessorPil(size={"shortest_edge": shortest_edge},
                                      crop_size={"height": crop, "width": crop}, resample=resample)


def _ours(processor, image: Image.Image) -> torch.Tensor:
    preprocessing = hf_preprocessing(processor)
    pixels = torch.from_numpy(np.ascontiguousarray(preprocessing.resize_crop(image))[None])
    return PixelStage(preprocessing.norm, torch.device("cpu"), torch.float32)(pixels)


# Odd sizes, both orientations, and sizes where only one of the two resize passes runs (288 x ..., ... x 288).
SIZES = [(1, 1), (1, 300), (300, 1), (31, 17), (64, 64), (500, 375), (375, 500), (257, 256), (1023, 7), (288, 431),
         (431, 288), (289, 1000)]


@pytest.mark.parametrize("resample", [Image.BILINEAR, Image.BICUBIC])
@pytest.mark.parametrize("edge_crop", [(288, 256), (72, 64), (32, 48), (65, 63)])
def test_pixels_are_bit_identical_to_the_image_processor(resample, edge_crop):
    rng = np.random.default_rng(0)
    processor = _processor(*edge_crop, resample)
    for width, height in SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        assert torch.equal(_ours(processor, image), expected), (width, height)


@pytest.mark.parametrize("flip_on_host", [False, True])
@pytest.mark.parametrize("flip_channels", [True, False])
def test_pixels_are_the_image_processors_whichever_stage_flips_the_channels(flip_on_host, flip_channels):
    """The BGR flip runs in the workers (the CPU) or on the device (a GPU): the same pixels either way."""
    from transformers import MobileViTImageProcessorPil

    processor = MobileViTImageProcessorPil(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64},
                                           do_flip_channel_order=flip_channels)
    host, norm = hf_preprocessing(processor).stages(flip_on_host)
    assert (host.bgr, norm.flip_bgr) == (flip_on_host and flip_channels, flip_channels and not flip_on_host)
    rng = np.random.default_rng(4)
    for width, height in SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = torch.from_numpy(np.stack([host(image)]))
        assert torch.equal(PixelStage(norm, torch.device("cpu"), torch.float32)(pixels), expected), (width, height)


def test_crop_larger_than_resized_image_is_zero_padded_like_transformers():
    processor = _processor(32, 48, Image.BILINEAR)
    image = Image.new("RGB", (40, 32), (255, 128, 0))
    ours = _ours(processor, image)
    assert ours.shape == (1, 3, 48, 48)
    assert ours[0, :, 0, 0].abs().sum() == 0  # the padding
    assert torch.equal(ours, processor(images=image, return_tensors="pt")["pixel_values"])


def test_rescale_matches_numpy_float64_route_for_every_uint8_value():
    values = torch.arange(256, dtype=torch.uint8)
    for factor in (1 / 255, 1 / 127.5, 0.0039):
        expected = (np.arange(256, dtype=np.float64) * factor).astype(np.float32)
        assert np.array_equal(rescale(values, factor).numpy(), expected), factor
        assert np.array_equal(rescale_by_lookup(values, factor).numpy(), expected), factor


@pytest.mark.parametrize("channels_last", [False, True])
def test_rescale_by_lookup_keeps_the_layout(channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8).contiguous(memory_format=layout)
    out = rescale_by_lookup(pixels, 1 / 255)
    assert out.is_contiguous(memory_format=layout) and torch.equal(out, rescale(pixels, 1 / 255))


def test_rescale_looks_values_up_off_the_cpu():
    """Off the CPU (CUDA's division by a scalar is a multiplication by its float32 reciprocal) the stage must not
    divide: checked on the meta device, where no kernel runs."""
    looked_up = []

    def spy(x, factor):
        looked_up.append(factor)
        return x.float()

    rescale(torch.zeros((1, 3, 2, 2), dtype=torch.uint8, device="meta"), 1 / 255, lookup=spy)
    assert looked_up == [1 / 255]


def test_bgr_flip_and_nchw_layout():
    stage = PixelStage(paper_preprocessing().norm, torch.device("cpu"), torch.float32)
    pixels = torch.zeros((1, 2, 2, 3), dtype=torch.uint8)
    pixels[..., 0] = 255  # pure red
    out = stage(pixels)
    assert out.shape == (1, 3, 2, 2)
    assert torch.all(out[0, 2] == 1) and torch.all(out[0, :2] == 0)  # red went to the last channel (BGR)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [PixelNorm(1 / 255, True), PixelNorm(1 / 255, False), PixelNorm(0.5, True),
                                  PixelNorm(None, False)])
def test_pixel_stage_equals_rescale_then_flip_then_layout(norm, dtype, channels_last):
    """The stage flips and lays out uint8 before converting: the same bits as converting first, in the layout asked."""
    pixels = torch.randint(0, 256, (3, 17, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = rescale(pixels, norm.rescale_factor)
    expected = (expected.flip(-1) if norm.flip_bgr else expected).permute(0, 3, 1, 2)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = PixelStage(norm, torch.device("cpu"), dtype, channels_last=channels_last)(pixels)
    assert torch.equal(out, expected.to(dtype)) and out.dtype == dtype
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pixels_are_the_float32_ones_cast_for_every_uint8_value(dtype):
    """bf16 / fp16 pixels come straight from uint8 (no float32 pass): every value, through the vectorised kernels
    (a whole batch) and the scalar tail, equals rescaling to float32 then casting."""
    values = torch.arange(256, dtype=torch.uint8)
    shape = (2, 37, 41, 3)  # 9102 values: not a whole number of vectors
    pixels = values.repeat(9102 // 256 + 1)[:9102].reshape(shape)
    norm = PixelNorm(1 / 255, False)
    out = PixelStage(norm, torch.device("cpu"), dtype, channels_last=True)(pixels)
    expected = rescale(pixels, 1 / 255).permute(0, 3, 1, 2).to(dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    assert set(pixels.unique().tolist()) == set(range(256))


def test_paper_protocol_is_bicubic_288_then_256():
    paper = paper_preprocessing()
    assert (paper.resize_crop.shortest_edge, paper.resize_crop.crop_height) == (288, 256)
    assert paper.resize_crop.resample == Image.BICUBIC
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    expected = _processor(288, 256, Image.BICUBIC)(images=image, return_tensors="pt")["pixel_values"]
    pixels = torch.from_numpy(np.ascontiguousarray(paper.resize_crop(image))[None])
    assert torch.equal(PixelStage(paper.norm, torch.device("cpu"), torch.float32)(pixels), expected)


def test_extreme_strip_resizes_only_the_crop_window_and_stays_close():
    """A 1x1000 strip would need a 288x288,000 intermediate; the window resize is within one grey level."""
    resize_crop = ResizeCrop(shortest_edge=288, crop_height=256, crop_width=256, resample=Image.BILINEAR)
    strip = Image.fromarray(np.random.default_rng(2).integers(0, 256, (1000, 1, 3), dtype=np.uint8))
    new_w, new_h = resize_crop.output_size(*strip.size)
    assert new_w * new_h > FULL_RESIZE_MAX_PIXELS
    window = resize_crop(strip).astype(int)
    full = np.asarray(strip.resize((new_w, new_h), Image.BILINEAR))
    top = (new_h - 256) // 2
    assert window.shape == (256, 256, 3)
    assert np.abs(window - full[top : top + 256, :256].astype(int)).max() <= 1
