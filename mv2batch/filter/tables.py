"""Tables and `datasets` inputs (Parquet, Arrow, CSV, JSON, save_to_disk folders, hub datasets): the kept rows
with the source's own columns, in order, as Parquet parts `DEST/data/<split>-<shard>-of-<shards>.parquet`.

The source is opened as the run opened it (inputs.tables.load_split: the same file order, the same split, the
datasets cache the run filled), and a row's number is the part's first row among the run's rows plus its
position in the part: the run wrote every row of a shard, in order, and a finished run has every shard. Each
kept row's id is checked against that row (`split/index`, or the --id-column value), so a table that changed
since the run is refused rather than mislabelled. The parts' names follow the hub's `data/<split>-NNNNN-of-NNNNN`
pattern, so that `datasets.load_dataset(DEST)` finds the split and never reads `_mv2batch/` as data.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mv2batch import storage
from mv2batch.errors import InputError
from mv2batch.filter.destination import Destination, FileWriter
from mv2batch.filter.work import Outcome, ShardWork

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

STREAM_BATCH_ROWS = 1024


class TableLayout:
    """Kept rows of a table, one Parquet part per shard that kept any."""

    name = "table"
    parallel = False  # one reader of the source, in shard order (a streamed table cannot seek)

    def __init__(self, input_info: dict, fields: dict, n_shards: int, destination: Destination,
                 write_file: FileWriter, options: dict | None = None):
        self.name_given, self.split = str(input_info["name"]), str(input_info.get("split") or "train")
        self.streaming, self.id_column = bool(fields.get("streaming")), fields.get("id_column")
        self.n_shards, self.destination, self.write_file, self.options = n_shards, destination, write_file, options
        self.source: RowReader | None = None

    def locations(self) -> list[tuple[str, storage.Location]]:
        where = storage.location(self.name_given)
        local = isinstance(where, Path) and where.exists()
        return [("the input table", where)] if local or storage.is_url(self.name_given) else []

    def part(self, shard: int) -> storage.Location:
        name = re.sub(r"[^\w.]", "_", self.split)
        return storage.join(self.destination.root, "data", f"{name}-{shard:05d}-of-{self.n_shards:05d}.parquet")

    def tasks(self, work: ShardWork) -> list[Callable[[], Outcome]]:
        return [partial(self.write_part, work)] if work.kept.num_rows else []

    def write_part(self, work: ShardWork) -> Outcome:
        import pyarrow.parquet as pq

        final = self.part(work.shard)
        if self.destination.resuming and self.destination.exists(final):
            return Outcome(present=work.kept.num_rows)
        rows = work.first_row + work.positions
        table = self._source().take(rows)
        self._check_ids(table, rows, work.kept.column("id").to_pylist())
        with self.write_file(self.destination, final) as handle:
            pq.write_table(table, handle)
        return Outcome(items=table.num_rows, files=1)

    def _source(self) -> RowReader:
        if self.source is None:
            from mv2batch.inputs.tables import DatasetSpec, load_split

            spec = DatasetSpec(self.name_given, self.split, streaming=self.streaming, storage_options=self.options)
            data, _ = load_split(spec)
            self.source = RowReader(data)
        return self.source

    def _check_ids(self, table: pa.Table, rows: np.ndarray, ids: list[str]) -> None:
        if self.id_column is None:
            found = [f"{self.split}/{row}" for row in rows]
        else:
            found = [value.get("path") if isinstance(value, dict) else None if value is None else str(value)
                     for value in table.column(self.id_column).to_pylist()]
        for row, got, want in zip(rows, found, ids):
            if got != want:
                raise InputError(f"row {row} of {self.name_given} is {got!r} but the run's row there is {want!r}: the "
                                 "table changed since the run (run it again, then filter)")


class RowReader:
    """Rows of a datasets split by number, as Arrow: picked directly from a map-style dataset, or met in order
    in a streamed one (then numbers must come in ascending order across calls)."""

    def __init__(self, data: datasets.Dataset | datasets.IterableDataset):
        self.data = data.with_format("arrow")
        self.streamed = not hasattr(data, "__len__")
        self.batches = iter(self.data.iter(batch_size=STREAM_BATCH_ROWS)) if self.streamed else None
        self.batch: pa.Table | None = None
        self.start = 0  # the current batch's first row

    def take(self, rows: np.ndarray) -> pa.Table:
        if not self.streamed:
            if len(rows) and rows[-1] >= len(self.data):
                raise InputError(f"the table has {len(self.data)} rows, fewer than the run read: it changed since")
            return self.data[rows.tolist()]
        import pyarrow as pa

        pieces, at = [], 0
        while at < len(rows):
            self._reach(int(rows[at]))
            end = self.start + self.batch.num_rows
            upto = at + int(np.searchsorted(rows[at:], end))
            pieces.append(self.batch.take(pa.array(rows[at:upto] - self.start)))
            at = upto
        return pa.concat_tables(pieces)

    def _reach(self, row: int) -> None:
        while self.batch is None or row >= self.start + self.batch.num_rows:
            if self.batch is not None:
                self.start += self.batch.num_rows
            self.batch = next(self.batches, None)
            if self.batch is None:
                raise InputError(f"the table ended before row {row}: it changed since the run")
