"""Inference speed-ups for transformers' MobileViTV2: exact ones (bit-identical outputs) and faster rounding-level ones.

Two sets (choose_speedups):
- exact: patches by reshape, in-place activations, cache-sized micro-batches on the CPU, and on the CPU the
  first layers channels-last where oneDNN gives the same bits either way (checked when the model is prepared).
  Every operation that does arithmetic is transformers' own, on the same values: fp32 outputs stay
  bit-identical to transformers' (measured on 600 photos against transformers at batch 32). The fp32 default.
- all: also BatchNorm folded into the convolutions, oneDNN fused convolution + activation, channels-last.
  Each rounds differently from transformers (as far from float64 as transformers itself is, but elsewhere):
  --speedups for fp32, the default for bf16 / fp16.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

# oneDNN's fused convolution applies these activations in its epilogue, while the output is still in cache.
FUSABLE_ACTIVATIONS = {"SiLU": "swish", "SiLUActivation": "swish", "ReLU": "relu"}
# On the CPU, a batch of 32 images at 256x256 keeps activations of 100+ MB that no cache holds; four images
# at a time (or one 512x512 photo) stay in L3 and run 1.5-2x faster. GPUs want whole batches instead.
CPU_MICRO_BATCH_PIXELS = 4 * 256 * 256


@dataclass(frozen=True)
class Speedups:
    """Which rewrites optimize_for_inference applies (default_speedups chooses them per device)."""

    fold_batchnorm: bool = True
    reshape_patches: bool = True
    fuse_convolutions: bool = True  # oneDNN convolution + activation / + residual add: CPU only
    channels_last: bool = True
    # Only the leading layers channels-last, back to NCHW before the first one that would round differently
    # (use_channels_last_prefix): for the exact set, where channels_last is off.
    channels_last_prefix: bool = False
    micro_batch_pixels: int | None = CPU_MICRO_BATCH_PIXELS  # None: the whole batch in one call
    # Micro-batches run this many at a time, each on its own thread with its share of the intra-op threads.
    # 1: one after the other, every call using all of them.
    streams: int = 1

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, for run.json and benchmark tables."""
        return asdict(self)


def default_speedups(device: Any, dtype: Any, compile: bool = False) -> Speedups:
    """Every rewrite on the CPU; elsewhere no oneDNN and no channels_last (reported to slow MobileViT on CUDA).

    A model that torch.compile will see gets neither the fused oneDNN calls nor micro-batches: inductor fuses
    by itself and would trace every micro-batch. (On the CPU the eager rewrites are faster than compiling.)
    On the CPU the micro-batches run as parallel single-threaded streams: no OpenMP barrier per layer, so a
    loader worker that takes a core for a moment delays one stream instead of stalling every thread (and the
    outputs are bit-identical to one stream's; measured). The exact set keeps one stream: transformers'
    fp32 NCHW convolutions round differently with one thread than with several.
    """
    import torch

    on_cpu = getattr(device, "type", str(device)) == "cpu"
    eager_cpu = on_cpu and not compile
    return Speedups(fuse_convolutions=eager_cpu and fusion_available(), channels_last=on_cpu,
                    micro_batch_pixels=CPU_MICRO_BATCH_PIXELS if eager_cpu else None,
                    streams=torch.get_num_threads() if eager_cpu else 1)


def exact_speedups(device: Any, compile: bool = False) -> Speedups:
    """The rewrites that change no arithmetic: reshapes, in-place activations, micro-batches (eager CPU only).

    Micro-batches change which images share a convolution call, not how any output element is summed
    (oneDNN's direct kernels accumulate each output the same way for batches of 4 or more: 32 in one call =
    8 calls of 4 = 4 calls of 8, every bit; calls of 1 or 2 images may take other kernels, as transformers'
    own calls of that size do).
    """
    eager_cpu = getattr(device, "type", str(device)) == "cpu" and not compile
    return Speedups(fold_batchnorm=False, fuse_convolutions=False, channels_last=False,
                    channels_last_prefix=eager_cpu, micro_batch_pixels=CPU_MICRO_BATCH_PIXELS if eager_cpu else None)


