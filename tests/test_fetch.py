"""A batch's objects fetched ahead in the loader (storage.fetched_ahead): the same samples and error rows as
one read after the other, with several GETs in flight.

The store is fsspec's local filesystem behind a protocol of its own whose reads take a round trip's time and
count how many are in flight (a real bucket's latency, which moto on loopback does not have).
"""

from __future__ import annotations

import threading
import time

import fsspec
import numpy as np
import pytest
from conftest import classify, read_rows, real_photos
from fsspec.implementations.local import LocalFileSystem

from mv2batch.inputs.sources import Record
from mv2batch.loading.loader import ImageDataset
from mv2batch.storage import RemoteFile


class DistantFiles(LocalFileSystem):
    """Local files as `distant:///path`, each whole read taking ROUND_TRIP_S; the most reads in flight at once."""

    protocol = "distant"
    ROUND_TRIP_S = 0.05
    lock = threading.Lock()
    in_flight = most = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("distant://"):] if path.startswith("distant://") else path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most = max(cls.most, cls.in_flight)
        try:
            time.sleep(cls.ROUND_TRIP_S)
            return super().cat_file(path, start, end, **kwargs)
        finally:
            with cls.lock:
                cls.in_flight -= 1

    @classmethod
    def reads_at_once(cls) -> int:
        """The most reads in flight since the last call."""
        with cls.lock:
            most, cls.most = cls.most, 0
        return most


@pytest.fixture(scope="module")
def distant():
    fsspec.register_implementation("distant", DistantFiles, clobber=True)
    return DistantFiles


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fetch") / "photos"
    folder.mkdir()
    for i, photo in enumerate(real_photos(10, (160, 120))):
        photo.save(folder / f"photo_{i:02d}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def _dataset(photos, fetches: int, missing: bool = True) -> tuple[ImageDataset, list[int]]:
    names = sorted(p.name for p in photos.iterdir()) + (["gone.jpg"] if missing else [])
    records = [Record(raw=RemoteFile(f"distant://{photos / name}"), path=f"distant://{photos / name}", label=None)
               for name in names]
    return ImageDataset(records.__getitem__, lambda image: np.asarray(image), fetches=fetches), list(range(len(names)))


def _same(samples, expected) -> None:
    assert len(samples) == len(expected)
    for got, want in zip(samples, expected):
        assert (got.index, got.path, got.error, got.sha256, got.width) == (want.index, want.path, want.error,
                                                                          want.sha256, want.width)
        assert (got.pixels is None and want.pixels is None) or np.array_equal(got.pixels, want.pixels)


def test_a_batch_s_objects_are_read_at_once_and_give_the_samples_read_one_by_one(distant, photos):
    together, indices = _dataset(photos, fetches=16)
    one_by_one, _ = _dataset(photos, fetches=1)
    distant.reads_at_once()
    expected = [one_by_one[index] for index in indices]  # __getitem__: the path without a batch
    assert distant.reads_at_once() == 1
    samples = together.__getitems__(indices)
    assert distant.reads_at_once() >= 4  # 12 reads of 50 ms each, in threads: several overlap
    _same(samples, expected)
    errors = {sample.path.rsplit("/", 1)[-1]: sample.error for sample in samples if sample.error}
    assert set(errors) == {"broken.jpg", "gone.jpg"} and errors["gone.jpg"].startswith("cannot read distant://")
    assert one_by_one.__getitems__(indices) and distant.reads_at_once() == 1  # fetches=1: one after the other
    four, _ = _dataset(photos, fetches=4)
    _same(four.__getitems__(indices), expected)
    assert 2 <= distant.reads_at_once() <= 4  # the window: never more in flight (nor held) than asked


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_over_distant_objects_gives_the_local_rows_with_reads_in_flight_together(distant, photos, workers,
                                                                                    tiny_model, tmp_path):
    classify(photos, tmp_path / "local", tiny_model, batch_size=4)
    distant.reads_at_once()
    classify(f"distant://{photos}", tmp_path / "distant", tiny_model, batch_size=4, workers=workers)
    if workers == 0:  # a forked worker counts in its own copy of the class
        assert distant.reads_at_once() >= 2
    rows, expected = read_rows(tmp_path / "distant"), read_rows(tmp_path / "local")
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    for row, want in zip(rows, expected):
        assert {k: v for k, v in row.items() if k not in ("path", "error")} == {
            k: v for k, v in want.items() if k not in ("path", "error")}
        assert row["path"] == f"distant://{want['path']}"
