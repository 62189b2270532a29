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
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from mv2batch.model.channels_last import apply_channels_last_prefix, same_outputs, use_channels_last
from mv2batch.model.rewrites import (
    fold_batchnorm,
    fold_patches,
    fuse_convolutions,
    fusion_available,
    unfold_patches,
    use_inplace_activations,
    use_reshape_patches,
)
from mv2batch.model.streams import start_in_streams, stream_pool

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

__all__ = ["Speedups", "Optimized", "optimize_for_inference", "choose_speedups", "default_speedups",
           "exact_speedups", "speedups_mode", "micro_batch_images", "wants_channels_last_input", "fold_batchnorm",
           "fold_patches", "unfold_patches"]

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
    # The exact set's promise, checked on this machine when the model is rewritten: a probe batch must give the
    # same bits micro-batched as in one call (transformers' way), or the micro-batches are dropped (oneDNN picks
    # its kernels per CPU and batch size; measured bit-identical on an AMD EPYC, not assumed elsewhere).
    keep_bits: bool = False

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, for run.json and benchmark tables."""
        return asdict(self)


def default_speedups(device: torch.device | str, dtype: torch.dtype, compile: bool = False,
                     micro_batch_pixels: int = CPU_MICRO_BATCH_PIXELS) -> Speedups:
    """Every rewrite on the CPU; elsewhere no oneDNN and no channels_last (reported to slow MobileViT on CUDA).

    A model that torch.compile will see gets neither the fused oneDNN calls nor micro-batches: inductor fuses
    by itself and would trace every micro-batch. (On the CPU the eager rewrites are faster than compiling.)
    On the CPU the micro-batches run as parallel single-threaded streams: no OpenMP barrier per layer, so a
    loader worker that takes a core for a moment delays one stream instead of stalling every thread (and the
    outputs are bit-identical to one stream's; measured). The exact set keeps one stream: transformers'
    fp32 NCHW convolutions round differently with one thread than with several. micro_batch_pixels: a CPU
    micro-batch's input pixels (a test passes a few images' worth, so that a small run is cut up).
    """
    import torch

    on_cpu = getattr(device, "type", str(device)) == "cpu"
    eager_cpu = on_cpu and not compile
    return Speedups(fuse_convolutions=eager_cpu and fusion_available(), channels_last=on_cpu,
                    micro_batch_pixels=micro_batch_pixels if eager_cpu else None,
                    streams=torch.get_num_threads() if eager_cpu else 1)


def exact_speedups(device: torch.device | str, compile: bool = False,
                   micro_batch_pixels: int = CPU_MICRO_BATCH_PIXELS) -> Speedups:
    """The rewrites that change no arithmetic: reshapes, in-place activations, micro-batches (eager CPU only).

    Micro-batches change which images share a convolution call, not how any output element is summed where
    oneDNN's kernels accumulate each output the same way whatever the batch (an AMD EPYC: 32 in one call = 8
    calls of 4 = 4 calls of 8, every bit, for batches of 4 or more). Where they do not (an Intel Xeon with AMX
    rounds 4 apart from 8), the keep_bits probe finds it and the run's batches go in whole, as transformers runs
    them. micro_batch_pixels: as default_speedups's.
    """
    eager_cpu = getattr(device, "type", str(device)) == "cpu" and not compile
    return Speedups(fold_batchnorm=False, fuse_convolutions=False, channels_last=False,
                    channels_last_prefix=eager_cpu, micro_batch_pixels=micro_batch_pixels if eager_cpu else None,
                    keep_bits=True)


def speedups_mode(requested: bool | None, dtype: torch.dtype) -> str:
    """--speedups (True): "all"; --no-speedups (False): "none", transformers' modules as they are; the default
    (None): "exact" for fp32, whose promise is transformers' own numbers, "all" for bf16 / fp16.

    run.json records the mode among the fields that change outputs: the rewrites move low-order bits.
    """
    import torch

    if requested is None:
        return "exact" if dtype == torch.float32 else "all"
    return "all" if requested else "none"


def choose_speedups(requested: bool | None, device: torch.device | str, dtype: torch.dtype, compile: bool = False,
                    micro_batch_pixels: int = CPU_MICRO_BATCH_PIXELS) -> Speedups | None:
    """The rewrites of speedups_mode for this device (None: none); micro_batch_pixels: as default_speedups's."""
    mode = speedups_mode(requested, dtype)
    if mode == "none":
        return None
    if mode == "exact":
        return exact_speedups(device, compile, micro_batch_pixels)
    return default_speedups(device, dtype, compile, micro_batch_pixels)


@dataclass(frozen=True)
class Optimized:
    """A rewritten model and what was applied to it: the rewrites, and the pool of parallel streams (None: one)."""

    module: torch.nn.Module
    speedups: Speedups
    streams: ThreadPoolExecutor | None = None