def speedups_mode(requested: bool | None, dtype: Any) -> str:
    """--speedups (True): "all"; --no-speedups (False): "none", transformers' modules as they are; the default
    (None): "exact" for fp32, whose promise is transformers' own numbers, "all" for bf16 / fp16.

    run.json records the mode among the fields that change outputs: the rewrites move low-order bits.
    """
    import torch

    if requested is None:
        return "exact" if dtype == torch.float32 else "all"
    return "all" if requested else "none"


def choose_speedups(requested: bool | None, device: Any, dtype: Any, compile: bool = False) -> Speedups | None:
    """The rewrites of speedups_mode for this device (None: none)."""
    mode = speedups_mode(requested, dtype)
    if mode == "none":
        return None
    return exact_speedups(device, compile) if mode == "exact" else default_speedups(device, dtype, compile)


def optimize_for_inference(module: Any, device: Any, dtype: Any, channels_last: bool | None = None,
                           speedups: Speedups | None = None, compile: bool = False) -> Any:
    """Rewrite a MobileViTV2 model in place for inference on device in dtype; call it as before.

    The result is inference-only (no dropout, no gradients) and keeps `module(pixel_values=x)`, its output
    class and its hidden states. BatchNorm is folded in float64 before any cast, so bf16 loses nothing extra.
    compile=True: the caller will torch.compile the result (see default_speedups).
    """
    import torch

    if hasattr(module, "mv2batch_speedups"):
        return module  # already rewritten: a second pass would stack another input hook
    chosen = speedups or default_speedups(torch.device(device), dtype, compile)
    if channels_last is not None:
        chosen = replace(chosen, channels_last=channels_last)
    if chosen.fuse_convolutions and not _can_fuse(torch.device(device), dtype):
        chosen = replace(chosen, fuse_convolutions=False)
    module.eval().requires_grad_(False)
    if chosen.fold_batchnorm:
        fold_batchnorm(module)
    if chosen.reshape_patches:
        use_reshape_patches(module)
    module.to(device=device, dtype=dtype)
    if chosen.channels_last:
        use_channels_last(module)
    if chosen.fuse_convolutions:
        fuse_convolutions(module)
    else:
        use_inplace_activations(module)
    if chosen.micro_batch_pixels:
        use_micro_batches(module, chosen.micro_batch_pixels, chosen.streams)
    if chosen.channels_last_prefix:  # a model that is channels-last throughout needs none
        applied = not chosen.channels_last and _channels_last_prefix_applied(module, device, dtype)
        chosen = replace(chosen, channels_last_prefix=applied)
    module.mv2batch_speedups = chosen  # so that callers and benchmarks can report what was applied
    return module


def _can_fuse(device: Any, dtype: Any) -> bool:
    """oneDNN's fused kernels run on the CPU, in float32 and bfloat16."""
    import torch

    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and fusion_available()


def fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution operators."""
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _conv_layers(module: Any) -> list[Any]:
    """Every MobileViTV2ConvLayer (convolution + optional normalization + optional activation)."""
    return [m for m in module.modules() if hasattr(m, "convolution") and hasattr(m, "normalization")]


def _set_forward(module: Any, forward: Callable) -> None:
    # An instance attribute wins over the class's forward; the transformers classes stay untouched.
    module.forward = functools.partial(forward, module)


# ---- BatchNorm folding ------------------------------------------------------------------------------------


def fold_batchnorm(module: Any) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution before it; return how many were folded."""
    import torch

    folded = 0
    for layer in _conv_layers(module):
        if isinstance(layer.normalization, torch.nn.BatchNorm2d):
            _fold_into(layer.convolution, layer.normalization)
            layer.normalization = None  # the layer's own forward skips a None normalization
            folded += 1
    return folded


