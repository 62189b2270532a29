"""The loader: a DataLoader whose workers decode and resize to uint8, in batches that never cross a shard."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from mv2batch.errors import Mv2batchError
from mv2batch.inputs.eval_layouts import TargetError, read_target
from mv2batch.inputs.sources import Record
from mv2batch.loading.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from mv2batch.loading.shared_batches import Batch, BufferPool, SharedMemory, collate, giving_buffers_back

if TYPE_CHECKING:
    from PIL import Image
    from torch.utils.data import DataLoader

    from mv2batch.loading.decode import Decoded
    from mv2batch.loading.preprocess import ResizeCrop

log = logging.getLogger("mv2batch")

PREFETCH = 4  # batches each worker keeps ready
MIN_PREFETCH = 2
# Objects of one batch a worker has in flight (storage.fetched_ahead): enough that a GET's round trip
# hides behind the others', few enough that a store does not throttle a run of 16 workers.
FETCHES_AT_ONCE = 16


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
    id: str | None = None  # the row's id where the record names it (tar keys, an id column)
    decode_s: float = 0.0  # the worker stage's wall time for it (gate_trial weighs decoding by it)
    sha256: str | None = None  # of the encoded bytes (None where they could not be read and decoded)


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
    def paused(self, closing: bool = True) -> Iterator[None]:
        """The gate closed for a pass; closing False: left open (gate_trial: workers decode beside it)."""
        if not closing:
            yield
            return
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

    def __init__(self, read: Callable[[int], Record], transform: Callable[[Image.Image], np.ndarray],
                 max_pixels: int = DEFAULT_MAX_PIXELS, reduce_labels: bool = False, gate: DecodeGate | None = None,
                 fast: ResizeCrop | None = None, fetches: int = FETCHES_AT_ONCE,
                 decode: Callable[..., Decoded] = decode_image):
        self.read = read
        self.decode = decode  # (raw, max_pixels, fast) -> decoded image (a test's logs when each image begins)
        self.fetches = fetches  # GETs in flight for a batch's objects (1: one after the other)
        self.transform = transform
        self.fast = fast  # --decode fast: the protocol's ResizeCrop, which reduced JPEG decoding must cover
        self.max_pixels = max_pixels
        self.reduce_labels = reduce_labels
        self.gate = gate

    def __getitem__(self, index: int) -> Sample:
        if self.gate is not None:
            self.gate.wait()
        return self.sample_of(index, self.read(index))

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        """A batch (the DataLoader calls this where a dataset has it): its objects fetched ahead, several at
        once (storage.fetched_ahead), while its images are decoded in turn, the gate checked before each as
        __getitem__ does (fetching goes on while the gate is closed: it is waiting, not computing)."""
        from dataclasses import replace

        from mv2batch.storage import RemoteFile, fetched_ahead

        records = [self.read(index) for index in indices]
        fetched = fetched_ahead([record.raw for record in records if isinstance(record.raw, RemoteFile)],
                                self.fetches)
        samples = []
        for index, record in zip(indices, records):
            if isinstance(record.raw, RemoteFile):
                record = replace(record, raw=next(fetched))
            if self.gate is not None:
                self.gate.wait()
            samples.append(self.sample_of(index, record))
        return samples

    def sample_of(self, index: int, record: Record) -> Sample:
        """The worker stage of one record: decode, EXIF, ground truth, resize / crop; failures as the error."""
        started = time.perf_counter()
        sample = self._sample_of(index, record)
        sample.decode_s = time.perf_counter() - started
        return sample

    def _sample_of(self, index: int, record: Record) -> Sample:
        if record.error is not None:
            return Sample(index, None, None, None, record.path, record.label, record.error, id=record.id)
        try:
            decoded = self.decode(record.raw, self.max_pixels, self.fast)
        except DecodeError as exc:
            return Sample(index, None, None, None, record.path, record.label, str(exc), id=record.id)
        sample = Sample(index, None, decoded.width, decoded.height, record.path, record.label, None, id=record.id,
                        sha256=decoded.sha256)
        try:
            sample.target = self._target(record.target, decoded) if record.target else None
            sample.pixels = self.transform(decoded.image)  # a crop's view: collate copies it into the batch
        except TargetError as exc:
            sample.error = str(exc)
        except Exception as exc:  # a resize that Pillow refuses is one bad image, not a failed run
            sample.error = f"preprocessing failed: {type(exc).__name__}: {exc}"
        return sample

    def _target(self, path: str, decoded: Decoded) -> np.ndarray:
        target = read_target(path, self.reduce_labels)
        if target.shape != (decoded.height, decoded.width):
            raise TargetError(f"ground-truth mask is {target.shape[1]}x{target.shape[0]} but the image is "
                              f"{decoded.width}x{decoded.height}")
        return target


def consecutive_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive index batches of one shard."""
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


