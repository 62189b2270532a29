"""Model rewrites that keep transformers' MobileViTV2 modules: BatchNorm folded, patches by reshape, in-place
activations, oneDNN's fused convolutions. speed.optimize_for_inference chooses which apply."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from transformers.models.mobilevitv2.modeling_mobilevitv2 import (
        MobileViTV2ConvLayer,
        MobileViTV2InvertedResidual,
        MobileViTV2LinearSelfAttention,
        MobileViTV2TransformerLayer,
    )

# oneDNN's fused convolution applies these activations in its epilogue, while the output is still in cache.
FUSABLE_ACTIVATIONS = {"SiLU": "swish", "SiLUActivation": "swish", "ReLU": "relu"}


def fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution operators."""
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _conv_layers(module: torch.nn.Module) -> list[MobileViTV2ConvLayer]:
    """Every MobileViTV2ConvLayer (convolution + optional normalization + optional activation)."""
    return [m for m in module.modules() if hasattr(m, "convolution") and hasattr(m, "normalization")]


def _set_forward(module: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> None:
    # An instance attribute wins over the class's forward; the transformers classes stay untouched.
    module.forward = functools.partial(forward, module)


# ---- BatchNorm folding ------------------------------------------------------------------------------------


def fold_batchnorm(module: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution before it; return how many were folded."""
    import torch

    folded = 0
    for layer in _conv_layers(module):
        if isinstance(layer.normalization, torch.nn.BatchNorm2d):
            _fold_into(layer.convolution, layer.normalization)
            layer.normalization = None  # the layer's own forward skips a None normalization
            folded += 1
    return folded


def _fold_into(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """conv(x) * s + (beta - mean * s) with s = gamma / sqrt(var + eps), computed in float64 then cast back."""
    import torch

    dtype = conv.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
    conv.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = torch.nn.Parameter(((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(dtype),
                                   requires_grad=False)


# ---- patches by reshape ------------------------------------------------------------------------------------


def use_reshape_patches(module: torch.nn.Module) -> int:
    """Replace unfold / fold in every MobileViTV2Layer by the equivalent reshape + permute; return the count."""
    layers = [m for m in module.modules() if hasattr(m, "unfolding") and hasattr(m, "folding")]
    for layer in layers:
        layer.unfolding = functools.partial(unfold_patches, patch=(layer.patch_height, layer.patch_width))
        layer.folding = functools.partial(fold_patches, patch=(layer.patch_height, layer.patch_width))
    return len(layers)


def unfold_patches(features: torch.Tensor, patch: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B, C, ph*pw, patches), as F.unfold + reshape, in the input's memory layout.

    unfold drops the rows and columns that do not fill a whole patch; so does this.
    """
    import torch

    batch, channels, height, width = features.shape
    (ph, pw), (nh, nw) = patch, (height // patch[0], width // patch[1])
    cropped = features[:, :, : nh * ph, : nw * pw]
    if features.is_contiguous(memory_format=torch.channels_last) and channels > 1:
        # Stay channels-last: (B, nh, ph, nw, pw, C) -> (B, ph, pw, nh, nw, C) is one copy, no transpose of C.
        nhwc = cropped.permute(0, 2, 3, 1).reshape(batch, nh, ph, nw, pw, channels)
        patches = nhwc.permute(0, 2, 4, 1, 3, 5).reshape(batch, ph * pw, nh * nw, channels).permute(0, 3, 1, 2)
    else:
        patches = cropped.reshape(batch, channels, nh, ph, nw, pw).permute(0, 1, 3, 5, 2, 4)
        patches = patches.reshape(batch, channels, ph * pw, nh * nw)
    return patches, (height, width)


def fold_patches(patches: torch.Tensor, output_size: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """The inverse of unfold_patches, as F.fold: pixels no patch covered are zero."""
    import torch

    batch, channels, _, _ = patches.shape
    (ph, pw), (height, width) = patch, output_size
    nh, nw = height // ph, width // pw
    if patches.is_contiguous(memory_format=torch.channels_last) and channels > 1:
        nhwc = patches.permute(0, 2, 3, 1).reshape(batch, ph, pw, nh, nw, channels)
        features = nhwc.permute(0, 3, 1, 4, 2, 5).reshape(batch, nh * ph, nw * pw, channels).permute(0, 3, 1, 2)
    else:
        features = patches.reshape(batch, channels, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3)
        features = features.reshape(batch, channels, nh * ph, nw * pw)
    if (nh * ph, nw * pw) != (height, width):
        features = torch.nn.functional.pad(features, (0, width - nw * pw, 0, height - nh * ph))
    return features



# ---- activations and fused convolutions --------------------------------------------------------------------


def use_inplace_activations(module: torch.nn.Module) -> None:
    """Apply each convolution layer's activation in place: its input is a fresh tensor nobody else holds."""
    for layer in _conv_layers(module):
        if type(layer.activation).__name__ in FUSABLE_ACTIVATIONS:
            _set_forward(layer, _inplace_conv_forward)


def _inplace_conv_forward(layer: MobileViTV2ConvLayer, features: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    features = layer.convolution(features)
    if layer.normalization is not None:
        features = layer.normalization(features)
    if FUSABLE_ACTIVATIONS[type(layer.activation).__name__] == "relu":
        return F.relu(features, inplace=True)
    return F.silu(features, inplace=True)


def fuse_convolutions(module: torch.nn.Module) -> None:
    """Run every convolution as one oneDNN call with its activation or its residual add (BatchNorm folded first)."""
    for layer in _conv_layers(module):
        if layer.normalization is not None:
            raise ValueError("fuse_convolutions needs folded BatchNorm: call fold_batchnorm first")
        _set_forward(layer, _fused_conv_forward)
    for block in module.modules():
        name = type(block).__name__
        if name == "MobileViTV2InvertedResidual":
            _set_forward(block, _fused_inverted_residual_forward)
        elif name == "MobileViTV2TransformerLayer":
            _set_forward(block, _fused_transformer_layer_forward)


def _fused_conv_forward(layer: MobileViTV2ConvLayer, features: torch.Tensor, residual: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """convolution (+ activation) in one call; with residual, convolution + residual (the layer has no activation)."""
    import torch

    conv = layer.convolution
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    unary = FUSABLE_ACTIVATIONS.get(type(layer.activation).__name__, "none") if layer.activation else "none"
    if residual is not None and layer.activation is None:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            features, residual, conv.weight, conv.bias, *geometry, "add", None, None, [], None)
    out = torch.ops.mkldnn._convolution_pointwise(features, conv.weight, conv.bias, *geometry, unary, [], "")
    if layer.activation is not None and unary == "none":
        out = layer.activation(out)  # an activation oneDNN cannot fuse: applied as transformers does
    return out if residual is None else out + residual


def _fused_inverted_residual_forward(block: MobileViTV2InvertedResidual, features: torch.Tensor) -> torch.Tensor:
    hidden = block.conv_3x3(block.expand_1x1(features))
    # residual + reduce(x) as transformers writes it; addition commutes exactly, so the fused add is the same.
    return block.reduce_1x1(hidden, residual=features) if block.use_residual else block.reduce_1x1(hidden)


def _fused_transformer_layer_forward(layer: MobileViTV2TransformerLayer, hidden: torch.Tensor) -> torch.Tensor:
    # Dropout is the identity in eval mode, so it is left out.
    hidden = _fused_attention(layer.attention, layer.layernorm_before(hidden), residual=hidden)
    return layer.ffn.conv2(layer.ffn.conv1(layer.layernorm_after(hidden)), residual=hidden)


def _fused_attention(attention: MobileViTV2LinearSelfAttention, hidden: torch.Tensor, residual: torch.Tensor
                     ) -> torch.Tensor:
    """MobileViTV2LinearSelfAttention with its output projection and residual add in one convolution."""
    import torch

    qkv = attention.qkv_proj(hidden)
    query, key, value = torch.split(qkv, [1, attention.embed_dim, attention.embed_dim], dim=1)
    scores = torch.softmax(query, dim=-1)
    context = (key * scores).sum(dim=-1, keepdim=True)
    return attention.out_proj(torch.relu(value).mul_(context), residual=residual)
