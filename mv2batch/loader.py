"""The loader: a DataLoader whose workers decode and resize to uint8, in batches that never cross a shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .sources import Record


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


@dataclass
class Batch:
    """A collated batch: every sample's metadata in order, and the pixels of those that decoded."""

    samples: list[Sample]
    pixels: Any  # torch.uint8 NHWC tensor of the ok samples, or None when all failed

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]


class ImageDataset:
    """Map-style dataset over a record reader; __getitem__ runs in a worker and never raises for bad images."""

    def __init__(self, read: Callable[[int], Record], transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.read = read
        self.transform = transform
        self.max_pixels = max_pixels

    def __getitem__(self, index: int) -> Sample:
        record = self.read(index)
        try:
            decoded = decode_image(record.raw, self.max_pixels)
        except DecodeError as exc:
            return Sample(index, None, None, None, record.path, record.label, str(exc))
        try:
            pixels = np.ascontiguousarray(self.transform(decoded.image))
        except Exception as exc:  # a resize that Pillow refuses is one bad image, not a failed run
            return Sample(index, None, decoded.width, decoded.height, record.path, record.label,
                          f"preprocessing failed: {type(exc).__name__}: {exc}")
        return Sample(index, pixels, decoded.width, decoded.height, record.path, record.label, None)


def collate(samples: list[Sample]) -> Batch:
    """Stack the ok samples' pixels (all of one shape) into one uint8 tensor."""
    import torch

    ok = [s.pixels for s in samples if s.error is None]
    pixels = torch.from_numpy(np.stack(ok)) if ok else None
    for sample in samples:
        sample.pixels = None  # already in the stacked tensor; do not ship twice
    return Batch(samples=samples, pixels=pixels)


def shard_batches(shards: Sequence[range], batch_size: int) -> list[list[int]]:
    """Consecutive index batches, cut at every shard boundary so that a batch belongs to one shard."""
    return [list(shard[i : i + batch_size]) for shard in shards for i in range(0, len(shard), batch_size)]


def make_loader(dataset: ImageDataset, batches: list[list[int]], workers: int, pin_memory: bool) -> Iterator[Batch]:
    """A DataLoader yielding Batches in order; workers > 0 decode in parallel and prefetch ahead."""
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": 4, "persistent_workers": False} if workers > 0 else {}
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                           pin_memory=pin_memory, **extra))
