"""The writer: rows to one Parquet part per shard, in a background thread, committed by rename, then marked done."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from mv2batch.errors import OutputError
from mv2batch.out.rundir import RunDir

COMMON_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("path", pa.string()),
    pa.field("shard", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("sha256", pa.string()),  # of the encoded image bytes: exact duplicates (dedup)
]
ROW_GROUP_ROWS = 4096
POSITION = "_index"  # the item index that travels with each row, used for ordering, never written


def prediction_schema(task_fields: list[pa.Field], metadata: dict[str, Any]) -> pa.Schema:  # JSON values
    """The Parquet schema of the README's "Output" section, with the run's identity in the key-value metadata."""
    encoded = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    return pa.schema(COMMON_FIELDS + task_fields, metadata=encoded)


class PartWriter:
    """One shard's Parquet part, in a temporary file: row groups as rows come, or sorted at commit.

    reorder: rows arrive out of input order (segmentation batches group images by shape), so they are
    kept until the shard is complete and written sorted by item index.
    """

    def __init__(self, rundir: RunDir, shard: int, schema: pa.Schema, reorder: bool = False):
        self.rundir, self.shard, self.temp = rundir, shard, rundir.part_temp(shard)
        self.schema, self.reorder = schema, reorder
        self.buffer: list[pa.RecordBatch] = []
        self.positions: list[int] = []
        self.buffered = 0
        self.writer = pq.ParquetWriter(self.temp, schema, compression="zstd")

    def write(self, columns: dict[str, list]) -> None:
        self.positions += columns.get(POSITION) or []
        batch = pa.RecordBatch.from_pydict({f.name: columns[f.name] for f in self.schema}, schema=self.schema)
        self.buffer.append(batch)
        self.buffered += batch.num_rows
        if self.buffered >= ROW_GROUP_ROWS and not self.reorder:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            table = pa.Table.from_batches(self.buffer, schema=self.schema)
            if self.reorder and len(self.positions) == table.num_rows:
                table = table.take(sorted(range(table.num_rows), key=self.positions.__getitem__))
            self.writer.write_table(table, row_group_size=min(max(self.buffered, 1), ROW_GROUP_ROWS))
        self.buffer, self.positions, self.buffered = [], [], 0

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        self.rundir.commit_part(self.shard, self.temp)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        self.temp.unlink(missing_ok=True)


class BackgroundWriter:
    """A thread that owns the part writers so that Parquet encoding and disk I/O stay off the compute loop."""

    def __init__(self, rundir: RunDir, schema: pa.Schema, prepare: Callable[[dict], None] | None = None,
                 reorder: bool = False, max_pending: int = 16, part_writer: type[PartWriter] | None = None):
        """part_writer: what writes one shard's part (PartWriter; a test passes one that fails, as a full disk)."""
        self.rundir, self.schema, self.prepare, self.reorder = rundir, schema, prepare, reorder
        self.part_writer = part_writer or PartWriter
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.parts: dict[int, PartWriter] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="mv2batch-writer", daemon=True)
        self.thread.start()

    def write(self, shard: int, columns: dict[str, list]) -> None:
        """Queue rows of one shard (blocks when the writer is behind, bounding memory)."""
        self._put(("rows", shard, columns))

    def commit(self, shard: int, marker: dict) -> None:
        """Queue the commit of a finished shard: close its part, commit it (rename or upload), then its marker."""
        self._put(("commit", shard, marker))

    def close(self) -> None:
        """Finish every queued write; raise the writer's error if it had one."""
        self._put(("stop", None, None))
        self.thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing anything still open (their shards run again next time)."""
        if self.thread.is_alive():
            self.queue.put(("abort", None, None))
            self.thread.join()

    def _put(self, item: tuple) -> None:
        self._raise_if_failed()
        while self.thread.is_alive():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _loop(self) -> None:
        while True:
            kind, shard, payload = self.queue.get()
            if kind in ("stop", "abort"):
                self._abort_open()
                return
            try:
                self._handle(kind, shard, payload)
            except BaseException as exc:  # reported to the main thread on its next call
                self.error = _as_output_error(exc)
                self._abort_open()
                return

    def _handle(self, kind: str, shard: int, payload: dict) -> None:  # rows: the columns; commit: the marker
        if kind == "rows":
            if self.prepare is not None:
                self.prepare(payload)
            if shard not in self.parts:
                self.parts[shard] = self.part_writer(self.rundir, shard, self.schema, self.reorder)
            self.parts[shard].write(payload)
        elif kind == "commit":
            part = self.parts.pop(shard, None) or self.part_writer(self.rundir, shard, self.schema, self.reorder)
            part.commit()
            self.rundir.write_marker(shard, payload)

    def _abort_open(self) -> None:
        for part in self.parts.values():
            part.abort()
        self.parts.clear()


def _as_output_error(exc: BaseException) -> BaseException:
    if isinstance(exc, OutputError):
        return exc
    text = str(exc)
    if "No space left" in text or getattr(exc, "errno", None) == 28:
        return OutputError("disk full while writing predictions: free some space and re-run to continue")
    if isinstance(exc, OSError):
        return OutputError(f"cannot write predictions: {text.splitlines()[0] if text else type(exc).__name__}")
    return exc
