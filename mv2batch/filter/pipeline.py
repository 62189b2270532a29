"""`mv2batch filter OUT -o DEST`: a finished run's parts judged one at a time (the predicate and --unique in
DuckDB), each shard's kept items written by its input's layout in a thread pool, in a bounded window of shards;
a shard's marker once all its items are in place; the kept rows' predictions and filter.json last.

Everything is checked before anything is written: the run finished, the predicate (one line naming the columns
there are), dedup's output for --unique, --link, and DEST (empty, or this same filter's unfinished output).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import numpy as np

from mv2batch import storage
from mv2batch.errors import ConfigError, OutputError
from mv2batch.filter.destination import PREDICTIONS, Destination, FileWriter, written_whole
from mv2batch.filter.finished_run import FinishedRun, duplicates_of, open_finished
from mv2batch.filter.folders import LINKS, FolderLayout, folder_root
from mv2batch.filter.predicate import DUPLICATE, ERROR, WHERE, Judge, compile_predicate
from mv2batch.filter.tables import TableLayout
from mv2batch.filter.tars import TarLayout
from mv2batch.filter.work import FilterProgress, Layout, Outcome, ShardWork, Tally

if TYPE_CHECKING:
    import pyarrow as pa

UNAVAILABLE = "unavailable"  # kept by the predicate, but its item could not be read from the input now
REASONS = (ERROR, WHERE, DUPLICATE, UNAVAILABLE)
HELD_BYTES = 256 << 20  # kept rows of the shards in flight held at most (their predictions wait to be written)


@dataclass
class FilterParts:
    """The steps a test may replace: how each file is written under DEST."""

    write_file: FileWriter = written_whole


@dataclass
class FilterResult:
    out: str
    dest: str
    layout: str
    rows: int
    kept: int
    dropped: dict[str, int]
    files_written: int
    items_present: int  # kept items found in place from an earlier attempt
    seconds: float
    unavailable_examples: dict[str, str] = field(default_factory=dict)


def filter_run(out: Path | str, dest: Path | str, where: str | None = None, unique: bool = False,
               link: str = "copy", overwrite: bool = False, storage_options: dict | None = None,
               threads: int | None = None, progress: Callable[[FilterProgress], None] | None = None,
               parts: FilterParts | None = None) -> FilterResult:
    """Write OUT's kept items to DEST in the input's own format, with their predictions; see the module."""
    started = time.perf_counter()
    if link not in LINKS:
        raise ConfigError(f"--link must be one of {', '.join(LINKS)} (got {link!r})")
    run = open_finished(out, storage_options)
    duplicates = duplicates_of(run) if unique else None
    predicate = compile_predicate(where, run.schema)
    destination = Destination(dest, storage_options)
    layout = open_layout(run, destination, (parts or FilterParts()).write_file, link, storage_options)
    dedup = None if duplicates is None else {"threshold": duplicates.threshold, "shards": duplicates.shards}
    identity = {"out": run.out, "fingerprint": run.info["fingerprint"], "where": predicate.describe(),
                "unique": unique, "link": link, "dedup": dedup}
    destination.prepare(identity, overwrite, [("the run's OUT", run.rundir.root), *layout.locations()])
    tally = Tally(sum(run.rows), progress)
    try:
        with Judge(predicate, None if duplicates is None else duplicates.ids) as judge:
            counts, outcome = _write_shards(run, judge, layout, destination, tally, threads,
                                            (parts or FilterParts()).write_file)
    finally:
        destination.release()
    tally.end()
    kept = sum(run.rows) - sum(counts.values())
    result = FilterResult(run.out, str(destination.root), layout.name, sum(run.rows), kept,
                          {reason: counts.get(reason, 0) for reason in REASONS}, outcome.files, outcome.present,
                          time.perf_counter() - started, outcome.unavailable)
    destination.write_json(destination.state, {"identity": identity, "complete": True, "task": run.info["task"],
                                               "input": run.info["input"].get("description"), "layout": layout.name,
                                               "rows": result.rows, "kept": kept, "dropped": result.dropped})
    return result


def open_layout(run: FinishedRun, destination: Destination, write_file: FileWriter, link: str,
                options: dict | None) -> Layout:
    """The input's layout, from run.json: tars (the run names its tars), a table (it names a split), a folder."""
    given = run.info.get("input")
    if not isinstance(given, dict):
        raise OutputError(f"{run.out}'s run.json does not say what its input was: filter cannot find its items")
    if link != "copy" and (given.get("shards") or given.get("split")):
        raise ConfigError(f"--link {link} applies to folder inputs (tars and tables are rewritten): use --link copy")
    if given.get("shards"):
        return TarLayout(list(given["shards"]), destination, write_file, options)
    if given.get("split"):
        return TableLayout(given, run.info.get("fingerprint_fields", {}), len(run.shards), destination, write_file,
                           options)
    shard = next(shard for shard, rows in zip(run.shards, run.rows) if rows)
    first = run.kept_rows(shard, np.zeros(1, np.int64)).select(["id", "path"]).to_pylist()[0]
    layout = FolderLayout(folder_root(first), destination, write_file, link, options)
    layout.check_link()
    return layout


