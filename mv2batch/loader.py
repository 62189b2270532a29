"""The loader: a DataLoader whose workers decode and resize to uint8, in batches that never cross a shard."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .errors import Mv2batchError
from .sources import Record

log = logging.getLogger("mv2batch")

# Workers hand their batches to the main process in shared memory, which Docker limits to 64 MB by default.
SHARED_MEMORY = Path("/dev/shm")
PREFETCH = 4  # batches each worker keeps ready
MIN_PREFETCH = 2


@dataclass
class Sample:
    """One image after the worker stage: uint8 HWC pixels, or the reason there are none."""

    index: int
    pixels: np.ndarray | None
    width: int | None
    height: int | None
    path: str | None
    label: int | None
    error: str | None
    target: np.ndarray | None = None  # ground-truth class ids at the original size (segmentation eval)


@dataclass
class Batch:
    """A collated batch: every sample's metadata in order, and the pixels of those that decoded.

    `groups` holds (positions in samples, uint8 NHWC tensor) per pixel shape: one group when the batch
    sampler grouped by shape correctly, more only if an image's header misled it.
    """

    samples: list[Sample]
    groups: list[tuple[list[int], Any]]
    buffer: tuple[int, int] | None = None  # (worker, buffer id) of the shared memory the groups are views of

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread when the device is a GPU."""
        self.groups = [(positions, pixels.pin_memory()) for positions, pixels in self.groups]
        return self


class DecodeGate:
    """Lets loader workers start an image only while the model is not computing (runner: decode_between_passes).

    One OpenMP team on every core of a CPU waits at each layer's barrier for its slowest thread: a worker that
    takes a core for a few milliseconds stalls the whole team, so its decoding costs the model about twice its
    own CPU time. Decoding between passes, on all cores at once, costs only its own.

    A worker checks the gate before each image (one it has started finishes); `paused()` reopens it however
    the pass ends. A waiting worker looks every second whether the process that made the gate still lives.
    """

    def __init__(self):
        self._open = multiprocessing.Event()
        self._open.set()
        self._owner = os.getpid()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def wait(self) -> None:
        while not self._open.wait(1.0):
            if os.getppid() != self._owner:
                return  # orphaned: the worker's own loop notices and exits


class ImageDataset:
    """Map-style dataset over a record reader; __getitem__ runs in a worker and never raises for bad images."""

    def __init__(self, read: Callable[[int], Record], transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS,
                 reduce_labels: bool = False, gate: DecodeGate | None = None):
        self.read = read
        self.transform = transform
        self.max_pixels = max_pixels
        self.reduce_labels = reduce_labels
        self.gate = gate

    def __getitem__(self, index: int) -> Sample:
        if self.gate is not None:
            self.gate.wait()
        record = self.read(index)
        try:
            decoded = decode_image(record.raw, self.max_pixels)
        except DecodeError as exc:
            return Sample(index, None, None, None, record.path, record.label, str(exc))
        sample = Sample(index, None, decoded.width, decoded.height, record.path, record.label, None)
        try:
            sample.target = self._target(record.target, decoded) if record.target else None
            sample.pixels = self.transform(decoded.image)  # a crop's view: collate copies it into the batch
        except TargetError as exc:
            sample.error = str(exc)
        except Exception as exc:  # a resize that Pillow refuses is one bad image, not a failed run
            sample.error = f"preprocessing failed: {type(exc).__name__}: {exc}"
        return sample

    def _target(self, path: str, decoded: Any) -> np.ndarray:
        target = read_target(path, self.reduce_labels)
        if target.shape != (decoded.height, decoded.width):
            raise TargetError(f"ground-truth mask is {target.shape[1]}x{target.shape[0]} but the image is "
                              f"{decoded.width}x{decoded.height}")
        return target


class TargetError(Exception):
    """A ground-truth mask that is missing, unreadable or of the wrong size."""


def read_target(path: str, reduce_labels: bool) -> np.ndarray:
    """Class ids of a ground-truth PNG (palette index or grey level); reduce_labels: ADE20k's 0 = ignore."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            target = np.array(image)
    except Exception as exc:
        raise TargetError(f"cannot read ground-truth mask: {type(exc).__name__}: {exc}") from None
    if target.ndim != 2:
        raise TargetError(f"ground-truth mask must have one channel, it has shape {target.shape}")
    target = target.astype(np.uint8)
    if reduce_labels:  # as transformers' do_reduce_labels: 0 -> 255 (ignored), k -> k - 1
        target[target == 0] = 255
        target = target - 1
        target[target == 254] = 255
    return target


def collate(samples: list[Sample], buffers: "BufferPool | None" = None) -> Batch:
    """Stack the ok samples' pixels into one uint8 tensor per shape; in a worker with a buffer pool, all of
    them into one of its shared buffers."""
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


def _stack(groups: list[list[np.ndarray]], buffers: "BufferPool | None") -> tuple[list[Any], tuple | None]:
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


def shared_storage(nbytes: int) -> Any:
    import torch

    return torch.UntypedStorage._new_shared(nbytes)


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

    def __init__(self, workers: int, keep: int):
        self.returns = [multiprocessing.SimpleQueue() for _ in range(workers)]
        self.keep = keep
        self.buffers: dict[int, Any] = {}  # in a worker: id -> storage, in flight or free
        self.free: set[int] = set()
        self.made = 0

    def take(self, worker: int, nbytes: int) -> tuple[int, Any]:
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
        self.buffers[chosen] = shared_storage(nbytes)
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


def consecutive_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive index batches of one shard."""
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