def grouped_batches(indices: Sequence[int], shape_of: Callable[[int], tuple | None],
                    batch_size: int) -> list[list[int]]:
    """Batches of one shard with equal resized shapes next to each other (so batching changes nothing).

    A batch may hold several shapes (collate stacks each shape apart): photos come in many aspect ratios,
    and batches of one photo each would leave the loader's prefetch and the model's streams idle.
    """
    groups: dict[tuple, list[int]] = {}
    for index in indices:
        shape = shape_of(index)
        groups.setdefault(shape if shape is not None else ("unknown", index), []).append(index)
    return consecutive_batches([index for group in groups.values() for index in group], batch_size)


@dataclass(frozen=True)
class FittedWorkers:
    """Workers fitted to shared memory, the DataLoader's prefetch options, and the pool of their buffers."""

    workers: int
    options: dict
    buffers: BufferPool | None
    shared: SharedMemory


def fit_workers(workers: int, batch_bytes: int | None, shared: SharedMemory | None = None) -> FittedWorkers:
    """batch_bytes (a typical batch's pixels): fewer batches in flight, or workers, where shared memory is short.
    shared: where the batches go (SharedMemory(): /dev/shm)."""
    shared = shared or SharedMemory()
    prefetch = PREFETCH
    if workers > 0 and batch_bytes:
        workers, prefetch = fitted_to_shared_memory(workers, batch_bytes, shared)
    if workers == 0:
        return FittedWorkers(0, {}, None, shared)
    # A worker has at most `prefetch` batches in flight, and one more while the main process copies one out
    # (fit_to_shared_memory leaves room for that: it budgets half the free shared memory for prefetch alone).
    return FittedWorkers(workers, {"prefetch_factor": prefetch, "persistent_workers": False},
                      BufferPool(workers, keep=prefetch + 1, shared=shared), shared)


def loader_batches(loader: DataLoader[Batch], fitted: FittedWorkers) -> Iterator[Batch]:
    """A DataLoader's batches, each worker's buffers given back once used; out of shared memory: one line."""
    return reporting_shared_memory_errors(giving_buffers_back(iter(loader), fitted.buffers), fitted.shared)


def make_loader(dataset: ImageDataset, batches: Iterable[list[int]], workers: int, pin_memory: bool,
                batch_bytes: int | None = None, shared: SharedMemory | None = None) -> Iterator[Batch]:
    """A DataLoader yielding Batches in order; workers > 0 decode in parallel and prefetch ahead, their batches
    in shared (SharedMemory(): /dev/shm)."""
    from torch.utils.data import DataLoader

    fitted = fit_workers(workers, batch_bytes, shared)
    # A partial of a module-level function, not a closure: spawned workers can unpickle it.
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=fitted.workers,
                        collate_fn=partial(collate, buffers=fitted.buffers), pin_memory=pin_memory, **fitted.options)
    return loader_batches(loader, fitted)


def fit_to_shared_memory(workers: int, batch_bytes: int, free_bytes: int) -> tuple[int, int]:
    """(workers, prefetch factor) whose batches in flight fill at most half the free shared memory; (0, _):
    decode in the main process, which needs none."""
    budget = free_bytes // 2  # the batches the main process holds, and other programs, need some too
    for prefetch in (PREFETCH, MIN_PREFETCH):
        if workers * prefetch * batch_bytes <= budget:
            return workers, prefetch
    return min(workers, budget // (MIN_PREFETCH * batch_bytes)), MIN_PREFETCH


def fitted_to_shared_memory(workers: int, batch_bytes: int, shared: SharedMemory) -> tuple[int, int]:
    free = shared.free()
    if free is None:
        return workers, PREFETCH
    fitted, prefetch = fit_to_shared_memory(workers, batch_bytes, free)
    if fitted < workers:
        instead = f"{fitted} workers, {prefetch} batches each" if fitted else "decoding in the main process"
        log.warning(f"{shared.folder} has {free / 2**20:.0f} MB free, too little for {workers} loader workers "
                    f"x {PREFETCH} batches of {batch_bytes / 2**20:.0f} MB: {instead} (Docker: --shm-size or "
                    f"--ipc=host)")
    return fitted, prefetch


def reporting_shared_memory_errors(batches: Iterator[Batch], shared: SharedMemory) -> Iterator[Batch]:
    """The loader's batches; a worker that ran out of shared memory ends the run with one line, not a traceback."""
    try:
        yield from batches
    except RuntimeError as exc:
        if "shared memory" not in str(exc) and "Bus error" not in str(exc):
            raise
        free = shared.free()
        left = f" ({free / 2**20:.0f} MB free now)" if free is not None else ""
        raise Mv2batchError(f"the loader's workers ran out of shared memory in {shared.folder}{left}: give it more "
                            f"(Docker: --shm-size 8g or --ipc=host), or lower --workers or --batch-size") from None