def _fold_into(conv: Any, bn: Any) -> None:
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


def use_reshape_patches(module: Any) -> int:
    """Replace unfold / fold in every MobileViTV2Layer by the equivalent reshape + permute; return the count."""
    layers = [m for m in module.modules() if hasattr(m, "unfolding") and hasattr(m, "folding")]
    for layer in layers:
        layer.unfolding = functools.partial(unfold_patches, patch=(layer.patch_height, layer.patch_width))
        layer.folding = functools.partial(fold_patches, patch=(layer.patch_height, layer.patch_width))
    return len(layers)


def unfold_patches(features: Any, patch: tuple[int, int]) -> tuple[Any, tuple[int, int]]:
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


def fold_patches(patches: Any, output_size: tuple[int, int], patch: tuple[int, int]) -> Any:
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


# ---- micro-batches -----------------------------------------------------------------------------------------


def use_micro_batches(module: Any, pixels_per_call: int, streams: int = 1) -> None:
    """Run each batch as micro-batches of about pixels_per_call input pixels, outputs concatenated in order;
    with streams > 1, that many micro-batches at a time on a pool of threads (module.mv2batch_streams)."""
    pool = _stream_pool(streams) if streams > 1 else None
    module.mv2batch_streams = pool
    module.forward = functools.partial(_micro_batched, module.forward, pixels_per_call, pool)


_STREAM_THREAD = threading.local()  # .active is set in the stream threads: they never wait on their own pool


def _stream_pool(streams: int) -> Any:
    """Threads that each run torch ops with their share of the intra-op threads (OpenMP settings are per thread).

    torch.set_num_threads also sets the default for threads created later, so the caller's value is put back
    once every stream thread has taken its own.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    total = torch.get_num_threads()
    per_stream = max(1, total // streams)
    started = threading.Barrier(streams + 1)

    def start() -> None:
        torch.set_num_threads(per_stream)
        # ATen sets a thread's OpenMP team size lazily, at its first parallel op, from the process-wide value,
        # which the caller puts back below: without this first call each stream would run a team of `total`.
        torch.get_num_threads()
        _STREAM_THREAD.active = True
        started.wait()

    pool = ThreadPoolExecutor(streams, thread_name_prefix="mv2batch-stream", initializer=start)
    for _ in range(streams):
        pool.submit(lambda: None)
    started.wait()
    torch.set_num_threads(total)
    return pool


def micro_batch_images(module: Any, height: int, width: int) -> int | None:
    """How many height x width images the module runs per call (None: whole batches)."""
    speedups = getattr(module, "mv2batch_speedups", None)
    pixels = speedups.micro_batch_pixels if speedups is not None else None
    return _images_per_call(pixels, height, width) if pixels else None


def _images_per_call(pixels_per_call: int, height: int, width: int) -> int:
    return max(1, pixels_per_call // (height * width))


def start_in_streams(module: Any, function: Callable, items: list) -> Callable[[], list]:
    """Start [function(item) for item in items] side by side on the module's parallel streams, where it has
    them, and return at once; calling the result waits for the list (and raises the work's errors).

    Without streams the work is done here, before returning. See one_ahead for starting the next piece of work
    before collecting this one.
    """
    return _start_on(getattr(module, "mv2batch_streams", None), function, items)


def one_ahead(module: Any, started: Iterable[T], queued: bool = False) -> Iterator[T]:
    """Pass on started work in order, each piece only once the next one has been started where the work goes on
    in the background: on the module's parallel streams (no stream then idles while the slowest finishes a
    piece), or queued on a GPU (queued=True: the GPU computes the next batch while this one's results are read
    and written). Otherwise a started piece is already done and is passed on at once, so that its results (and
    a progress update) are not held back a piece.
    """
    ahead = queued or getattr(module, "mv2batch_streams", None) is not None
    pending: list[T] = []
    for piece in started:
        pending.append(piece)
        if not ahead or len(pending) > 1:
            yield pending.pop(0)
    yield from pending


def _start_on(pool: Any, function: Callable, items: list) -> Callable[[], list]:
    """start_in_streams on a given pool (None: in this thread, now). A stream never queues on its own pool."""
    if pool is None or not items or getattr(_STREAM_THREAD, "active", False):
        results = [function(item) for item in items]
        return lambda: results
    pending = pool.map(_in_callers_mode(function), items)  # every item is submitted now
    return lambda: list(pending)


def _micro_batched(forward: Callable, pixels_per_call: int, pool: Any, pixel_values: Any = None, *args: Any,
                   **kwargs: Any) -> Any:
    if pixel_values is None or args or kwargs.get("labels") is not None:
        return forward(pixel_values, *args, **kwargs)  # a loss is not a per-image sum: leave such calls whole
    size = _images_per_call(pixels_per_call, pixel_values.shape[-2], pixel_values.shape[-1])
    if len(pixel_values) <= size:
        return forward(pixel_values, **kwargs)
    return _concatenate(_start_on(pool, functools.partial(forward, **kwargs), list(pixel_values.split(size)))())


def _in_callers_mode(function: Callable) -> Callable:
    """function wrapped in the calling thread's grad / inference mode, which other threads do not inherit."""
    import torch

    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(item: Any) -> Any:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(item)

    return call


