"""The runner: source -> shard plan -> loader -> device -> model -> post-process -> writer -> markers -> report."""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import inputs, models, runinfo
from .allocator import keep_freed_memory, limit_kernel_cache
from .config import RunConfig, SourceKind
from .errors import ConfigError, Mv2batchError
from .loader import DecodeGate, ImageDataset, make_loader
from .plan import Group, Rank, ShardPlan, rank_from_env
from .preprocess import Preprocessing
from .report import Report, build_report, write_report
from .rundir import RunDir, write_json_atomic
from .sources import Record


@dataclass(frozen=True)
class ProgressUpdate:
    """Sent to the progress callback after every batch."""

    done: int
    total: int | None
    errors: int


ProgressCallback = Callable[[ProgressUpdate], None]


@dataclass
class Context:
    """Everything the batch loop needs, built once."""

    config: RunConfig
    source: Any
    rundir: RunDir
    run_info: dict
    preprocessing: Preprocessing
    rank: Rank
    task: Any = None
    device: Any = None
    model: Any = None
    pixel_stage: Any = None
    host_pixels: Any = None  # the workers' part of the preprocessing (preprocess.HostPixels)
    progress: ProgressCallback | None = None
    done: int = 0
    errors: int = 0
    total: int | None = None


def run(config: RunConfig, progress: ProgressCallback | None = None) -> Report:
    """Run one job end to end and return its report (the library's main entry point)."""
    if config.engine.value == "ray":
        from .ray_engine import run_on_ray

        return run_on_ray(config, progress)
    from .device import float32_math

    started = time.perf_counter()
    rank = rank_from_env()
    group = Group(rank)
    ctx = None
    try:
        ctx = _prepare(config, progress, rank, group)
        with float32_math(ctx.device, ctx.pixel_stage.dtype):
            done = ctx.rundir.committed(ctx.run_info["fingerprint"])
            if config.retry_errors:
                _retry_errors(ctx, done)
            if hasattr(ctx.source, "read"):
                _run_planned(ctx, done)
            else:
                _run_stream(ctx, done)
        group.barrier()
        return _finish(ctx, time.perf_counter() - started, write=rank.is_first or not group.active)
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise
        raise Mv2batchError(_out_of_memory(ctx)) from None
    finally:
        group.close()


def _out_of_memory(ctx: Context | None) -> str:
    """One line for a device that ran out of memory: while placing the model, or on a batch."""
    if ctx is None:
        return "the device ran out of memory while loading the model: free the GPU, or use a smaller model"
    return (f"the {ctx.device.type.upper()} device ran out of memory at --batch-size {ctx.config.batch_size}: "
            f"lower --batch-size (finished shards are kept; --resume continues the run)")