def grouped_batches(indices: Sequence[int], shape_of: Callable[[int], tuple | None], batch_size: int) -> list[list[int]]:
    """Batches of one shard with equal resized shapes next to each other (so batching changes nothing).

    A batch may hold several shapes (collate stacks each shape apart): photos come in many aspect ratios,
    and batches of one photo each would leave the loader's prefetch and the model's streams idle.
    """
    groups: dict[Any, list[int]] = {}
    for index in indices:
        shape = shape_of(index)
        groups.setdefault(shape if shape is not None else ("unknown", index), []).append(index)
    return consecutive_batches([index for group in groups.values() for index in group], batch_size)


def make_loader(dataset: ImageDataset, batches: Iterable[list[int]], workers: int, pin_memory: bool,
                batch_bytes: int | None = None) -> Iterator[Batch]:
    """A DataLoader yielding Batches in order; workers > 0 decode in parallel and prefetch ahead.

    batch_bytes (a typical batch's pixels): fewer batches in flight, or workers, where shared memory is short.
    """
    from torch.utils.data import DataLoader

    prefetch = PREFETCH
    if workers > 0 and batch_bytes:
        workers, prefetch = _fit_shared_memory(workers, batch_bytes)
    extra = {"prefetch_factor": prefetch, "persistent_workers": False} if workers > 0 else {}
    # A worker has at most `prefetch` batches in flight, and one more while the main process copies one out
    # (fit_to_shared_memory leaves room for that: it budgets half the free shared memory for prefetch alone).
    buffers = BufferPool(workers, keep=prefetch + 1) if workers > 0 else None
    # A partial of a module-level function, not a closure: spawned workers can unpickle it.
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                        collate_fn=partial(collate, buffers=buffers),
                        pin_memory=pin_memory, **extra)
    return _reporting_shared_memory_errors(_giving_buffers_back(iter(loader), buffers))


def _copy(pixels: Any) -> Any:
    """A private copy, made by this thread alone. torch's clone runs on the intra-op threads, beside the
    model's: measured 2 % slower end to end than this copy (bf16, 2 cores)."""
    import torch

    return torch.from_numpy(pixels.numpy().copy())


def _giving_buffers_back(batches: Iterator[Batch], buffers: BufferPool | None) -> Iterator[Batch]:
    """The loader's batches, each one's buffer handed back to its worker before the batch is passed on."""
    for batch in batches:
        if buffers is not None:
            buffers.give_back(batch)
        yield batch


def fit_to_shared_memory(workers: int, batch_bytes: int, free_bytes: int) -> tuple[int, int]:
    """(workers, prefetch factor) whose batches in flight fill at most half the free shared memory; (0, _):
    decode in the main process, which needs none."""
    budget = free_bytes // 2  # the batches the main process holds, and other programs, need some too
    for prefetch in (PREFETCH, MIN_PREFETCH):
        if workers * prefetch * batch_bytes <= budget:
            return workers, prefetch
    return min(workers, budget // (MIN_PREFETCH * batch_bytes)), MIN_PREFETCH


def shared_memory_free() -> int | None:
    try:
        return shutil.disk_usage(SHARED_MEMORY).free
    except OSError:  # no /dev/shm (not Linux): nothing to fit
        return None


def _fit_shared_memory(workers: int, batch_bytes: int) -> tuple[int, int]:
    free = shared_memory_free()
    if free is None:
        return workers, PREFETCH
    fitted, prefetch = fit_to_shared_memory(workers, batch_bytes, free)
    if fitted < workers:
        instead = f"{fitted} workers, {prefetch} batches each" if fitted else "decoding in the main process"
        log.warning(f"{SHARED_MEMORY} has {free / 2**20:.0f} MB free, too little for {workers} loader workers "
                    f"x {PREFETCH} batches of {batch_bytes / 2**20:.0f} MB: {instead} (Docker: --shm-size or "
                    f"--ipc=host)")
    return fitted, prefetch


def _reporting_shared_memory_errors(batches: Iterator[Batch]) -> Iterator[Batch]:
    """The loader's batches; a worker that ran out of shared memory ends the run with one line, not a traceback."""
    try:
        yield from batches
    except RuntimeError as exc:
        if "shared memory" not in str(exc) and "Bus error" not in str(exc):
            raise
        free = shared_memory_free()
        left = f" ({free / 2**20:.0f} MB free now)" if free is not None else ""
        raise Mv2batchError(f"the loader's workers ran out of shared memory in {SHARED_MEMORY}{left}: give it more "
                            f"(Docker: --shm-size 8g or --ipc=host), or lower --workers or --batch-size") from None
