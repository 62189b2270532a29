"""The run a filter reads: finished (every planned shard committed), its parts' row counts and one schema, a
part's columns for judging and its kept rows; --unique's duplicates.parquet, refused when missing or stale.

Parts are read through the run's own files (a folder or an object store alike), a part at a time: a run of
millions of rows is never held whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mv2batch import storage
from mv2batch.errors import OutputError
from mv2batch.filter.predicate import ROW
from mv2batch.out.rundir import RunDir, open_run

if TYPE_CHECKING:
    import pyarrow as pa

READ_BATCH_ROWS = 8192
FOOTER_READERS = 16  # parts' footers fetched at once (an object store answers each in a round trip)


@dataclass
class FinishedRun:
    """A finished run: its shards in order, each one's rows, and the schema every part is read as."""

    rundir: RunDir
    info: dict
    shards: list[int]
    rows: list[int]
    schema: pa.Schema  # the parts' schemas unified (an older part may lack a column)

    @property
    def out(self) -> str:
        """OUT as filter.json records it (a local one absolute: the same run, whatever folder the command ran in)."""
        root = self.rundir.root
        return str(root.resolve()) if isinstance(root, Path) else root

    def judged_columns(self, shard: int, columns: set[str]) -> pa.Table:
        """The part's columns the judge reads (a column the part lacks: nulls), and each row's position."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        wanted = [name for name in self.schema.names if name in columns]
        with self.rundir.files.open_read(self.rundir.part_path(shard)) as handle:
            present = set(pq.read_schema(handle).names)
            handle.seek(0)
            table = pq.read_table(handle, columns=[name for name in wanted if name in present])
        for field in (self.schema.field(name) for name in wanted if name not in present):
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        return table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))

    def kept_rows(self, shard: int, positions: np.ndarray) -> pa.Table:
        """Every column of the part's rows at positions (ascending), read a batch at a time, as self.schema."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pieces, start = [], 0
        if not len(positions):
            return self.schema.empty_table()
        with self.rundir.files.open_read(self.rundir.part_path(shard)) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_BATCH_ROWS):
                inside = positions[(positions >= start) & (positions < start + batch.num_rows)] - start
                if len(inside):
                    pieces.append(_as_schema(pa.Table.from_batches([batch.take(pa.array(inside))]), self.schema))
                start += batch.num_rows
                if start > positions[-1]:
                    break  # the rest of the part holds no kept row
        return pa.concat_tables(pieces) if pieces else self.schema.empty_table()


def _as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """table with schema's columns, in its order (a missing one as nulls)."""
    import pyarrow as pa

    columns = [table.column(field.name).cast(field.type) if field.name in table.column_names
               else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def open_finished(out: Path | str, options: dict | None = None) -> FinishedRun:
    """OUT's run when every planned shard is committed; else one line."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    rundir, info = open_run(out, options)
    committed = rundir.committed(info["fingerprint"])
    planned = info.get("plan", {}).get("n_shards")
    if planned is None or sorted(committed) != list(range(planned)):
        raise OutputError(f"{out} is not a finished run ({len(committed)} of {planned or 'an unknown number of'} "
                          "shards committed): resume it, then filter")
    shards = list(range(planned))
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        footers = list(pool.map(lambda shard: _footer(rundir, shard), shards))
    schema = pa.unify_schemas([schema for _, schema in footers])
    return FinishedRun(rundir, info, shards, [rows for rows, _ in footers], schema)


def _footer(rundir: RunDir, shard: int) -> tuple[int, pa.Schema]:
    import pyarrow.parquet as pq

    with rundir.files.open_read(rundir.part_path(shard)) as handle:
        part = pq.ParquetFile(handle)
        return part.metadata.num_rows, part.schema_arrow


@dataclass(frozen=True)
class Duplicates:
    """--unique: the ids to drop (every item of a group but its first) and what dedup read."""

    ids: pa.Array  # of strings
    threshold: float | None
    shards: list[int]


def duplicates_of(run: FinishedRun) -> Duplicates:
    """OUT/report/duplicates.parquet, when dedup read every shard of the run and none changed since; else one
    line saying to run dedup first."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    where = storage.join(run.rundir.report, "duplicates.parquet")
    again = f"run `mv2batch dedup {run.out}` first, then filter --unique"
    if not run.rundir.files.exists(where):
        raise OutputError(f"{run.out} has no duplicate groups (no report/duplicates.parquet): {again}")
    with run.rundir.files.open_read(where) as handle:
        table = pq.read_table(handle, columns=["id", "duplicate_of"])
    metadata = table.schema.metadata or {}
    read = json.loads(metadata.get(b"mv2batch.shards", b"[]"))
    if set(run.shards) - set(read):
        raise OutputError(f"{run.out}'s duplicate groups are older than the run (dedup read {len(read)} of "
                          f"{len(run.shards)} shards): {again}")
    changed = _changed_since(run, where)
    if changed is not None:
        raise OutputError(f"{run.out}'s duplicate groups are older than the run's part {changed}: {again}")
    threshold = json.loads(metadata[b"mv2batch.threshold"]) if b"mv2batch.threshold" in metadata else None
    ids = table.column("id").filter(pc.is_valid(table.column("duplicate_of"))).combine_chunks()
    return Duplicates(ids, threshold, sorted(read))


def _changed_since(run: FinishedRun, duplicates: Path | str) -> str | None:
    """The name of a part written after duplicates.parquet (a shard retried since dedup), if any."""
    times = _modified_times(run.rundir.predictions, run.rundir.options)
    written = _modified_times(run.rundir.report, run.rundir.options).get("duplicates.parquet")
    if written is None:
        return None  # the store does not say when: the shards read are checked above
    later = sorted(name for name, when in times.items() if name.endswith(".parquet") and when > written)
    return later[0] if later else None


def _modified_times(folder: Path | str, options: dict | None) -> dict[str, float]:
    """When each file right under folder was last written (seconds since the epoch), where that is known."""
    if isinstance(folder, Path):
        return {path.name: path.stat().st_mtime for path in folder.iterdir() if path.is_file()}
    entries = storage.as_os_error(lambda: storage.filesystem(folder, options).ls(folder, detail=True, refresh=True))
    found = {}
    for entry in entries:
        when = next((entry[key] for key in ("LastModified", "mtime", "last_modified", "updated", "modified")
                     if entry.get(key) is not None), None)
        if when is not None:
            found[storage.name_of(entry["name"])] = _seconds(when)
    return found


def _seconds(when: datetime | str | float) -> float:
    if isinstance(when, datetime):
        return when.timestamp()
    if isinstance(when, str):
        return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    return float(when)
