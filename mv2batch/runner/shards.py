"""The runner: a described and placed job's shards through the batch loop (planned, streamed, or failed rows
again), then the report. Engines (mv2batch.engines) call it; it never imports one."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import pyarrow as pa
    import torch

    from mv2batch.loading.decode import Decoded
    from mv2batch.loading.loader import DecodeGate
    from mv2batch.loading.shared_batches import Batch
    from mv2batch.runner.placement import Placement

from mv2batch.config import Decode
from mv2batch.errors import ConfigError
from mv2batch.inputs.eval_layouts import reduces_labels
from mv2batch.inputs.sources import Record, is_sharded
from mv2batch.loading import resources
from mv2batch.loading.decode import decode_image
from mv2batch.loading.gate_trial import GateTrial
from mv2batch.loading.loader import ImageDataset, make_loader
from mv2batch.model.device import float32_math as ieee_float32_math
from mv2batch.out.rundir import RunDir
from mv2batch.report.tables import Report, build_report, write_report
from mv2batch.runner import runinfo
from mv2batch.runner.batch_loop import BatchLoop, Counters, ProgressCallback, Shards, ShardState
from mv2batch.runner.job import Job

LoaderSettingsChoice = Callable[..., resources.LoaderSettings]  # resources.choose_loader_settings's signature
Reader = Callable[[int], Record]  # an item's record by its index
if TYPE_CHECKING:
    Decoder = Callable[..., Decoded]  # (raw, max_pixels, fast) -> the decoded image: loading.decode.decode_image
    Float32Math = Callable[[torch.device, torch.dtype], AbstractContextManager[None]]  # model.device.float32_math


def run_shards(job: Job, placement: Placement, rundir: RunDir, owns: Callable[[int], bool], rank: int = 0,
               progress: ProgressCallback | None = None,
               choose_loader_settings: LoaderSettingsChoice = resources.choose_loader_settings,
               part_writer: type | None = None, decode: Decoder = decode_image,
               float32_math: Float32Math = ieee_float32_math) -> Counters:
    """Run this process's shards that are not done yet (and, with --retry-errors, the failed rows of done ones).

    owns: which shards are this process's; rank: its number, recorded in the markers. choose_loader_settings: how
    the loader runs (resources.choose_loader_settings; a test passes its own to change one decision). part_writer:
    what writes a shard's part (out.writer.PartWriter; a test passes one that fails). decode: what the workers
    decode each image with (loading.decode.decode_image; a test's logs when it begins). float32_math: the block
    every batch runs in, given the device and dtype (model.device.float32_math; a test's spy sees it entered).
    """
    loop = build_loop(job, placement, rundir, rank, progress, choose_loader_settings, part_writer, decode)
    with float32_math(placement.device, placement.dtype):
        done = rundir.committed(job.fingerprint)
        if job.config.retry_errors and not is_sharded(job.source):
            _retry_errors(job, loop, rundir, done, owns)
        if is_sharded(job.source):
            _run_sharded(job, loop, done, owns)
        elif job.source.streamed:
            _run_stream(job, loop, rundir, done, owns)
        else:
            _run_planned(job, loop, done, owns)
    return loop.counters


def build_loop(job: Job, placement: Placement, rundir: RunDir, rank: int = 0, progress: ProgressCallback | None = None,
               choose_loader_settings: LoaderSettingsChoice = resources.choose_loader_settings,
               part_writer: type | None = None, decode: Decoder = decode_image) -> BatchLoop:
    """The batch loop of a job from its real parts: the task, the placement, a loader (whose workers decode with
    decode) and a writer."""
    from mv2batch.out.writer import BackgroundWriter

    settings = choose_loader_settings(job.config.workers, placement, job.preprocessing.resize_crop)
    schema = prediction_schema(job)
    factory = shard_loader_factory if is_sharded(job.source) else loader_factory
    return BatchLoop(
        task=job.task, placement=placement, make_loader=partial(factory, job, placement, settings, decode=decode),
        make_writer=lambda: BackgroundWriter(rundir, schema, job.task.prepare_columns, job.task.reorder_rows,
                                             part_writer=part_writer),
        item_id=job.source.item_id, shard_size=job.shard_size,
        marker_fields={"fingerprint": job.fingerprint, "rank": rank}, gate=settings.gate, progress=progress,
        gate_trial=settings.gate_trial or GateTrial(workers=settings.workers))


def loader_factory(job: Job, placement: Placement, settings: resources.LoaderSettings, read: Reader,
                   gate: DecodeGate | None, shards: Shards, decode: Decoder = decode_image) -> Iterator[Batch]:
    """A DataLoader over the records `read` gives, decoding (with decode) and resizing in settings.workers
    workers."""
    return make_loader(_images(job, placement, read, gate, decode), _index_batches(job, placement, shards, read),
                       settings.workers, settings.pin_memory, batch_bytes=settings.batch_bytes,
                       shared=settings.shared_memory)


def shard_loader_factory(job: Job, placement: Placement, settings: resources.LoaderSettings, read: Reader,
                         gate: DecodeGate | None, shards: Shards, decode: Decoder = decode_image) -> Iterator[Batch]:
    """A DataLoader whose workers stream whole shards of a sharded source (one worker per shard at a time),
    decoding each image with decode."""
    from mv2batch.loading.shard_loader import make_shard_loader

    return make_shard_loader(job.source, [number for number, _ in shards], _images(job, placement, None, None, decode),
                             placement.batch_size, settings.workers, settings.pin_memory, settings.batch_bytes, gate,
                             settings.shared_memory)


def _images(job: Job, placement: Placement, read: Reader | None, gate: DecodeGate | None,
            decode: Decoder = decode_image) -> ImageDataset:
    fast = placement.host_pixels.resize_crop if job.config.decode is Decode.fast else None
    return ImageDataset(read, placement.host_pixels, job.config.max_pixels,
                        reduce_labels=reduces_labels(job.config.source.value), gate=gate, fast=fast, decode=decode)


def _index_batches(job: Job, placement: Placement, shards: Shards, read: Reader) -> Iterator[list[int]]:
    """The batches of every shard in turn, made lazily so that probing image sizes never delays the start."""
    resize_crop = placement.host_pixels.resize_crop
    for _, indices in shards:
        yield from job.task.batches(indices, read, resize_crop, placement.batch_size)


def prediction_schema(job: Job) -> pa.Schema:
    from mv2batch.out.writer import prediction_schema as schema_of

    return schema_of(job.task.fields, runinfo.parquet_metadata(job.run_info))


def _run_planned(job: Job, loop: BatchLoop, done: dict[int, dict], owns: Callable[[int], bool]) -> None:
    plan = job.plan()
    todo = [s for s in range(plan.n_shards) if s not in done and owns(s)]
    loop.counters.total = sum(len(plan.shard(s)) for s in todo)
    loop.process([(s, plan.shard(s)) for s in todo], job.source.read)


def _run_sharded(job: Job, loop: BatchLoop, done: dict[int, dict], owns: Callable[[int], bool]) -> None:
    """Every pending shard of a sharded source (tars), read whole; --retry-errors runs a shard with error rows
    again whole, as a tar is read from its start either way."""
    retry = job.config.retry_errors
    todo = [n for n in range(job.run_info["plan"]["n_shards"])
            if owns(n) and (n not in done or (retry and done[n]["errors"]))]
    loop.process([(number, None) for number in todo], _no_index,
                 photo=lambda index, path: job.source.read_member(path))


def _no_index(index: int) -> Record:
    raise AssertionError("a sharded source is read by its shard loader, not by index")


def _run_stream(job: Job, loop: BatchLoop, rundir: RunDir, done: dict[int, dict],
                owns: Callable[[int], bool]) -> None:
    n_shards = 0
    for number, start, records in _stream_chunks(job.source.records(), job.shard_size, job.config.limit):
        n_shards = number + 1
        if number in done or not owns(number):
            continue
        loop.process([(number, range(start, start + len(records)))], ChunkReader(records, start))
    # Only now is the stream's length known; record it so that `mv2batch report` can tell a run is complete.
    run_info = rundir.read_run()
    if run_info is not None and n_shards != run_info["plan"].get("n_shards"):
        run_info["plan"].update({"n_shards": n_shards})
        rundir.write_run(run_info)


@dataclass
class ChunkReader:
    """Reads a stream's chunk by global index; a class, not a closure, so that spawned workers can unpickle it."""

    records: list[Record]
    start: int

    def __call__(self, index: int) -> Record:
        return self.records[index - self.start]


def _stream_chunks(records: Iterable[Record], size: int, limit: int | None) -> Iterator[tuple[int, int, list]]:
    chunk, start, number = [], 0, 0
    for position, record in enumerate(records):
        if limit is not None and position >= limit:
            break
        chunk.append(record)
        if len(chunk) == size:
            yield number, start, chunk
            chunk, start, number = [], start + size, number + 1
    if chunk:
        yield number, start, chunk


def _retry_errors(job: Job, loop: BatchLoop, rundir: RunDir, done: dict[int, dict],
                  owns: Callable[[int], bool]) -> None:
    """Run the failed rows of committed shards again; rewrite each such shard with the new rows in place."""
    if job.source.streamed:
        raise ConfigError("--retry-errors needs a folder or a non-streaming dataset")
    plan = job.plan()
    retry = {n: m for n, m in sorted(done.items()) if m["errors"] and owns(n)}
    for number, marker in retry.items():
        _retry_shard(job, loop, rundir, number, marker, plan.shard(number))


def _retry_shard(job: Job, loop: BatchLoop, rundir: RunDir, number: int, marker: dict, indices: range) -> None:
    from mv2batch.out.writer import POSITION, PartWriter

    rows = rundir.read_part(number).to_pylist()
    failed = [position for position, row in enumerate(rows) if row["status"] == "error"]
    state = ShardState(number, len(failed), job.task.new_counts())
    loop.counters.total = (loop.counters.total or 0) + len(failed)
    for _, columns in loop.predict([(number, [indices[p] for p in failed])], job.source.read, {number: state}):
        job.task.prepare_columns(columns)
        for values in zip(*columns.values()):
            row = dict(zip(columns, values))
            rows[row.pop(POSITION) - indices.start] = row
    part = PartWriter(rundir, number, prediction_schema(job))
    part.write({name: [row[name] for row in rows] for name in rows[0]})
    part.commit()
    merged = job.task.counts_from_json(marker["metrics"]).merge(state.counts)
    updated = {**marker, "errors": sum(row["status"] == "error" for row in rows), "metrics": merged.to_json(),
               "retried": marker.get("retried", 0) + 1}
    rundir.write_marker(number, updated)


def finish(job: Job, rundir: RunDir, ran_now: int, elapsed: float, write: bool) -> Report:
    """Merge every marker; write the report once every shard of the plan is done (by one process)."""
    run_info = rundir.read_run() or job.run_info  # a stream's shard count is known once read
    report = build_report(rundir, run_info, rundir.committed(job.fingerprint), job.task)
    report.ran_now, report.elapsed_s = ran_now, elapsed
    if report.complete and write:
        write_report(report, rundir)
    return report
