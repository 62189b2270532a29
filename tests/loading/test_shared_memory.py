"""Loader workers and shared memory (/dev/shm, 64 MB in a default Docker container): fewer workers, or one line."""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from conftest import classify, read_rows, real_photos

from mv2batch.engines.local import LocalParts
from mv2batch.errors import Mv2batchError
from mv2batch.loading import loader
from mv2batch.loading.resources import choose_loader_settings
from mv2batch.loading.shared_batches import SharedMemory

MB = 2**20


@pytest.mark.parametrize("workers, batch_mb, free_mb, expected", [
    (8, 1, 1000, (8, 4)),     # plenty
    (8, 10, 400, (8, 2)),     # 8 x 4 x 10 MB is over half of 400 MB, 8 x 2 x 10 is not
    (15, 48, 64, (0, 2)),     # Docker's default against batches of 256 at 256x256: decode in the main process
    (15, 12, 200, (4, 2)),    # as many as fit with 2 batches each
])
def test_batches_in_flight_fit_half_the_free_shared_memory(workers, batch_mb, free_mb, expected):
    assert loader.fit_to_shared_memory(workers, batch_mb * MB, free_mb * MB) == expected


def _photos(folder, count):
    folder.mkdir()
    for i, photo in enumerate(real_photos(count)):
        photo.save(folder / f"{i}.png")
    return folder


@dataclass(frozen=True)
class ShortSharedMemory(SharedMemory):
    """A /dev/shm with only `left` bytes free."""

    left: int = 1000

    def free(self) -> int:
        return self.left


@dataclass(frozen=True)
class FullSharedMemory(SharedMemory):
    """A /dev/shm that says it has room, then has none when a worker asks for a buffer (as torch says it)."""

    def allocate(self, nbytes: int):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: "
                           "No space left on device (28)")


def with_shared_memory(shared: SharedMemory) -> LocalParts:
    """LocalParts whose loader puts its batches in `shared`."""
    def settings(*args, **kwargs):
        return replace(choose_loader_settings(*args, **kwargs), shared_memory=shared)

    return LocalParts(choose_loader_settings=settings)


def test_short_shared_memory_means_fewer_workers_and_a_warning(tmp_path, tiny_model, caplog):
    folder = _photos(tmp_path / "in", 6)
    classify(folder, tmp_path / "inline", tiny_model, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="mv2batch"):  # 1000 bytes: not even one batch of 2 fits
        classify(folder, tmp_path / "short", tiny_model, batch_size=2, workers=2,
                 parts=with_shared_memory(ShortSharedMemory(left=1000)))
    assert "too little for 2 loader workers" in caplog.text and "decoding in the main process" in caplog.text
    assert read_rows(tmp_path / "short") == read_rows(tmp_path / "inline")


def test_workers_out_of_shared_memory_end_the_run_with_one_line(tmp_path, tiny_model):
    """Before, the failure happened in the worker queue's feeder thread and the run waited forever."""
    folder = _photos(tmp_path / "in", 4)
    with pytest.raises(Mv2batchError, match="ran out of shared memory in /dev/shm") as raised:
        classify(folder, tmp_path / "out", tiny_model, batch_size=2, workers=1,
                 parts=with_shared_memory(FullSharedMemory()))
    assert "\n" not in str(raised.value)
    assert not list((tmp_path / "out" / "predictions").glob("*.parquet"))  # nothing half-written is kept


class _Numbered:
    """Each image is filled with its index: a pixel read from a refilled buffer, or from another group's place
    in it, shows the wrong number. Odd and even images differ in shape: two groups per batch."""

    def __getitem__(self, index: int) -> loader.Sample:
        height, width = (16, 24) if index % 2 else (24, 16)
        return loader.Sample(index, np.full((height, width, 3), index % 251, np.uint8), width, height, None, None, None)


class CountedSharedMemory(SharedMemory):
    """/dev/shm, counting the buffers the workers make (in a counter the forked workers share)."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "made", multiprocessing.Value("i", 0))

    def allocate(self, nbytes: int):
        with self.made.get_lock():
            self.made.value += 1
        return super().allocate(nbytes)


def test_workers_reuse_their_shared_buffers_and_never_refill_one_still_read():
    shared = CountedSharedMemory()
    index_batches = [list(range(start, start + 4)) for start in range(0, 240, 4)]
    held = list(loader.make_loader(_Numbered(), iter(index_batches), workers=2, pin_memory=False, shared=shared))
    assert len(held) == 60
    for batch in held:  # every batch kept until the end: any buffer refilled under it would show
        assert len(batch.groups) == 2
        for positions, pixels in batch.groups:
            expected = torch.tensor([batch.samples[p].index % 251 for p in positions], dtype=torch.uint8)
            assert torch.equal(pixels, expected[:, None, None, None].expand(pixels.shape))
    assert 2 <= shared.made.value <= 2 * (loader.PREFETCH + 2)  # 60 batches from a handful of buffers per worker