def _concatenate(parts: list) -> Any:
    """Join per-micro-batch outputs along the batch: tensors, tuples of them (hidden states), ModelOutputs."""
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):  # transformers' ModelOutput: only the fields that are set
        return type(first)(**{key: _concatenate([part[key] for part in parts]) for key in first.keys()})
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate(list(items)) for items in zip(*parts))
    return first


# ---- memory layout -----------------------------------------------------------------------------------------


def use_channels_last(module: Any) -> None:
    """Channels-last weights, and an input converted once at the stem, so that every layer runs NHWC."""
    import torch

    module.to(memory_format=torch.channels_last)
    stem = module.get_submodule("mobilevitv2.conv_stem")
    stem.register_forward_pre_hook(_to_channels_last)


def _to_channels_last(module: Any, args: tuple) -> tuple:
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
# additions are element-wise and give the same bits in either layout. optimize_for_inference checks the whole
# model's logits on a probe both ways and drops the prefix where they differ (another CPU, another oneDNN).

SAME_BITS_MAX_PRODUCTS = 64
# Below this many input elements (one image smaller than ~128x128) ATen may run an NCHW stem outside oneDNN
# (it does for one image under 20480 elements), which rounds differently: such inputs stay NCHW.
PREFIX_MIN_ELEMENTS = 3 * 128 * 128


def use_channels_last_prefix(module: Any) -> int:
    """Run the leading convolutions that give the same bits in either layout channels-last (see above);
    how many there are (0: none, nothing changed)."""
    backbone = getattr(module, "mobilevitv2", None)
    if backbone is None or not _same_bits_either_layout(backbone.conv_stem.convolution):
        return 0
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
    backbone.conv_stem.mv2batch_channels_last = True
    backbone.conv_stem.register_forward_pre_hook(_channels_last_if_large)
    back_to_nchw.register_forward_pre_hook(_to_nchw)
    return count


def _same_bits_either_layout(conv: Any) -> bool:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    products = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return depthwise or products <= SAME_BITS_MAX_PRODUCTS


def _leading_mobilenet_layers(backbone: Any) -> Iterator[Any]:
    for layer in backbone.encoder.layer:
        if type(layer).__name__ != "MobileViTV2MobileNetLayer":
            return
        yield layer


def _leading_inverted_residuals(backbone: Any) -> Iterator[Any]:
    for layer in _leading_mobilenet_layers(backbone):
        yield from layer.layer