@dataclass
class _InFlight:
    work: ShardWork
    futures: list[Future]
    marker: dict | None  # an earlier attempt's: nothing to write
    nbytes: int


def _write_shards(run: FinishedRun, judge: Judge, layout: Layout, destination: Destination, tally: Tally,
                  threads: int | None, write_file: FileWriter) -> tuple[Counter, Outcome]:
    """Judge each part, hand its kept rows to the layout, finish shards in order; the drop counts and what the
    writing did."""
    counts, total = Counter(), Outcome()
    finished = destination.finished_shards()
    window: deque[_InFlight] = deque()
    threads = threads or _default_threads(run, destination)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="mv2batch-filter")
    final = storage.join(destination.meta, PREDICTIONS)
    try:
        with write_file(destination, final) as handle, _PredictionsWriter(handle, run.schema) as predictions:
            first_row = 0
            for shard, n_rows in zip(run.shards, run.rows):
                work, dropped = _judged(run, judge, shard, first_row)
                counts.update(dropped)
                tally.add(judged=n_rows, kept=work.kept.num_rows)
                window.append(_start(work, layout, pool, finished.get(shard), tally))
                first_row += n_rows
                while window and (_done(window[0]) or _full(window, threads)):
                    _add(total, _finish(window.popleft(), destination, predictions, counts))
            while window:
                _add(total, _finish(window.popleft(), destination, predictions, counts))
    except BaseException:
        for flight in window:
            for future in flight.futures:
                future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
    return counts, total


def _full(window: deque[_InFlight], threads: int) -> bool:
    """Enough shards in flight to keep every thread busy (a tar is one task), or their kept rows past HELD_BYTES:
    the oldest is waited for before the next part is read."""
    return len(window) > threads or len(window) > 1 and sum(flight.nbytes for flight in window) > HELD_BYTES


def _add(total: Outcome, outcome: Outcome, examples: int = 5) -> None:
    """outcome's counts into total; a few of its unavailable items, as examples for the summary."""
    total.items, total.present, total.files = (total.items + outcome.items, total.present + outcome.present,
                                               total.files + outcome.files)
    for item, why in list(outcome.unavailable.items())[: max(0, examples - len(total.unavailable))]:
        total.unavailable[item] = why


def _judged(run: FinishedRun, judge: Judge, shard: int, first_row: int) -> tuple[ShardWork, Counter]:
    import pyarrow.compute as pc

    reasons = judge.reasons(run.judged_columns(shard, judge.columns))
    positions = np.flatnonzero(pc.is_null(reasons).to_numpy(zero_copy_only=False))
    dropped = Counter({item["values"]: item["counts"] for item in pc.value_counts(reasons.drop_null()).to_pylist()})
    return ShardWork(shard, run.kept_rows(shard, positions), positions, first_row), dropped


