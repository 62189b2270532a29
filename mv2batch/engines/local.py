"""The local engine: this process runs its shards (all of them, or its rank's share under torchrun or Slurm)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mv2batch.config import RunConfig
from mv2batch.errors import Mv2batchError
from mv2batch.loading import resources
from mv2batch.loading.decode import decode_image
from mv2batch.model import device
from mv2batch.out import writer
from mv2batch.out.rundir import OutLock
from mv2batch.report.tables import Report
from mv2batch.runner import placement, shards
from mv2batch.runner.batch_loop import ProgressCallback
from mv2batch.runner.job import Job, describe_job, open_out
from mv2batch.runner.shard_plan import Group, rank_from_env

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch

    from mv2batch.loading.decode import Decoded
    from mv2batch.runner.placement import Placement


@dataclass(frozen=True)
class LocalParts:
    """The steps a test or a benchmark may replace with its own (wrapping the real one, usually)."""

    describe: Callable[[RunConfig], Job] = describe_job  # a test wraps the job's source (reads that fail)
    place: Callable[[Job, int | None], Placement] = placement.place  # (job, local_rank) -> Placement
    choose_loader_settings: Callable[..., resources.LoaderSettings] = resources.choose_loader_settings
    part_writer: type = writer.PartWriter  # what writes a shard's part (a test's fails as a full disk does)
    decode: Callable[..., Decoded] = decode_image  # the workers' decoding (a test's logs when each image begins)
    # What every batch runs inside, given the device and dtype (a test passes a spy).
    float32_math: Callable[[torch.device, torch.dtype], AbstractContextManager[None]] = device.float32_math


def run(config: RunConfig, progress: ProgressCallback | None = None, parts: LocalParts = LocalParts()) -> Report:
    """Describe the job, place its model, open OUT, run this process's shards, and report (once per run)."""
    started = time.perf_counter()
    rank = rank_from_env()
    group = Group(rank)
    lock = OutLock(config.out)  # ranks of one run share OUT; a lone process holds it
    placed = None
    try:
        job = parts.describe(config)
        placed = parts.place(job, rank.local_rank)
        if rank.world_size == 1:
            lock.acquire()
        rundir = open_out(job, rank, group, batch_size=placed.batch_size)
        counters = shards.run_shards(job, placed, rundir, rank.owns, rank.rank, progress, parts.choose_loader_settings,
                                     parts.part_writer, decode=parts.decode, float32_math=parts.float32_math)
        group.barrier()
        return shards.finish(job, rundir, counters.done, time.perf_counter() - started,
                             write=rank.is_first or not group.active)
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        raise Mv2batchError(out_of_memory(placed)) from None
    finally:
        lock.release()
        group.close()


def out_of_memory(placed: Placement | None) -> str:
    """One line for a device that ran out of memory: while placing the model, or on a batch."""
    if placed is None:
        return "the device ran out of memory while loading the model: free the GPU, or use a smaller model"
    return (f"the {placed.device.type.upper()} device ran out of memory at --batch-size {placed.batch_size}: "
            f"lower --batch-size (finished shards are kept; --resume continues the run)")