def optimize_for_inference(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype,
                           channels_last: bool | None = None,
                           speedups: Speedups | None = None, compile: bool = False,
                           probe_size: tuple[int, int] = (256, 256), probe_batch: int | None = None) -> Optimized:
    """Rewrite a MobileViTV2 model in place for inference on device in dtype; call `.module` as before.

    The module is inference-only (no dropout, no gradients) and keeps `module(pixel_values=x)`, its output
    class and its hidden states. BatchNorm is folded in float64 before any cast, so bf16 loses nothing extra.
    compile=True: the caller will torch.compile the result (see default_speedups). The result says what was
    really applied (micro-batches or a channels-last prefix a probe refused are recorded as off). probe_size:
    the (height, width) of the inputs the model will get, for the keep_bits probe; probe_batch: the batch size
    it will get (the probe's one call has as many images: oneDNN may round a batch of 32 apart from 4, as on an
    Intel Xeon with AMX, where 2 and 4 images share bits and 8, 16 and 32 share others). Rewrite a module only
    once: a second pass would stack more hooks.
    """
    import torch

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
    pool, batching = None, None
    if chosen.micro_batch_pixels:
        pool, batching = use_micro_batches(module, chosen.micro_batch_pixels, chosen.streams)
    if chosen.keep_bits and batching is not None and not _micro_batches_keep_bits(module, batching, probe_size,
                                                                                     device, dtype, probe_batch):
        batching.pixels = None  # whole batches, as transformers runs them
        chosen = replace(chosen, micro_batch_pixels=None)
    if chosen.channels_last_prefix:  # a model that is channels-last throughout needs none
        applied = not chosen.channels_last and apply_channels_last_prefix(module, device, dtype)
        chosen = replace(chosen, channels_last_prefix=applied)
    return Optimized(module, chosen, pool)


def _micro_batches_keep_bits(module: torch.nn.Module, batching: MicroBatches, size: tuple[int, int],
                             device: torch.device | str, dtype: torch.dtype, batch: int | None = None) -> bool:
    """Whether the model gives the same logits micro-batched as in one call, on a probe batch of images of the
    given size: the run's batch (at least two micro-batches), so that the one call is the one transformers
    makes. In one call the exact set computes what transformers computes (its other rewrites move values, never
    round them); run before the prefix, which has a probe of its own. The model itself is the reference: a copy
    of transformers' unmodified one would raise the run's peak memory (measured: +200 MB).

    Micro-batches of one image (whole photos for segmentation) are kept unprobed: one image per call is what
    transformers computes for one image, as its pipeline runs it, and no batch of them is more its own.
    """
    import torch

    per_call = _images_per_call(batching.pixels, *size)
    if per_call < 2:
        return True
    images = max(2 * per_call, batch or 0)
    probe = torch.rand(images, 3, *size, generator=torch.Generator().manual_seed(1)) * 4 - 2
    probe = probe.to(device=device, dtype=dtype)
    with torch.inference_mode():
        micro = module(pixel_values=probe)
        pixels, batching.pixels = batching.pixels, None
        whole = module(pixel_values=probe)
        batching.pixels = pixels
    return same_outputs(micro, whole)


def _can_fuse(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's fused kernels run on the CPU, in float32 and bfloat16."""
    import torch

    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and fusion_available()


def wants_channels_last_input(speedups: Speedups | None) -> bool:
    """Whether a model with these rewrites takes channels-last pixels in its first layer (the pixel stage then
    makes them so)."""
    return bool(speedups and (speedups.channels_last or speedups.channels_last_prefix))


# ---- micro-batches -----------------------------------------------------------------------------------------


@dataclass
class MicroBatches:
    """How many input pixels one call of the model takes (None: whole batches)."""

    pixels: int | None


def use_micro_batches(module: torch.nn.Module, pixels_per_call: int, streams: int = 1
                      ) -> tuple[ThreadPoolExecutor | None, MicroBatches]:
    """Run each batch as micro-batches of about pixels_per_call input pixels, outputs concatenated in order;
    with streams > 1, that many micro-batches at a time on a pool of threads. Returns the pool (None: one
    stream) and the setting, which may be turned off (MicroBatches.pixels = None)."""
    pool = stream_pool(streams) if streams > 1 else None
    batching = MicroBatches(pixels_per_call)
    module.forward = functools.partial(_micro_batched, module.forward, batching, pool)
    return pool, batching


def micro_batch_images(speedups: Speedups | None, height: int, width: int) -> int | None:
    """How many height x width images a model with these rewrites runs per call (None: whole batches)."""
    pixels = speedups.micro_batch_pixels if speedups is not None else None
    return _images_per_call(pixels, height, width) if pixels else None


def _images_per_call(pixels_per_call: int, height: int, width: int) -> int:
    return max(1, pixels_per_call // (height * width))


def _micro_batched(forward: Callable[..., Any], batching: MicroBatches, pool: ThreadPoolExecutor | None,
                   pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    # returns whatever the model's forward returns (a ModelOutput, a tensor, a tuple): left untyped
    if pixel_values is None or args or kwargs.get("labels") is not None or batching.pixels is None:
        return forward(pixel_values, *args, **kwargs)  # a loss is not a per-image sum: leave such calls whole
    size = _images_per_call(batching.pixels, pixel_values.shape[-2], pixel_values.shape[-1])
    if len(pixel_values) <= size:
        return forward(pixel_values, **kwargs)
    parts = list(pixel_values.split(size))
    return _concatenate(start_in_streams(pool, functools.partial(forward, **kwargs), parts)())


def _concatenate(parts: list[Any]) -> Any:  # the forward's outputs, as _micro_batched's
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

