"""Memory layout: a model channels-last throughout, or only its first layers where oneDNN gives the same bits."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch
    from transformers.models.mobilevitv2.modeling_mobilevitv2 import (
        MobileViTV2InvertedResidual,
        MobileViTV2MobileNetLayer,
        MobileViTV2Model,
    )
    from transformers.utils import ModelOutput


def use_channels_last(module: torch.nn.Module) -> None:
    """Channels-last weights, and an input converted once at the stem, so that every layer runs NHWC."""
    import torch

    module.to(memory_format=torch.channels_last)
    stem = module.get_submodule("mobilevitv2.conv_stem")
    stem.register_forward_pre_hook(_to_channels_last)


def _to_channels_last(module: torch.nn.Module, args: tuple) -> tuple:
    import torch

    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


# ---- the exact set's channels-last prefix ------------------------------------------------------------------
#
# On the CPU, transformers' NCHW convolutions each pay two oneDNN reorders, into its blocked layout and back:
# a quarter of the exact set's time on a 512x683 photo (32.9 of 94.5 ms inside oneDNN), most of it in the first
# layers, whose activations are the largest. oneDNN's channels-last kernels skip them, and for depthwise
# convolutions and those summing at most 64 products per output (MobileViTV2's stem and first blocks) they give
# the same bits as the blocked ones: on this project's CPU (AVX-512, oneDNN 3.12) over 193 input shapes (every
# whole-photo shape of the benchmark photos, 256x256 at batch 1-8), with 1 and 2 threads. Wider 1x1
# convolutions differ at some shapes (6e-8 to 1.4e-5). So the exact set runs the stem and the leading blocks made
# only of such convolutions channels-last and returns to NCHW before the first other one; BatchNorm, SiLU and
# additions are element-wise and give the same bits in either layout. apply_channels_last_prefix checks the whole
# model's logits on a probe both ways and drops the prefix where they differ (another CPU, another oneDNN).

SAME_BITS_MAX_PRODUCTS = 64
# Below this many input elements (one image smaller than ~128x128) ATen may run an NCHW stem outside oneDNN
# (it does for one image under 20480 elements), which rounds differently: such inputs stay NCHW.
PREFIX_MIN_ELEMENTS = 3 * 128 * 128


@dataclass
class PrefixSwitch:
    """Whether the prefix's stem hook makes large inputs channels-last: the probe turns it off where bits differ."""

    on: bool = True


StemHook = Callable[[PrefixSwitch, "torch.nn.Module", tuple], tuple]


def use_channels_last_prefix(module: torch.nn.Module, stem_hook: StemHook | None = None
                             ) -> tuple[int, PrefixSwitch | None]:
    """Run the leading convolutions that give the same bits in either layout channels-last (see above): how
    many there are and the switch of the stem's hook (0, None: none, nothing changed).

    stem_hook: what turns the stem's input channels-last (channels_last_if_large; a test passes one that
    rounds differently, as another CPU's kernels may).
    """
    backbone = getattr(module, "mobilevitv2", None)
    if backbone is None or not _same_bits_either_layout(backbone.conv_stem.convolution):
        return 0, None
    count, back_to_nchw = 1, None
    for block in _leading_inverted_residuals(backbone):
        layers = [block.expand_1x1, block.conv_3x3, block.reduce_1x1]
        same = [_same_bits_either_layout(layer.convolution) for layer in layers]
        if all(same):
            count += len(layers)
            continue
        if block.use_residual:
            back_to_nchw = block  # its residual would carry a channels-last tensor past the prefix
        else:
            back_to_nchw = layers[same.index(False)]
            count += same.index(False)
        break
    else:
        back_to_nchw = backbone.encoder.layer[len(list(_leading_mobilenet_layers(backbone)))]
    switch = PrefixSwitch()
    backbone.conv_stem.register_forward_pre_hook(functools.partial(stem_hook or channels_last_if_large, switch))
    back_to_nchw.register_forward_pre_hook(_to_nchw)
    return count, switch


def _same_bits_either_layout(conv: torch.nn.Conv2d) -> bool:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    products = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return depthwise or products <= SAME_BITS_MAX_PRODUCTS


def _leading_mobilenet_layers(backbone: MobileViTV2Model) -> Iterator[MobileViTV2MobileNetLayer]:
    for layer in backbone.encoder.layer:
        if type(layer).__name__ != "MobileViTV2MobileNetLayer":
            return
        yield layer


def _leading_inverted_residuals(backbone: MobileViTV2Model) -> Iterator[MobileViTV2InvertedResidual]:
    for layer in _leading_mobilenet_layers(backbone):
        yield from layer.layer


def channels_last_if_large(switch: PrefixSwitch, stem: torch.nn.Module, args: tuple) -> tuple:
    """The stem's pre-hook: large inputs channels-last while the switch is on, every other input NCHW."""
    import torch

    pixels = args[0]
    large = switch.on and pixels.numel() >= PREFIX_MIN_ELEMENTS
    layout = torch.channels_last if large else torch.contiguous_format
    return (pixels.contiguous(memory_format=layout), *args[1:])


def _to_nchw(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _prefix_keeps_bits(module: torch.nn.Module, switch: PrefixSwitch, device: torch.device | str,
                       dtype: torch.dtype) -> bool:
    """Whether the model's outputs on a probe are bit-identical with and without the prefix."""
    import torch

    probe = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0)) * 4 - 2
    probe = probe.to(device=device, dtype=dtype)
    outputs = {}
    with torch.inference_mode():
        for prefix in (False, True):
            switch.on = prefix
            outputs[prefix] = module(pixel_values=probe)
    return same_outputs(outputs[False], outputs[True])


def same_outputs(first: ModelOutput, second: ModelOutput) -> bool:
    """Whether two model outputs hold the same bits in every tensor a task reads: logits, and the pooled vector
    of embeddings.pooled_model (embed has no logits)."""
    import torch

    names = [name for name in ("logits", "pooler_output") if getattr(first, name, None) is not None]
    return bool(names) and all(torch.equal(getattr(first, name), getattr(second, name)) for name in names)


def apply_channels_last_prefix(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype,
                               stem_hook: StemHook | None = None) -> bool:
    """use_channels_last_prefix, kept only where the probe's logits keep their bits on this machine (the hooks
    stay, switched off: no-ops on NCHW input)."""
    count, switch = use_channels_last_prefix(module, stem_hook)
    if not count:
        return False
    switch.on = _prefix_keeps_bits(module, switch, device, dtype)
    return switch.on
