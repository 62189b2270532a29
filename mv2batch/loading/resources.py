"""Resource policy: loader workers, images per forward pass, decoding between passes, this process's cores.

Each figure below was measured (docs/benchmarks.md); where a bound sits between two measured machines, the
comment says it is a judgment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mv2batch.loading.gate_trial import GateTrial
    from mv2batch.loading.preprocess import ResizeCrop
    from mv2batch.loading.shared_batches import SharedMemory

# A bound on memory, not a measured optimum: each worker keeps its prefetched batches (50 MB each at batch 256) in
# shared memory. Measured on a 16-core GPU machine: about 240 images/s per worker, 3,657 images/s with 15.
MAX_GPU_WORKERS = 32
DECODE_GAPS_MAX_CORES = 4  # measured at 2 (pays) and 16 (does not); between the two, a judgment

DEFAULT_BATCH_SIZE = 32
# Measured on an H200 (docs/benchmarks.md): the fp32 model alone peaks at 5.7 GiB for 256 images of 256x256 at width
# 1.0 (3.0 GiB at 0.5, 11.3 at 2.0: about linear in the width); end to end, 256 per pass ran 20 % (fp32) and
# 28 % (bf16) faster than 32.
GPU_BYTES_PER_IMAGE = 23 * 2**20  # one 256x256 image, width 1.0, float32
GPU_BATCH_SIZES = (256, 128, 64)


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def model_threads() -> int:
    """The intra-op threads one forward pass runs on."""
    import torch

    return torch.get_num_threads()


def decode_between_passes(device_type: str, streams: ThreadPoolExecutor | None, threads: int | None = None,
                          available: int | None = None) -> bool:
    """Whether loader workers may decode only between forward passes (loader.DecodeGate); whether they do is
    measured in the run's first batches (gate_trial.GateTrial: on 2 cores of an Intel Xeon the gate cost what
    it saved on an AMD EPYC).

    A candidate on a CPU of at most DECODE_GAPS_MAX_CORES cores when one OpenMP team of several threads runs each pass
    (the exact set, --no-speedups, --compile: no pool of parallel streams). Measured on 2 cores: the exact set at
    90 % of the model alone this way against 86 % with a worker beside the team. On a 16-core machine it did not
    pay (69-82 images/s against 81-106 with workers beside a 16-thread team: its threads wait for each other on
    small micro-batches anyway, and the workers use those moments). Parallel single-threaded streams are not
    stalled by a busy core, and a GPU computes while the host decodes.
    threads / available: the team's threads and this process's cores (default: as they are here).
    """
    threads = model_threads() if threads is None else threads
    available = cores() if available is None else available
    return device_type == "cpu" and streams is None and threads > 1 and available <= DECODE_GAPS_MAX_CORES


def default_workers(device_type: str, environ: dict | None = None, between_passes: bool = False,
                    available: int | None = None) -> int:
    """Loader workers for one process. On the CPU the model needs the cores too: half of them, at most 4;
    every core, at most 4, where the workers decode only between passes (between_passes: they never compete
    with the model).

    On a GPU the input is the limit (decoding ~240 photos/s per worker against 9,000 images/s of bf16 model on
    an H200), so every core but one of this process's share: the CPUs it may run on, divided among the
    processes that torchrun or Slurm start on this host, unless its affinity already gives it only its own.
    """
    share = cores() if available is None else available
    if device_type == "cpu":
        return max(1, min(4, share if between_passes else share // 2))
    if share >= (os.cpu_count() or share):
        share //= _processes_on_this_host(os.environ if environ is None else environ)
    return max(1, min(MAX_GPU_WORKERS, share - 1))


def _processes_on_this_host(environ: dict) -> int:
    """torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks per node ("4" or "4(x2)"), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        digits = re.match(r"\d+", environ.get(name, ""))
        if digits and int(digits.group()) > 0:
            return int(digits.group())
    return 1


def default_batch_size(task: str, device: torch.device, dtype: torch.dtype, width: float, pixels: int) -> int:
    """Images per forward pass when --batch-size is not given.

    Classification on a GPU: the largest of 256 / 128 / 64 whose activations take at most half the free device
    memory. Otherwise 32: the CPU cuts batches into cache-sized micro-batches whatever their size, and a
    segmentation batch holds whole photos, grouped by shape.
    """
    import torch

    if device.type != "cuda" or task not in ("classify", "embed"):  # fixed-size inputs
        return DEFAULT_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    per_image = GPU_BYTES_PER_IMAGE * width * pixels / 256**2 * dtype.itemsize / 4
    return next((size for size in GPU_BATCH_SIZES if size * per_image <= free / 2), DEFAULT_BATCH_SIZE)


def typical_size(resize_crop: ResizeCrop) -> tuple[int, int]:
    """(height, width) of one model input: exact with a crop; else as for a 4:3 photo."""
    if resize_crop.crop_height is not None:
        return resize_crop.crop_height, resize_crop.crop_width
    if resize_crop.shortest_edge is not None:
        return resize_crop.shortest_edge, resize_crop.shortest_edge * 4 // 3
    return 768, 1024


def typical_pixels(resize_crop: ResizeCrop) -> int:
    """Pixels of one model input (typical_size)."""
    height, width = typical_size(resize_crop)
    return height * width


@dataclass(frozen=True)
class LoaderSettings:
    """How the loader runs: its workers, whether they decode only between passes, a typical batch's bytes."""

    workers: int
    gate: bool  # workers may start an image only while no forward pass runs (loader.DecodeGate)
    batch_bytes: int  # a batch's uint8 pixels: what the workers share
    pin_memory: bool
    # With a gate: what decides whether passes close it (None: a new gate_trial.GateTrial, which measures it).
    gate_trial: GateTrial | None = None
    # Where workers put their batches (None: shared_batches.SharedMemory(), /dev/shm).
    shared_memory: SharedMemory | None = None


class LoaderPlacement(Protocol):
    """What the loader's choices read of a placed model (runner.placement.Placement, a later layer)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def streams(self) -> ThreadPoolExecutor | None: ...

    @property
    def batch_size(self) -> int: ...


def choose_loader_settings(workers: int | None, placement: LoaderPlacement, resize_crop: ResizeCrop,
                           threads: int | None = None, available: int | None = None) -> LoaderSettings:
    """The loader for a placed model. workers: --workers (None: default_workers).

    Decoding between passes needs workers enough to use every core of the team then (fewer, as with --workers 1
    on 2 cores, would leave a core idle there: measured slower than no gate).
    """
    threads = model_threads() if threads is None else threads
    device_type = placement.device.type
    between = decode_between_passes(device_type, placement.streams, threads, available)
    if workers is None:
        workers = default_workers(device_type, between_passes=between, available=available)
    batch_bytes = placement.batch_size * typical_pixels(resize_crop) * 3
    return LoaderSettings(workers, between and workers >= threads, batch_bytes, device_type == "cuda")