def _channels_last_if_large(stem: Any, args: tuple) -> tuple:
    import torch

    pixels = args[0]
    large = stem.mv2batch_channels_last and pixels.numel() >= PREFIX_MIN_ELEMENTS
    layout = torch.channels_last if large else torch.contiguous_format
    return (pixels.contiguous(memory_format=layout), *args[1:])


def _to_nchw(module: Any, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def wants_channels_last_input(module: Any) -> bool:
    """Whether the rewritten module's first layer takes channels-last pixels (the pixel stage then makes them so)."""
    speedups = getattr(module, "mv2batch_speedups", None)
    return bool(speedups and (speedups.channels_last or speedups.channels_last_prefix))


def _prefix_keeps_bits(module: Any, device: Any, dtype: Any) -> bool:
    """Whether the model's logits on a probe are bit-identical with and without the prefix."""
    import torch

    stem = module.get_submodule("mobilevitv2.conv_stem")
    probe = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0)) * 4 - 2
    probe = probe.to(device=device, dtype=dtype)
    logits = {}
    with torch.inference_mode():
        for prefix in (False, True):
            stem.mv2batch_channels_last = prefix
            logits[prefix] = module(pixel_values=probe).logits
    return torch.equal(logits[False], logits[True])


def _channels_last_prefix_applied(module: Any, device: Any, dtype: Any) -> bool:
    """use_channels_last_prefix, kept only where the probe's logits keep their bits."""
    if not use_channels_last_prefix(module):
        return False
    if _prefix_keeps_bits(module, device, dtype):
        return True
    module.get_submodule("mobilevitv2.conv_stem").mv2batch_channels_last = False  # hooks stay, no-ops on NCHW
    return False


# ---- activations and fused convolutions --------------------------------------------------------------------


def use_inplace_activations(module: Any) -> None:
    """Apply each convolution layer's activation in place: its input is a fresh tensor nobody else holds."""
    for layer in _conv_layers(module):
        if type(layer.activation).__name__ in FUSABLE_ACTIVATIONS:
            _set_forward(layer, _inplace_conv_forward)


def _inplace_conv_forward(layer: Any, features: Any) -> Any:
    import torch.nn.functional as F

    features = layer.convolution(features)
    if layer.normalization is not None:
        features = layer.normalization(features)
    if FUSABLE_ACTIVATIONS[type(layer.activation).__name__] == "relu":
        return F.relu(features, inplace=True)
    return F.silu(features, inplace=True)


def fuse_convolutions(module: Any) -> None:
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


def _fused_conv_forward(layer: Any, features: Any, residual: Any = None) -> Any:
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


def _fused_inverted_residual_forward(block: Any, features: Any) -> Any:
    hidden = block.conv_3x3(block.expand_1x1(features))
    # residual + reduce(x) as transformers writes it; addition commutes exactly, so the fused add is the same.
    return block.reduce_1x1(hidden, residual=features) if block.use_residual else block.reduce_1x1(hidden)


def _fused_transformer_layer_forward(layer: Any, hidden: Any) -> Any:
    # Dropout is the identity in eval mode, so it is left out.
    hidden = _fused_attention(layer.attention, layer.layernorm_before(hidden), residual=hidden)
    return layer.ffn.conv2(layer.ffn.conv1(layer.layernorm_after(hidden)), residual=hidden)


def _fused_attention(attention: Any, hidden: Any, residual: Any) -> Any:
    """MobileViTV2LinearSelfAttention with its output projection and residual add in one convolution."""
    import torch

    qkv = attention.qkv_proj(hidden)
    query, key, value = torch.split(qkv, [1, attention.embed_dim, attention.embed_dim], dim=1)
    scores = torch.softmax(query, dim=-1)
    context = (key * scores).sum(dim=-1, keepdim=True)
    return attention.out_proj(torch.relu(value).mul_(context), residual=residual)
