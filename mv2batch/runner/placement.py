"""Placing a described job: its weights on a device, in a dtype, with the speed-ups applied, and the pixel stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import torch

    from mv2batch.model.device import PixelStage
    from mv2batch.model.speedups import Speedups

from mv2batch.loading import resources
from mv2batch.loading.preprocess import HostPixels
from mv2batch.model import checkpoints
from mv2batch.model.speedups import CPU_MICRO_BATCH_PIXELS
from mv2batch.runner.job import Job


@dataclass(frozen=True)
class Placement:
    """A model ready to run, and what was applied to place it."""

    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module  # called as model(pixel_values=...)
    speedups: Speedups | None  # the speed-ups really applied (None: transformers' modules as they are)
    streams: ThreadPoolExecutor | None  # parallel CPU streams the model's micro-batches run on (None: one stream)
    pixel_stage: PixelStage  # uint8 NHWC batch -> the model's input
    host_pixels: HostPixels  # the workers' part of the preprocessing
    batch_size: int
    queued: bool  # a batch's work is queued on the device and read back later (CUDA), not done when started


def place(job: Job, local_rank: int | None = None,
          load_weights: Callable[[Path, str, str, bool], torch.nn.Module] = checkpoints.load_weights,
          micro_batch_pixels: int = CPU_MICRO_BATCH_PIXELS) -> Placement:
    """Pick the device, load the weights, apply the speed-ups, build the pixel stages.

    load_weights: (folder, task, model, embeddings) -> module (a test passes a stand-in model of its own);
    micro_batch_pixels: a CPU micro-batch's input pixels (a test passes a few small images' worth).
    """
    from mv2batch.model.allocator import keep_freed_memory, limit_kernel_cache
    from mv2batch.model.device import PixelStage, check_dtype, pick_device
    from mv2batch.model.speedups import wants_channels_last_input

    config = job.config
    device = pick_device(config.device, local_rank)
    check_dtype(job.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()  # reuse activation memory between layers instead of page-faulting it in again
        limit_kernel_cache()  # before the first convolution: oneDNN reads it then
    height, width = resources.typical_size(job.preprocessing.resize_crop)
    batch_size = config.batch_size or resources.default_batch_size(
        job.task.name, device, job.dtype, job.model_config.get("width_multiplier", 1.0), height * width)
    module = load_weights(job.resolved.folder, job.task.name, job.model_name, job.config.embeddings)
    model, speedups, streams = _optimized(module, device, job.dtype, config.speedups, config.compile,
                                          (height, width), micro_batch_pixels, batch_size)
    host_pixels, device_norm = job.preprocessing.stages(flip_on_host=device.type == "cpu")
    # The pixel stage emits the memory layout the optimized model runs in, so its stem need not convert.
    pixel_stage = PixelStage(device_norm, device, job.dtype, channels_last=wants_channels_last_input(speedups))
    return Placement(device, job.dtype, model, speedups, streams, pixel_stage, host_pixels, batch_size,
                     queued=device.type == "cuda")


def _optimized(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, requested: bool | None,
               compile: bool, input_size: tuple[int, int], micro_batch_pixels: int = CPU_MICRO_BATCH_PIXELS,
               batch_size: int | None = None
               ) -> tuple[torch.nn.Module, Speedups | None, ThreadPoolExecutor | None]:
    """(model, speed-ups applied, stream pool) for --speedups / --no-speedups / the default, and --compile;
    input_size and batch_size: a typical input's (height, width) and the run's batch, which the exact set's probe
    runs at."""
    import torch

    from mv2batch.model.speedups import choose_speedups, optimize_for_inference

    chosen = choose_speedups(requested, device, dtype, compile, micro_batch_pixels)
    if chosen is None:
        module, applied, streams = module.to(device=device, dtype=dtype), None, None
    else:
        # BatchNorm is folded (where chosen) in float64 before the cast; compile changes which rewrites pay.
        optimized = optimize_for_inference(module, device, dtype, speedups=chosen, compile=compile,
                                           probe_size=input_size, probe_batch=batch_size)
        module, applied, streams = optimized.module, optimized.speedups, optimized.streams
    return (torch.compile(module) if compile else module), applied, streams
