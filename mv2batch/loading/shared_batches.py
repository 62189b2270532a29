"""Batches in shared memory: collating a worker's samples into buffers it fills again once they are read."""

from __future__ import annotations

import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """A collated batch: every sample's metadata in order, and the pixels of those that decoded.

    `groups` holds (positions in samples, uint8 NHWC tensor) per pixel shape: one group when the batch
    sampler grouped by shape correctly, more only if an image's header misled it.
    """

    samples: list[Any]  # loader.Sample: loader imports this module, so the type is not named here
    groups: list[tuple[list[int], torch.Tensor]]
    buffer: tuple[int, int] | None = None  # (worker, buffer id) of the shared memory the groups are views of
    shard: int | None = None  # the shard the batch belongs to, where the loader says (sharded sources)
    ends_shard: bool = False  # the shard's last batch: its length is known only now (sharded sources)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread when the device is a GPU."""
        self.groups = [(positions, pixels.pin_memory()) for positions, pixels in self.groups]
        return self



def collate(samples: list[Any], buffers: BufferPool | None = None) -> Batch:
    """Stack the ok samples' pixels into one uint8 tensor per shape; in a worker with a buffer pool, all of
    them into one of its shared buffers. samples: loader.Samples (as Batch.samples)."""
    by_shape: dict[tuple, list[int]] = {}
    for position, sample in enumerate(samples):
        if sample.error is None:
            by_shape.setdefault(sample.pixels.shape, []).append(position)
    positions = list(by_shape.values())
    stacked, buffer = _stack([[samples[p].pixels for p in group] for group in positions], buffers)
    for sample in samples:
        sample.pixels = None  # already in the stacked tensors; do not ship twice
    return Batch(samples=samples, groups=list(zip(positions, stacked)), buffer=buffer)


ALIGN = 64  # bytes: each group of a batch starts on a cache line of the shared buffer


def _stack(groups: list[list[np.ndarray]], buffers: BufferPool | None
           ) -> tuple[list[torch.Tensor], tuple[int, int] | None]:
    """Each group of uint8 arrays as one tensor; in a worker, stacked straight into the shared memory they
    will travel in (one of the pool's buffers for the whole batch), with that buffer's (worker, id).

    Allocating it here matters when shared memory runs out: the DataLoader hands an error raised here to the
    main process, whereas a failure to share the batch later, in the worker queue's feeder thread, is only
    printed, and the main process would wait for that batch forever.
    """
    import torch
    from torch.utils.data import get_worker_info

    worker = get_worker_info()
    if worker is None or buffers is None or not groups:
        return [torch.from_numpy(np.stack(arrays)) for arrays in groups], None
    shapes = [(len(arrays), *arrays[0].shape) for arrays in groups]
    offsets, end = [], 0
    for shape in shapes:
        offsets.append(end)
        end += -(-int(np.prod(shape)) // ALIGN) * ALIGN
    buffer_id, storage = buffers.take(worker.id, end)
    stacked = []
    for arrays, shape, offset in zip(groups, shapes, offsets):
        tensor = torch.empty(0, dtype=torch.uint8).set_(storage, offset, shape)
        np.stack(arrays, out=tensor.numpy())
        stacked.append(tensor)
    return stacked, (worker.id, buffer_id)


def shared_storage(nbytes: int) -> torch.UntypedStorage:
    import torch

    return torch.UntypedStorage._new_shared(nbytes)


@dataclass(frozen=True)
class SharedMemory:
    """Where loader workers put their batches (/dev/shm: 64 MB in a default Docker container): how much is
    free, and a new buffer there. A test passes its own: a /dev/shm that is short, or full."""

    folder: Path = Path("/dev/shm")

    def free(self) -> int | None:
        """Bytes free; None where there is no such folder (not Linux): nothing to fit."""
        try:
            return shutil.disk_usage(self.folder).free
        except OSError:
            return None

    def allocate(self, nbytes: int) -> torch.UntypedStorage:
        """In a worker: a new shared buffer of nbytes (torch raises RuntimeError when there is no room)."""
        return shared_storage(nbytes)


class BufferPool:
    """Shared-memory buffers that each loader worker fills again once the main process gives them back.

    A fresh shared buffer costs a worker the page faults and zeroing of every page it writes: measured 4.5 ms
    of CPU for a batch of 32 at 256x256 against 0.2 ms into memory already mapped, about 5 % of the worker's
    decoding time (the input is the limit on a GPU). The main process gives a buffer back only once nothing
    it holds reads it: after copying the pixels out (into pinned memory for a GPU, into its own memory on the
    CPU), so a worker never refills pixels that are still being read. A worker with no buffer back yet makes a
    new one; it keeps at most `keep` of them.

    The queues are made in the main process before the workers start; the buffers live in each worker.
    """

    def __init__(self, workers: int, keep: int, shared: SharedMemory | None = None):
        self.returns = [multiprocessing.SimpleQueue() for _ in range(workers)]
        self.keep = keep
        self.shared = shared or SharedMemory()
        self.buffers: dict[int, torch.UntypedStorage] = {}  # in a worker: id -> storage, in flight or free
        self.free: set[int] = set()
        self.made = 0

    def take(self, worker: int, nbytes: int) -> tuple[int, torch.UntypedStorage]:
        """In a worker: a buffer of at least nbytes, free for this batch, and its id."""
        returned = self.returns[worker]
        while not returned.empty():
            self.free.add(returned.get())
        fitting = [i for i in self.free if self.buffers[i].nbytes() >= nbytes]
        if fitting:
            chosen = min(fitting, key=lambda i: self.buffers[i].nbytes())
            self.free.discard(chosen)
            return chosen, self.buffers[chosen]
        chosen, self.made = self.made, self.made + 1
        self.buffers[chosen] = self.shared.allocate(nbytes)
        for unused in sorted(self.free, key=lambda i: self.buffers[i].nbytes()):
            if len(self.buffers) <= self.keep:
                break
            self.free.discard(unused)
            del self.buffers[unused]  # the segment goes once the main process has let go of it too
        return chosen, self.buffers[chosen]

    def give_back(self, batch: Batch) -> None:
        """In the main process: copy the batch's pixels out of its buffer and hand the buffer back to the worker
        that filled it. Pinned groups are copies already (the DataLoader's pinning thread made them)."""
        if batch.buffer is None:
            return
        batch.groups = [(positions, pixels if pixels.is_pinned() else _copy(pixels))
                        for positions, pixels in batch.groups]
        worker, buffer_id = batch.buffer
        batch.buffer = None
        self.returns[worker].put(buffer_id)


def _copy(pixels: torch.Tensor) -> torch.Tensor:
    """A private copy, made by this thread alone. torch's clone runs on the intra-op threads, beside the
    model's: measured 2 % slower end to end than this copy (bf16, 2 cores)."""
    import torch

    return torch.from_numpy(pixels.numpy().copy())


def giving_buffers_back(batches: Iterator[Batch], buffers: BufferPool | None) -> Iterator[Batch]:
    """The loader's batches, each one's buffer handed back to its worker before the batch is passed on."""
    for batch in batches:
        if buffers is not None:
            buffers.give_back(batch)
        yield batch