def _prepare(config: RunConfig, progress: ProgressCallback | None, rank: Rank, group: Group) -> Context:
    from .device import PixelStage, pick_device, pick_dtype
    from .tasks import make_task

    name = config.task.value
    source = inputs.open_source(config)  # a wrong input path is the cheapest mistake to report, so first
    model_name = config.model or models.DEFAULT_MODELS[name]
    resolved = models.resolve_model(model_name, config.revision)
    model_config = models.read_config(resolved.folder)
    models.check_head(model_config, name, model_name)
    labels = models.label_names(model_config)
    inputs.check_classes(config, labels, model_name)
    task = make_task(config, labels)
    protocol = config.preprocess.value if config.preprocess else task.default_protocol
    preprocessing = task.preprocessing(protocol, lambda: models.load_processor(resolved.folder, model_name),
                                       model_name)
    device = pick_device(config.device, rank.local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # reuse activation memory between layers instead of page-faulting it in again
        limit_kernel_cache()  # before the first convolution: oneDNN reads it then
    dtype = pick_dtype(config.dtype.value, device)
    if config.batch_size is None:
        config = replace(config, batch_size=default_batch_size(
            name, device, dtype, model_config.get("width_multiplier", 1.0), _typical_pixels(preprocessing)))
    module = models.load_weights(resolved.folder, name, model_name)  # refuse a bad checkpoint before OUT is touched
    run_info = runinfo.describe_run(config, source, resolved, preprocessing, dtype, labels)
    rundir = RunDir(config.out)
    _prepare_rundir(rundir, run_info, config, rank, group)
    ctx = Context(config, source, rundir, run_info, preprocessing, rank, task=task, device=device,
                  progress=progress)
    ctx.model = _place_model(module, device, dtype, config)
    ctx.host_pixels, device_norm = preprocessing.stages(flip_on_host=device.type == "cpu")
    # The pixel stage emits the memory layout the optimized model runs in, so its stem need not convert.
    from .speed import wants_channels_last_input

    ctx.pixel_stage = PixelStage(device_norm, device, dtype, channels_last=wants_channels_last_input(ctx.model))
    return ctx


def _prepare_rundir(rundir: RunDir, run_info: dict, config: RunConfig, rank: Rank, group: Group) -> None:
    """The first process creates (or wipes) OUT; the others join once it has, where a barrier allows."""
    if rank.world_size > 1 and config.overwrite and not group.active:
        raise ConfigError("--overwrite needs one process (or torchrun) to clear OUT before the others start: "
                          "clear OUT first, then launch the processes without --overwrite")
    owns = _owner(config, rank)
    if rank.is_first:
        rundir.prepare(run_info, config.overwrite, config.resume, owns)
    group.barrier()
    if not rank.is_first:
        rundir.prepare(run_info, False, config.resume, owns)


def _place_model(module: Any, device: Any, dtype: Any, config: RunConfig) -> Any:
    import torch

    from .speed import choose_speedups, optimize_for_inference

    chosen = choose_speedups(config.speedups, device, dtype, config.compile)
    if chosen is not None:
        # BatchNorm is folded (where chosen) in float64 before the cast; compile changes which rewrites pay.
        module = optimize_for_inference(module, device, dtype, speedups=chosen, compile=config.compile)
    else:
        module = module.to(device=device, dtype=dtype)
    return torch.compile(module) if config.compile else module


def _workers(ctx: Context) -> int:
    if ctx.config.workers is not None:
        return ctx.config.workers
    return default_workers(ctx.device.type, between_passes=decode_between_passes(ctx.device, ctx.model))


def decode_between_passes(device: Any, model: Any) -> bool:
    """Whether loader workers should decode only between forward passes (loader.DecodeGate).

    So on a CPU of at most DECODE_GAPS_MAX_CORES cores when one OpenMP team of several threads runs each pass
    (the exact set, --no-speedups, --compile). Measured on 2 cores: the exact set at 90 % of the model alone this
    way against 86 % with a worker beside the team. On a 16-core machine it did not pay (69-82 images/s against
    81-106 with workers beside a 16-thread team: its threads wait for each other on small micro-batches anyway,
    and the workers use those moments). Parallel single-threaded streams (the all set) are not stalled by a busy
    core, and a GPU computes while the host decodes.
    """
    import torch

    team = getattr(model, "mv2batch_streams", None) is None and torch.get_num_threads() > 1
    return device.type == "cpu" and team and _cores() <= DECODE_GAPS_MAX_CORES


DECODE_GAPS_MAX_CORES = 4  # measured at 2 (pays) and 16 (does not); between the two, a judgment


def _cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# A bound on memory, not a measured optimum: each worker keeps its prefetched batches (50 MB each at batch 256) in
# shared memory. Measured on a 16-core GPU machine: about 240 images/s per worker, 3,657 images/s with 15.
MAX_GPU_WORKERS = 32


def default_workers(device_type: str, environ: dict | None = None, between_passes: bool = False) -> int:
    """Loader workers for one process. On the CPU the model needs the cores too: half of them, at most 4;
    every core, at most 4, where the workers decode only between passes (between_passes: they never compete
    with the model).

    On a GPU the input is the limit (decoding ~240 photos/s per worker against 9,000 images/s of bf16 model on
    an H200), so every core but one of this process's share: the CPUs it may run on, divided among the
    processes that torchrun or Slurm start on this host, unless its affinity already gives it only its own.
    """
    cores = _cores()
    if device_type == "cpu":
        return max(1, min(4, cores if between_passes else cores // 2))
    if cores >= (os.cpu_count() or cores):
        cores //= _processes_on_this_host(os.environ if environ is None else environ)
    return max(1, min(MAX_GPU_WORKERS, cores - 1))


DEFAULT_BATCH_SIZE = 32
# Measured on an H200 (docs/benchmarks.md): the fp32 model alone peaks at 5.7 GiB for 256 images of 256x256 at width
# 1.0 (3.0 GiB at 0.5, 11.3 at 2.0: about linear in the width); end to end, 256 per pass ran 20 % (fp32) and
# 28 % (bf16) faster than 32.
GPU_BYTES_PER_IMAGE = 23 * 2**20  # one 256x256 image, width 1.0, float32
GPU_BATCH_SIZES = (256, 128, 64)


def default_batch_size(task: str, device: Any, dtype: Any, width: float, pixels: int) -> int:
    """Images per forward pass when --batch-size is not given.

    Classification on a GPU: the largest of 256 / 128 / 64 whose activations take at most half the free device
    memory. Otherwise 32: the CPU cuts batches into cache-sized micro-batches whatever their size, and a
    segmentation batch holds whole photos, grouped by shape.
    """
    import torch

    if device.type != "cuda" or task != "classify":
        return DEFAULT_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    per_image = GPU_BYTES_PER_IMAGE * width * pixels / 256**2 * dtype.itemsize / 4
    return next((size for size in GPU_BATCH_SIZES if size * per_image <= free / 2), DEFAULT_BATCH_SIZE)


def _processes_on_this_host(environ: dict) -> int:
    """torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks per node ("4" or "4(x2)"), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        digits = re.match(r"\d+", environ.get(name, ""))
        if digits and int(digits.group()) > 0:
            return int(digits.group())
    return 1


# ---- the batch loop ----------------------------------------------------------------------------------------


@dataclass
class ShardState:
    """Counters of one shard while its batches flow."""

    number: int
    expected_rows: int
    counts: Any
    rows: int = 0
    errors: int = 0
    started: float | None = None  # when the shard's first batch arrived
    compute_s: float = 0.0
    wait_s: float = 0.0


def _run_planned(ctx: Context, done: dict[int, dict]) -> None:
    plan = ShardPlan(ctx.run_info["plan"]["n_items"], ctx.run_info["plan"]["shard_size"])
    todo = [s for s in range(plan.n_shards) if s not in done and _runs_here(ctx, s)]
    ctx.total = sum(len(plan.shard(s)) for s in todo)
    _process_shards(ctx, [(s, plan.shard(s)) for s in todo], ctx.source.read)


def _run_stream(ctx: Context, done: dict[int, dict]) -> None:
    shard_size = ctx.run_info["plan"]["shard_size"]
    n_shards = 0
    for number, start, records in _stream_chunks(ctx.source.records(), shard_size, ctx.config.limit):
        n_shards = number + 1
        if number in done or not _runs_here(ctx, number):
            continue
        indices = range(start, start + len(records))
        _process_shards(ctx, [(number, indices)], ChunkReader(records, start))
    # Only now is the stream's length known; record it so that `mv2batch report` can tell a run is complete.
    if n_shards != ctx.run_info["plan"].get("n_shards"):
        ctx.run_info["plan"].update({"n_shards": n_shards})
        write_json_atomic(ctx.rundir.run_json, ctx.run_info)


@dataclass
class ChunkReader:
    """Reads a stream's chunk by global index; a class, not a closure, so that spawned workers can unpickle it."""

    records: list[Record]
    start: int

    def __call__(self, index: int) -> Record:
        return self.records[index - self.start]


def _runs_here(ctx: Context, shard: int) -> bool:
    return _owner(ctx.config, ctx.rank)(shard)


def _owner(config: RunConfig, rank: Rank) -> Callable[[int], bool]:
    """This process's shards: by rank, narrowed to the ones an engine task was given."""
    only = config.only_shards
    return lambda shard: rank.owns(shard) and (only is None or shard in only)


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


def _index_batches(ctx: Context, shards: list[tuple[int, Sequence[int]]], read: Callable) -> Iterator[list[int]]:
    """The batches of every shard in turn, made lazily so that probing image sizes never delays the start."""
    resize_crop = ctx.preprocessing.resize_crop
    for _, indices in shards:
        yield from ctx.task.batches(indices, read, resize_crop, ctx.config.batch_size)


def _predict(ctx: Context, shards: list[tuple[int, Sequence[int]]], read: Callable,
             states: dict[int, ShardState]) -> Iterator[tuple[ShardState, dict[str, list]]]:
    """Run the shards through one DataLoader and the model; yield each batch's rows with its shard's state."""
    import torch

    from .speed import one_ahead

    workers = _workers(ctx)
    gate = _decode_gate(ctx, workers)
    dataset = ImageDataset(read, ctx.host_pixels, ctx.config.max_pixels,
                           reduce_labels=ctx.config.source is SourceKind.ade20k, gate=gate)
    loader = make_loader(dataset, _index_batches(ctx, shards, read), workers, ctx.device.type == "cuda",
                         batch_bytes=_typical_batch_bytes(ctx))
    if ctx.progress:
        ctx.progress(ProgressUpdate(ctx.done, ctx.total, ctx.errors))
    with torch.inference_mode():
        started = _started_batches(ctx, loader, states, gate)
        for state, batch, results in one_ahead(ctx.model, started, _queued(ctx)):
            yield state, _batch_rows(ctx, state, batch, results)
            if ctx.progress:
                ctx.progress(ProgressUpdate(ctx.done, ctx.total, ctx.errors))


def _decode_gate(ctx: Context, workers: int) -> DecodeGate | None:
    """A gate where workers should decode between passes and are enough to use every core of the team then
    (fewer, as with --workers 1 on 2 cores, would leave a core idle there: measured slower than no gate)."""
    import torch

    enough = workers >= torch.get_num_threads()
    return DecodeGate() if enough and decode_between_passes(ctx.device, ctx.model) else None


def _typical_batch_bytes(ctx: Context) -> int:
    """A batch's uint8 pixels: what the loader's workers share."""
    return ctx.config.batch_size * _typical_pixels(ctx.preprocessing) * 3


def _typical_pixels(preprocessing: Preprocessing) -> int:
    """Pixels of one model input: exact with a crop; else as for a 4:3 photo."""
    resize_crop = preprocessing.resize_crop
    if resize_crop.crop_height is not None:
        return resize_crop.crop_height * resize_crop.crop_width
    if resize_crop.shortest_edge is not None:
        return resize_crop.shortest_edge * (resize_crop.shortest_edge * 4 // 3)
    return 768 * 1024


def _started_batches(ctx: Context, loader: Iterator, states: dict[int, ShardState],
                     gate: DecodeGate | None = None) -> Iterator[tuple]:
    """(shard state, batch, results) for each batch of the loader, the model started on it (and, with a gate,
    done: the workers wait while it runs)."""
    shard_size = ctx.run_info["plan"]["shard_size"]
    while True:
        waited = time.perf_counter()
        batch = next(loader, None)
        if batch is None:
            return
        state = states[batch.samples[0].index // shard_size]
        state.started = state.started or waited
        state.wait_s += time.perf_counter() - waited
        with gate.paused() if gate else contextlib.nullcontext():
            results = _start_batch(ctx, state, batch)
        yield state, batch, results


def _schema(ctx: Context) -> Any:
    from .writer import prediction_schema

    return prediction_schema(ctx.task.fields, runinfo.parquet_metadata(ctx.run_info))


def _writer(ctx: Context) -> Any:
    from .writer import BackgroundWriter

    return BackgroundWriter(ctx.rundir, _schema(ctx), ctx.task.prepare_columns, ctx.task.reorder_rows)


def _process_shards(ctx: Context, shards: list[tuple[int, Sequence[int]]], read: Callable) -> None:
    """Run the given shards through one DataLoader, committing each shard when its last row is written."""
    if not shards:
        return
    if hasattr(ctx.task, "files"):
        ctx.task.files.read = read
    states = {number: ShardState(number, len(indices), ctx.task.new_counts()) for number, indices in shards}
    writer = _writer(ctx)
    try:
        for state, columns in _predict(ctx, shards, read, states):
            writer.write(state.number, columns)
            if state.rows == state.expected_rows:
                writer.commit(state.number, _marker(ctx, state))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _retry_errors(ctx: Context, done: dict[int, dict]) -> None:
    """Run the failed rows of committed shards again; rewrite each such shard with the new rows in place."""
    if not hasattr(ctx.source, "read"):
        raise ConfigError("--retry-errors needs a folder or a non-streaming dataset")
    plan = ShardPlan(ctx.run_info["plan"]["n_items"], ctx.run_info["plan"]["shard_size"])
    retry = {n: m for n, m in sorted(done.items()) if m["errors"] and _runs_here(ctx, n)}
    for number, marker in retry.items():
        _retry_shard(ctx, number, marker, plan.shard(number))


def _retry_shard(ctx: Context, number: int, marker: dict, indices: range) -> None:
    import pyarrow.parquet as pq

    from .writer import POSITION, PartWriter

    rows = pq.read_table(ctx.rundir.part_path(number)).to_pylist()
    failed = [position for position, row in enumerate(rows) if row["status"] == "error"]
    state = ShardState(number, len(failed), ctx.task.new_counts())
    ctx.total = (ctx.total or 0) + len(failed)
    for _, columns in _predict(ctx, [(number, [indices[p] for p in failed])], ctx.source.read, {number: state}):
        ctx.task.prepare_columns(columns)
        for values in zip(*columns.values()):
            row = dict(zip(columns, values))
            rows[row.pop(POSITION) - indices.start] = row
    part = PartWriter(ctx.rundir, number, _schema(ctx))
    part.write({name: [row[name] for row in rows] for name in rows[0]})
    part.commit()
    merged = ctx.task.counts_from_json(marker["metrics"]).merge(state.counts)
    updated = {**marker, "errors": sum(row["status"] == "error" for row in rows), "metrics": merged.to_json(),
               "retried": marker.get("retried", 0) + 1}
    write_json_atomic(ctx.rundir.marker_path(number), updated)


def _batch_rows(ctx: Context, state: ShardState, batch: Any, results: Callable[[], list]) -> dict[str, list]:
    """Model outputs for the batch's ok images, and one row per sample, errors included, in order."""
    outputs: list[dict | None] = [None] * len(batch.samples)
    computed = time.perf_counter()
    for positions, group_outputs in results():
        for position, output in zip(positions, group_outputs):
            outputs[position] = output
    state.compute_s += time.perf_counter() - computed
    columns: dict[str, list] = {}
    for sample, output in zip(batch.samples, outputs):
        if output is not None:
            ctx.task.count(state.counts, sample, output)
        for name, value in _row(ctx, state, sample, output).items():
            columns.setdefault(name, []).append(value)
    errors = sum(output is None for output in outputs)
    state.rows, state.errors = state.rows + len(batch.samples), state.errors + errors
    ctx.done, ctx.errors = ctx.done + len(batch.samples), ctx.errors + errors
    return columns


def _start_batch(ctx: Context, state: ShardState, batch: Any) -> Callable[[], list[tuple[list[int], list]]]:
    """Start the model on a batch; the result gives (positions, outputs) per part once they are ready.

    The shape groups are cut into the model's micro-batches (where it has them) before the pixel stage, so that
    only one micro-batch at a time is in float (a batch of 32 at 256x256 is 25 MB in float32), and run side by
    side on its parallel streams (a segmentation batch holds many shapes of one or two photos each); without
    streams this computes them now.
    """
    from .speed import micro_batch_images, start_in_streams

    parts = []
    for positions, pixels in batch.groups:  # uint8 NHWC
        size = micro_batch_images(ctx.model, pixels.shape[1], pixels.shape[2]) or len(positions)
        parts += [(positions[i : i + size], pixels[i : i + size]) for i in range(0, len(positions), size)]

    def infer(part: tuple[list[int], Any]) -> Callable[[], list[dict]]:
        positions, pixels = part
        return ctx.task.start(ctx.model, ctx.pixel_stage(pixels), [batch.samples[p] for p in positions])

    computed = time.perf_counter()
    started = start_in_streams(ctx.model, infer, parts)
    state.compute_s += time.perf_counter() - computed
    # Each part's outputs are read when asked for: on a GPU that waits for its queued work.
    return lambda: list(zip((positions for positions, _ in parts), (outputs() for outputs in started())))


def _queued(ctx: Context) -> bool:
    """Whether a batch's work is queued on the device and read back later (CUDA), or done when started."""
    return ctx.device.type == "cuda"


def _row(ctx: Context, state: ShardState, sample: Any, output: dict | None) -> dict:
    from .writer import POSITION

    common = {
        "id": ctx.source.item_id(sample.index), "path": sample.path, "shard": state.number,
        "width": sample.width, "height": sample.height, "status": "ok" if output is not None else "error",
        "error": sample.error, POSITION: sample.index,
    }
    return {**common, **ctx.task.row(sample, output)}


def _marker(ctx: Context, state: ShardState) -> dict:
    return {
        "shard": state.number, "fingerprint": ctx.run_info["fingerprint"],
        "part": ctx.rundir.part_path(state.number).name, "rows": state.rows, "errors": state.errors,
        "metrics": state.counts.to_json(), "rank": ctx.rank.rank,
        "timings": {"seconds": time.perf_counter() - state.started, "compute_s": state.compute_s,
                    "wait_input_s": state.wait_s},
    }


def _finish(ctx: Context, elapsed: float, write: bool) -> Report:
    """Merge every marker; write the report once every shard of the plan is done (by one process)."""
    markers = ctx.rundir.committed(ctx.run_info["fingerprint"])
    report = build_report(ctx.rundir, ctx.run_info, markers, ctx.task)
    report.ran_now = ctx.done
    report.elapsed_s = elapsed
    if report.complete and write:
        write_report(report, ctx.rundir)
    return report
