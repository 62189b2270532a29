"""The runner: source -> shard plan -> loader -> device -> model -> post-process -> writer -> markers -> report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from . import models
from .config import Protocol, RunConfig, SourceKind
from .errors import ConfigError
from .loader import ImageDataset, make_loader, shard_batches
from .metrics import ClassifyCounts
from .plan import DEFAULT_SHARD_SIZE, Group, Rank, ShardPlan, rank_from_env
from .preprocess import Preprocessing, hf_preprocessing, paper_preprocessing
from .report import Report, build_report, write_report
from .rundir import RunDir, fingerprint_of, write_json_atomic
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
    labels: list[str]
    rank: Rank
    device: Any = None
    model: Any = None
    pixel_stage: Any = None
    progress: ProgressCallback | None = None
    done: int = 0
    errors: int = 0
    total: int | None = None


def run(config: RunConfig, progress: ProgressCallback | None = None) -> Report:
    """Run one classification job end to end and return its report (the library's main entry point)."""
    started = time.perf_counter()
    rank = rank_from_env()
    group = Group(rank)
    try:
        ctx = _prepare(config, progress, rank, group)
        done = ctx.rundir.committed(ctx.run_info["fingerprint"])
        if config.retry_errors:
            _retry_errors(ctx, done)
        if hasattr(ctx.source, "read"):
            _run_planned(ctx, done)
        else:
            _run_stream(ctx, done)
        group.barrier()
        return _finish(ctx, time.perf_counter() - started, write=rank.is_first or not group.active)
    finally:
        group.close()


def open_source(config: RunConfig) -> Any:
    """The folder or dataset named by the config."""
    from .datasets_source import DatasetSpec, open_dataset
    from .sources import FolderSource

    if config.source is SourceKind.folder:
        return FolderSource.open(config.input)
    spec = DatasetSpec(config.input, config.split, config.image_column, config.label_column, config.streaming)
    return open_dataset(spec)


def _prepare(config: RunConfig, progress: ProgressCallback | None, rank: Rank, group: Group) -> Context:
    task = config.task.value
    model_name = config.model or models.DEFAULT_MODELS[task]
    resolved = models.resolve_model(model_name, config.revision)
    model_config = models.read_config(resolved.folder)
    models.check_head(model_config, task, model_name)
    preprocessing = _preprocessing(config, resolved.folder, model_name)
    source = open_source(config)
    from .device import pick_device, pick_dtype

    device = pick_device(config.device, rank.local_rank)
    dtype = pick_dtype(config.dtype.value, device)
    labels = models.label_names(model_config)
    run_info = _describe_run(config, source, resolved, preprocessing, dtype, labels)
    rundir = RunDir(config.out)
    _prepare_rundir(rundir, run_info, config, rank, group)
    ctx = Context(config, source, rundir, run_info, preprocessing, labels, rank, device=device, progress=progress)
    ctx.model = _place_model(models.load_weights(resolved.folder, task, model_name), device, dtype, config.compile)
    from .device import PixelStage

    ctx.pixel_stage = PixelStage(preprocessing.norm, device, dtype)
    return ctx


def _prepare_rundir(rundir: RunDir, run_info: dict, config: RunConfig, rank: Rank, group: Group) -> None:
    """The first process creates (or wipes) OUT; the others join once it has, where a barrier allows."""
    if rank.world_size > 1 and config.overwrite and not group.active:
        raise ConfigError("--overwrite needs one process (or torchrun) to clear OUT before the others start: "
                          "clear OUT first, then launch the processes without --overwrite")
    if rank.is_first:
        rundir.prepare(run_info, config.overwrite, config.resume, rank.owns)
    group.barrier()
    if not rank.is_first:
        rundir.prepare(run_info, False, config.resume, rank.owns)


def _preprocessing(config: RunConfig, folder: Any, model_name: str) -> Preprocessing:
    if config.preprocess is Protocol.paper:
        return paper_preprocessing()
    preprocessing = hf_preprocessing(models.load_processor(folder, model_name))
    if preprocessing.resize_crop.crop_height is None:
        raise ConfigError(f"{model_name}'s preprocessor does no centre crop: classification needs fixed-size inputs")
    return preprocessing


def _place_model(module: Any, device: Any, dtype: Any, compile_model: bool) -> Any:
    import torch

    module = module.to(device=device, dtype=dtype)
    return torch.compile(module) if compile_model else module


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("mv2batch", "torch", "transformers", "pillow", "pyarrow", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _shard_size(config: RunConfig) -> int:
    return config.shard_size or DEFAULT_SHARD_SIZE[config.task.value]


def _n_items(config: RunConfig, source: Any) -> int | None:
    if not hasattr(source, "read"):
        return None  # a stream: unknown until read
    return min(len(source), config.limit) if config.limit else len(source)


def _describe_run(config: RunConfig, source: Any, resolved: Any, preprocessing: Preprocessing,
                  dtype: Any, labels: list[str]) -> dict:
    n_items = _n_items(config, source)
    fields = {
        "task": config.task.value, "input": source.fingerprint(), "n_items": n_items, "limit": config.limit,
        "model": resolved.model_id, "revision": resolved.revision, "preprocessing": preprocessing.describe(),
        "top_k": config.top_k, "dtype": str(dtype).replace("torch.", ""), "shard_size": _shard_size(config),
    }
    plan = ShardPlan(n_items, _shard_size(config)).describe() if n_items is not None else {
        "n_items": None, "shard_size": _shard_size(config), "n_shards": None}
    return {
        "task": config.task.value,
        "fingerprint": fingerprint_of(fields),
        "fingerprint_fields": fields,
        "input": {"kind": config.source.value, "name": config.input, "description": source.description,
                  "split": getattr(source, "split", None), "skipped_files": getattr(source, "skipped_files", 0)},
        "model": {"id": resolved.model_id, "revision": resolved.revision, "origin": resolved.origin,
                  "labels": labels},
        "preprocessing": preprocessing.describe(),
        "options": {"batch_size": config.batch_size, "device": config.device, "dtype": config.dtype.value,
                    "compile": config.compile, "top_k": config.top_k, "max_pixels": config.max_pixels},
        "plan": plan,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parquet_metadata(run_info: dict) -> dict:
    """The run's identity, repeated in every Parquet part's key-value metadata."""
    return {"mv2batch.model": run_info["model"]["id"], "mv2batch.revision": run_info["model"]["revision"],
            "mv2batch.preprocessing": run_info["preprocessing"], "mv2batch.versions": run_info["versions"],
            "mv2batch.task": run_info["task"], "mv2batch.fingerprint": run_info["fingerprint"]}


def _workers(ctx: Context) -> int:
    if ctx.config.workers is not None:
        return ctx.config.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if ctx.device.type == "cpu":
        return max(1, min(4, cores // 2))  # the model needs the cores too
    return max(1, min(8, cores - 1))


# ---- the batch loop ----------------------------------------------------------------------------------------


@dataclass
class ShardState:
    """Counters of one shard while its batches flow."""

    number: int
    remaining_batches: int
    rows: int = 0
    errors: int = 0
    started: float | None = None  # when the shard's first batch arrived
    compute_s: float = 0.0
    wait_s: float = 0.0
    counts: ClassifyCounts = field(default_factory=ClassifyCounts)
    first_id: str | None = None
    last_id: str | None = None


def _run_planned(ctx: Context, done: dict[int, dict]) -> None:
    plan = ShardPlan(ctx.run_info["plan"]["n_items"], ctx.run_info["plan"]["shard_size"])
    todo = [s for s in range(plan.n_shards) if s not in done and ctx.rank.owns(s)]
    ctx.total = sum(len(plan.shard(s)) for s in todo)
    _process_shards(ctx, [(s, plan.shard(s)) for s in todo], ctx.source.read, ctx.source.item_id)


def _run_stream(ctx: Context, done: dict[int, dict]) -> None:
    shard_size = ctx.run_info["plan"]["shard_size"]
    n_shards = 0
    for number, start, records in _stream_chunks(ctx.source.records(), shard_size, ctx.config.limit):
        n_shards = number + 1
        if number in done or not ctx.rank.owns(number):
            continue
        indices = range(start, start + len(records))
        _process_shards(ctx, [(number, indices)], lambda i, rs=records, s=start: rs[i - s], ctx.source.item_id)
    # Only now is the stream's length known; record it so that `mv2batch report` can tell a run is complete.
    if n_shards != ctx.run_info["plan"].get("n_shards"):
        ctx.run_info["plan"].update({"n_shards": n_shards})
        write_json_atomic(ctx.rundir.run_json, ctx.run_info)


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


def _predict(ctx: Context, batches: list[tuple[int, list[int]]], read: Callable, item_id: Callable,
             states: dict[int, ShardState]) -> Iterator[tuple[int, dict[str, list]]]:
    """Run the index batches through one DataLoader and the model; yield each batch's rows with its shard."""
    import torch

    dataset = ImageDataset(read, ctx.preprocessing.resize_crop, ctx.config.max_pixels)
    loader = make_loader(dataset, [b for _, b in batches], _workers(ctx), ctx.device.type == "cuda")
    if ctx.progress:
        ctx.progress(ProgressUpdate(ctx.done, ctx.total, ctx.errors))
    with torch.inference_mode():
        for number, _ in batches:
            state = states[number]
            waited = time.perf_counter()
            batch = next(loader)
            state.started = state.started or waited
            state.wait_s += time.perf_counter() - waited
            yield number, _batch_rows(ctx, state, batch, item_id)
            if ctx.progress:
                ctx.progress(ProgressUpdate(ctx.done, ctx.total, ctx.errors))


def _process_shards(ctx: Context, shards: list[tuple[int, range]], read: Callable, item_id: Callable) -> None:
    """Run the given shards through one DataLoader, committing each shard when its last batch is written."""
    from .writer import BackgroundWriter, prediction_schema

    if not shards:
        return
    batches = [(number, b) for number, indices in shards for b in shard_batches([indices], ctx.config.batch_size)]
    states = {number: ShardState(number, sum(1 for n, _ in batches if n == number)) for number, _ in shards}
    writer = BackgroundWriter(ctx.rundir, prediction_schema("classify", parquet_metadata(ctx.run_info)))
    try:
        for number, columns in _predict(ctx, batches, read, item_id, states):
            writer.write(number, columns)
            state = states[number]
            state.remaining_batches -= 1
            if state.remaining_batches == 0:
                writer.commit(number, _marker(ctx, state))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _retry_errors(ctx: Context, done: dict[int, dict]) -> None:
    """Run the failed rows of committed shards again; rewrite each such shard with the new rows in place."""
    if not hasattr(ctx.source, "read"):
        raise ConfigError("--retry-errors needs a folder or a non-streaming dataset")
    plan = ShardPlan(ctx.run_info["plan"]["n_items"], ctx.run_info["plan"]["shard_size"])
    retry = {n: m for n, m in sorted(done.items()) if m["errors"] and ctx.rank.owns(n)}
    for number, marker in retry.items():
        _retry_shard(ctx, number, marker, plan.shard(number))


def _retry_shard(ctx: Context, number: int, marker: dict, indices: range) -> None:
    import pyarrow.parquet as pq

    from .writer import PartWriter, prediction_schema

    part = ctx.rundir.part_path(number)
    rows = pq.read_table(part).to_pylist()
    failed = [position for position, row in enumerate(rows) if row["status"] == "error"]
    state = ShardState(number, 0)
    batches = [(number, b) for b in shard_batches([[indices[p] for p in failed]], ctx.config.batch_size)]
    ctx.total = (ctx.total or 0) + len(failed)
    new_rows = []
    for _, columns in _predict(ctx, batches, ctx.source.read, ctx.source.item_id, {number: state}):
        new_rows += [dict(zip(columns, values)) for values in zip(*columns.values())]
    for position, row in zip(failed, new_rows):
        rows[position] = row
    writer = PartWriter(ctx.rundir, number, prediction_schema("classify", parquet_metadata(ctx.run_info)))
    writer.write({name: [row[name] for row in rows] for name in rows[0]})
    merged = ClassifyCounts.from_json(marker["metrics"]).merge(state.counts)
    writer.commit()
    updated = {**marker, "errors": sum(row["status"] == "error" for row in rows), "metrics": merged.to_json(),
               "retried": marker.get("retried", 0) + 1}
    write_json_atomic(ctx.rundir.marker_path(number), updated)


def _batch_rows(ctx: Context, state: ShardState, batch: Any, item_id: Callable) -> dict[str, list]:
    """Model outputs for the batch's ok images, and one row per sample, errors included, in order."""
    from .postprocess import softmax_topk

    topk_ids = topk_scores = None
    if batch.pixels is not None:
        computed = time.perf_counter()
        logits = ctx.model(pixel_values=ctx.pixel_stage(batch.pixels)).logits
        ids, scores = softmax_topk(logits, ctx.config.top_k)
        topk_ids, topk_scores = ids.tolist(), scores.tolist()
        state.compute_s += time.perf_counter() - computed
    columns: dict[str, list] = {name: [] for name in (
        "id", "path", "shard", "width", "height", "status", "error", "topk_ids", "topk_labels", "topk_scores",
        "label")}
    ok_row = 0
    for sample in batch.samples:
        row_id = item_id(sample.index)
        state.first_id = state.first_id or row_id
        state.last_id = row_id
        if sample.error is None:
            ids_row, scores_row = topk_ids[ok_row], topk_scores[ok_row]
            ok_row += 1
            if sample.label is not None:
                state.counts.add(sample.label, ids_row)
        else:
            ids_row = scores_row = None
            state.errors += 1
            ctx.errors += 1
        _append_row(columns, row_id, sample, state.number, ids_row, scores_row, ctx.labels)
    state.rows += len(batch.samples)
    ctx.done += len(batch.samples)
    return columns


def _append_row(columns: dict, row_id: str, sample: Any, shard: int, ids: list | None, scores: list | None,
                labels: list[str]) -> None:
    values = {
        "id": row_id, "path": sample.path, "shard": shard, "width": sample.width, "height": sample.height,
        "status": "ok" if sample.error is None else "error", "error": sample.error,
        "topk_ids": ids, "topk_scores": scores,
        "topk_labels": [labels[i] if i < len(labels) else str(i) for i in ids] if ids is not None else None,
        "label": sample.label,
    }
    for name, value in values.items():
        columns[name].append(value)


def _marker(ctx: Context, state: ShardState) -> dict:
    return {
        "shard": state.number, "fingerprint": ctx.run_info["fingerprint"], "part": ctx.rundir.part_path(
            state.number).name, "rows": state.rows, "errors": state.errors, "first_id": state.first_id,
        "last_id": state.last_id, "metrics": state.counts.to_json(), "rank": ctx.rank.rank,
        "timings": {"seconds": time.perf_counter() - state.started, "compute_s": state.compute_s,
                    "wait_input_s": state.wait_s},
    }


def _finish(ctx: Context, elapsed: float, write: bool) -> Report:
    """Merge every marker; write the report once every shard of the plan is done (by one process)."""
    markers = ctx.rundir.committed(ctx.run_info["fingerprint"])
    report = build_report(ctx.rundir, ctx.run_info, markers, ctx.labels)
    report.ran_now = ctx.done
    report.elapsed_s = elapsed
    if report.complete and write:
        write_report(report, ctx.rundir)
    return report
