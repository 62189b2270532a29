"""The loader of sharded sources (WebDataset tars): each worker streams whole shards, in order, so that N
workers read N shards at once and no shard is ever read twice or copied; batches never cross a shard."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mv2batch.loading.loader import DecodeGate, ImageDataset, fit_workers, loader_batches
from mv2batch.loading.shared_batches import Batch, BufferPool, collate

if TYPE_CHECKING:
    from mv2batch.inputs.sources import ShardedSource
    from mv2batch.loading.loader import Sample
    from mv2batch.loading.shared_batches import SharedMemory


class ShardStream(IterableDataset):
    """Worker k of n reads shards k, k + n, k + 2n… of the list, each from start to end, as Batches."""

    def __init__(self, source: ShardedSource, shards: list[int], images: ImageDataset, batch_size: int,
                 buffers: BufferPool | None = None, gate: DecodeGate | None = None):
        self.source, self.shards, self.images = source, shards, images
        self.batch_size, self.buffers, self.gate = batch_size, buffers, gate

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        mine = self.shards if worker is None else self.shards[worker.id :: worker.num_workers]
        for number in mine:
            yield from self._batches(number)

    def _batches(self, number: int) -> Iterator[Batch]:
        """One shard's batches; the last says it ends the shard (a source yields at least one record)."""
        pending: list[Sample] = []
        for position, record in enumerate(self.source.records(number)):
            if len(pending) == self.batch_size:
                yield self._collated(pending, number, ends=False)
                pending = []
            if self.gate is not None:
                self.gate.wait()
            pending.append(self.images.sample_of(position, record))
        yield self._collated(pending, number, ends=True)

    def _collated(self, samples: list[Sample], number: int, ends: bool) -> Batch:
        batch = collate(samples, self.buffers)
        batch.shard, batch.ends_shard = number, ends
        return batch


def _as_is(batch: Batch) -> Batch:
    return batch


def make_shard_loader(source: ShardedSource, shards: list[int], images: ImageDataset, batch_size: int, workers: int,
                      pin_memory: bool, batch_bytes: int | None = None,
                      gate: DecodeGate | None = None, shared: SharedMemory | None = None) -> Iterator[Batch]:
    """Batches of the given shards, read by up to one worker per shard (more would have nothing to read);
    shared: where the batches go (shared_batches.SharedMemory(), /dev/shm)."""
    fitted = fit_workers(min(workers, len(shards)), batch_bytes, shared)
    stream = ShardStream(source, shards, images, batch_size, fitted.buffers, gate)
    loader = DataLoader(stream, batch_size=None, num_workers=fitted.workers, collate_fn=_as_is,
                        pin_memory=pin_memory, **fitted.options)
    return loader_batches(loader, fitted)