def _start(work: ShardWork, layout: Layout, pool: ThreadPoolExecutor, marker: dict | None, tally: Tally) -> _InFlight:
    futures: list[Future] = []
    if marker is not None and marker.get("kept") != work.kept.num_rows:
        marker = None  # the run's rows changed since (a shard retried): its items are written again where missing
    if marker is None:
        for task in layout.tasks(work):
            future = pool.submit(task) if layout.parallel else _ran(task)
            future.add_done_callback(lambda done: tally.add(placed=_placed(done)))
            futures.append(future)
    else:
        tally.add(placed=work.kept.num_rows - len(marker.get("unavailable", {})))
    return _InFlight(work, futures, marker, work.kept.nbytes)


def _ran(task: Callable[[], Outcome]) -> Future:
    """A task run here and now, as a finished future (its failure raised when its result is asked for)."""
    future: Future = Future()
    try:
        future.set_result(task())
    except Exception as exc:
        future.set_exception(exc)
    return future


def _placed(future: Future) -> int:
    if future.cancelled() or future.exception() is not None:
        return 0
    return future.result().items + future.result().present


def _done(flight: _InFlight) -> bool:
    return all(future.done() for future in flight.futures)


def _finish(flight: _InFlight, destination: Destination, predictions: "_PredictionsWriter", counts: Counter) -> Outcome:
    """A shard whose items are all written: its marker (unless an earlier attempt's), its kept rows' predictions."""
    import pyarrow as pa
    import pyarrow.compute as pc

    outcome = Outcome()
    for future in flight.futures:
        outcome = outcome.merged(future.result())  # a failure to write DEST is raised here
    if flight.marker is not None:
        outcome.unavailable = dict(flight.marker.get("unavailable", {}))
        outcome.present = flight.work.kept.num_rows - len(outcome.unavailable)
    else:
        destination.mark(flight.work.shard, {"shard": flight.work.shard, "kept": flight.work.kept.num_rows,
                                             "unavailable": outcome.unavailable})
    kept = flight.work.kept
    if outcome.unavailable:
        counts[UNAVAILABLE] += len(outcome.unavailable)
        kept = kept.filter(pc.invert(pc.is_in(kept.column("id"), value_set=pa.array(list(outcome.unavailable)))))
    predictions.write(kept)
    return outcome


def _default_threads(run: FinishedRun, destination: Destination) -> int:
    """Many for an object store on either side (each file a round trip), a few for local disks."""
    remote = destination.files.on_object_store or run.rundir.files.on_object_store
    return 16 if remote else 4


class _PredictionsWriter:
    """The kept rows' predictions streamed into one Parquet file, in the run's order."""

    def __init__(self, handle: BinaryIO, schema: pa.Schema):
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(handle, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def __enter__(self) -> "_PredictionsWriter":
        return self

    def __exit__(self, *failure: Any) -> None:
        self.writer.close()


REASON_WORDS = {ERROR: ("error row", "error rows"), WHERE: ("by --where", "by --where"),
                DUPLICATE: ("duplicate", "duplicates"), UNAVAILABLE: ("unreadable now", "unreadable now")}


def format_summary(result: FilterResult) -> list[str]:
    """The lines the CLI prints: kept and dropped by reason, where they went, and a few unreadable items."""
    dropped = ", ".join(f"{count:,} {REASON_WORDS[reason][count != 1]}" for reason, count in result.dropped.items()
                        if count)
    already = f", {result.items_present:,} kept items already there" if result.items_present else ""
    lines = [f"filter: kept {result.kept:,} of {result.rows:,} ({'dropped: ' + dropped if dropped else 'none dropped'})"
             f" -> {result.dest} ({result.layout}): {result.files_written:,} files written{already}, "
             f"{result.seconds:.1f} s"]
    lines += [f"  unreadable: {item}: {why}" for item, why in result.unavailable_examples.items()]
    return lines
