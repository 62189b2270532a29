"""`mv2batch dedup OUT`: near-duplicate groups among a finished run's embeddings, and byte-identical files.

A run's committed parts are read column by column, part by part, into one preallocated float32 matrix (an
fp16 run converted a block at a time), after saying how much memory that takes and refusing when it cannot
fit. vector_search finds every item's neighbours at cosine >= threshold; those pairs, and items with the same
sha256 (similarity 1.0, with or without embeddings: error rows included), are joined into groups.
OUT/report/duplicates.parquet has one row per item of a group of 2 or more: `id`, `path` (where the item was
read: a file, an object URL, a tar member or a table row, as the run's rows say), `group` (numbered in input
order of the groups' first items), `duplicate_of` (the group's representative: its first item in input order;
null on the representative itself) and `similarity` (cosine to the representative: 1.0 for identical bytes;
null on the representative, and where one of the two has no embedding and their bytes differ).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from mv2batch.dedup import vector_search
from mv2batch.errors import ConfigError, Mv2batchError, OutputError

if TYPE_CHECKING:
    import pyarrow as pa

    from mv2batch.out.rundir import RunDir

# Not calibrated (no trained model here; random weights give no invariance to crops or re-encoding): a
# conservative start, high enough that unrelated images should not pass it. The printed distribution of
# nearest-neighbour similarities is what a user picks a threshold from.
DEFAULT_THRESHOLD = 0.95
DEFAULT_K = 10
HISTOGRAM_EDGES = np.linspace(-1.0, 1.0, 41)  # 0.05 wide: fine enough near 1, where thresholds lie
READ_BATCH_ROWS = 8192
ROW_OVERHEAD = 256  # bytes per row for ids, paths and sha256 kept as Arrow strings (64 hex, id, path, offsets)
COLUMNS = ["id", "path", "status", "sha256", "embedding"]


@dataclass
class RunVectors:
    """A run's items in input order (shard, then row), and the matrix of those with an embedding."""

    ids: pa.Array  # of strings, every row
    paths: pa.Array  # of strings, every row: what a user deletes or keeps
    sha256: pa.Array  # of strings, every row (null where unreadable)
    rows: np.ndarray  # int64: matrix row -> item number
    matrix: np.ndarray  # float32 (len(rows), D), L2-normalised here
    stored_type: str  # "float32" or "float16", as the parts hold it
    shards: int


@dataclass
class DedupResult:
    table: pa.Table  # duplicates.parquet
    threshold: float
    k: int
    method: str
    n_items: int
    n_embedded: int
    n_groups: int
    largest: int
    in_groups: int
    byte_identical: int  # items whose sha256 another item shares
    histogram: np.ndarray  # counts of each embedded item's nearest-neighbour similarity over HISTOGRAM_EDGES
    shards: int
    shards_total: int | None
    seconds: float
    timings: dict  # seconds by step: read, search, groups (grouping and writing)
    where: str  # duplicates.parquet's location


def available_memory() -> int | None:
    """Bytes this process could still take: psutil if present, else /proc/meminfo's MemAvailable; None if
    neither says (the check is then skipped)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_needed(n_rows: int, n_embedded: int, d: int, k: int = DEFAULT_K) -> int:
    """Bytes dedup holds at its peak: the matrix, the ids and hashes, the pairs kept (up to 2k per item while
    searching, 20 bytes each) and the search's own (vector_search.search_memory)."""
    matrix = n_embedded * d * 4
    return matrix + n_rows * ROW_OVERHEAD + n_embedded * 2 * k * 20 + vector_search.search_memory(n_embedded, d)


def memory_message(n_embedded: int, d: int, needed: int, available: int | None) -> str:
    """The one line said before reading: what N x D takes, and against what."""
    have = f" ({_gb(available)} available)" if available is not None else ""
    return (f"reading {n_embedded:,} embeddings x {d} floats: {_gb(n_embedded * d * 4)} as float32, about "
            f"{_gb(needed)} in memory with the search{have}")


def _gb(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f} GB"
    return f"{count / 1e6:.0f} MB" if count >= 1e6 else f"{count / 1e3:.0f} kB"


def _part_shapes(rundir: RunDir, shards: list[int]) -> tuple[int, int, str]:
    """(rows, D, stored type) from the parts' footers alone. Every row gets a matrix row: error rows are few,
    and np.empty's pages that are never written are never taken."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, sizes, types = 0, set(), set()
    for shard in shards:
        with rundir.files.open_read(rundir.part_path(shard)) as handle:
            part = pq.ParquetFile(handle)
            schema, count = part.schema_arrow, part.metadata.num_rows
        column = schema.field("embedding") if "embedding" in schema.names else None
        if column is None or not pa.types.is_fixed_size_list(column.type):
            raise OutputError(f"{rundir.root} has no embeddings (part {shard}): run `mv2batch embed ...` or "
                              "`mv2batch classify ... --embeddings` first, then dedup that OUT")
        rows += count
        sizes.add(column.type.list_size)
        types.add({"float": "float32", "halffloat": "float16"}.get(str(column.type.value_type),
                                                                  str(column.type.value_type)))
    if len(sizes) != 1:
        raise OutputError(f"{rundir.root}'s parts disagree on the embedding size ({sorted(sizes)})")
    return rows, sizes.pop(), "/".join(sorted(types))


def read_vectors(rundir: RunDir, shards: list[int], memory_available: int | None, k: int,
                 say: Callable[[str], None] | None = None) -> RunVectors:
    """The parts' ids, hashes and embeddings, streamed into one matrix; refused in one line when it cannot
    fit (memory_available: bytes; None skips the check)."""
    rows, d, stored = _part_shapes(rundir, shards)
    embedded = rows  # at most: error rows are skipped while reading
    needed = memory_needed(rows, embedded, d, k)
    if say is not None:
        say(memory_message(embedded, d, needed, memory_available))
    if memory_available is not None and needed > memory_available:
        raise Mv2batchError(f"dedup needs about {_gb(needed)} for {embedded:,} embeddings x {d} but "
                            f"{_gb(memory_available)} is available: run it on a machine with more memory")
    matrix = np.empty((embedded, d), np.float32)
    ids, paths, hashes, positions = [], [], [], []
    filled = item = 0
    for shard in shards:
        for batch in _batches(rundir, shard):
            ids.append(batch.column("id"))
            paths.append(batch.column("path"))
            hashes.append(batch.column("sha256"))
            block, where = _embedded_block(batch, d)
            matrix[filled:filled + len(block)] = block  # fp16 becomes float32 here, one block at a time
            positions.append(where + item)
            filled, item = filled + len(block), item + batch.num_rows
    matrix = matrix[:filled]
    vector_search.normalize_rows(matrix)
    rows_with_vectors = np.concatenate(positions or [np.zeros(0, np.int64)])
    return RunVectors(_joined(ids), _joined(paths), _joined(hashes), rows_with_vectors, matrix, stored, len(shards))


def _batches(rundir: RunDir, shard: int) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    with rundir.files.open_read(rundir.part_path(shard)) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=READ_BATCH_ROWS, columns=COLUMNS)


def _embedded_block(batch: pa.RecordBatch, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a batch that carry an embedding (status ok, not null) as (m, d), and their positions."""
    import pyarrow.compute as pc

    column = batch.column("embedding")
    usable = pc.fill_null(pc.and_(pc.equal(batch.column("status"), "ok"), pc.is_valid(column)), False)
    kept = column.filter(usable)
    values = kept.flatten().to_numpy(zero_copy_only=False).reshape(len(kept), d)
    return values, np.flatnonzero(usable.to_numpy(zero_copy_only=False)).astype(np.int64)


def _joined(chunks: list[pa.Array]) -> pa.Array:
    import pyarrow as pa

    return pa.chunked_array(chunks, type=pa.string()).combine_chunks() if chunks else pa.array([], pa.string())


def same_bytes_pairs(sha256: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of items with the same sha256 (each to the next with the same hash: enough to join them)."""
    import pyarrow.compute as pc

    codes = pc.fill_null(sha256.dictionary_encode().indices, -1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    linked = np.flatnonzero((ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0))
    return order[linked].astype(np.int64), order[linked + 1].astype(np.int64)


def duplicates_table(vectors: RunVectors, labels: np.ndarray) -> pa.Table:
    """duplicates.parquet's rows (see the module's docstring) for every item of a group of 2 or more."""
    import pyarrow as pa

    members = np.flatnonzero(np.bincount(labels, minlength=len(labels))[labels] >= 2)
    representatives = labels[members]
    group = np.searchsorted(np.unique(representatives), representatives)
    is_representative = members == representatives
    similarity = _similarity_to(vectors, members, representatives)
    return pa.table({
        "id": vectors.ids.take(pa.array(members)),
        "path": vectors.paths.take(pa.array(members)),
        "group": pa.array(group, pa.int32()),
        "duplicate_of": vectors.ids.take(pa.array(representatives, mask=is_representative)),
        "similarity": pa.array(similarity, pa.float32(), mask=~np.isfinite(similarity) | is_representative),
    })


def _similarity_to(vectors: RunVectors, items: np.ndarray, representatives: np.ndarray) -> np.ndarray:
    """Cosine of each item to its representative: 1.0 for the same bytes, nan where one has no embedding."""
    import pyarrow.compute as pc

    matrix_row = np.full(len(vectors.ids), -1, np.int64)
    matrix_row[vectors.rows] = np.arange(len(vectors.rows))
    found = np.full(len(items), np.nan, np.float32)
    mine, theirs = matrix_row[items], matrix_row[representatives]
    both = np.flatnonzero((mine >= 0) & (theirs >= 0))
    for start in range(0, len(both), READ_BATCH_ROWS):  # gathered a block at a time: bounded memory
        chosen = both[start:start + READ_BATCH_ROWS]
        pairs = vectors.matrix[mine[chosen]] * vectors.matrix[theirs[chosen]]
        found[chosen] = np.minimum(pairs.sum(axis=1), 1.0)
    hashes = vectors.sha256
    same = pc.fill_null(pc.equal(hashes.take(items), hashes.take(representatives)), False)
    found[same.to_numpy(zero_copy_only=False)] = 1.0
    return found


def find_duplicates(out: Path | str, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K,
                    storage_options: dict | None = None, memory_available: int | None = None,
                    say: Callable[[str], None] | None = None, exact: bool | None = None) -> DedupResult:
    """Group a finished run's near-duplicates and byte-identical items; write OUT/report/duplicates.parquet.

    memory_available: bytes (None: available_memory(), and no check where that cannot tell). exact: None chooses
    the search by size (vector_search.uses_exact). say: gets the memory line before reading (the CLI's echo).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mv2batch.out.rundir import open_run
    from mv2batch.report.tables import refresh_html
    from mv2batch.storage import join

    started = time.perf_counter()
    if not -1.0 <= threshold <= 1.0 or k < 1:
        raise ConfigError(f"dedup needs a threshold in [-1, 1] and k >= 1 (got {threshold}, {k})")
    rundir, run_info = open_run(out, storage_options)
    shards = sorted(rundir.committed(run_info["fingerprint"]))
    if not shards:
        raise OutputError(f"{out} has no finished shards yet: run (or resume) it, then dedup")
    available = available_memory() if memory_available is None else memory_available
    vectors = read_vectors(rundir, shards, available, k, say)
    read_at = time.perf_counter()
    found = vector_search.find_neighbours(vectors.matrix, threshold, k, exact=exact)
    searched_at = time.perf_counter()
    same_first, same_second = same_bytes_pairs(vectors.sha256)
    labels = vector_search.connected_groups(
        len(vectors.ids), np.concatenate([vectors.rows[found.first], same_first]),
        np.concatenate([vectors.rows[found.second], same_second]))
    table = duplicates_table(vectors, labels)
    # What was read: the page notes it when the run has more shards since.
    table = table.replace_schema_metadata({"mv2batch.shards": json.dumps(shards),
                                           "mv2batch.threshold": json.dumps(threshold)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    rundir.write_report_file("duplicates.parquet", sink.getvalue().to_pybytes())
    sizes = np.bincount(labels, minlength=len(labels))
    sizes = sizes[sizes >= 2]
    nearest = found.nearest[np.isfinite(found.nearest)]
    result = DedupResult(
        table=table, threshold=threshold, k=k, method=found.method, n_items=len(vectors.ids),
        n_embedded=len(vectors.rows), n_groups=len(sizes), largest=int(sizes.max(initial=0)),
        in_groups=table.num_rows, byte_identical=len(np.unique(np.concatenate([same_first, same_second]))),
        histogram=np.histogram(np.clip(nearest, -1.0, 1.0), HISTOGRAM_EDGES)[0], shards=len(shards),
        shards_total=run_info.get("plan", {}).get("n_shards"), seconds=time.perf_counter() - started,
        timings={"read": read_at - started, "search": searched_at - read_at,
                 "groups": time.perf_counter() - searched_at}, where=str(join(rundir.report, "duplicates.parquet")))
    del vectors, found  # the matrix goes before the page reads the run's rows
    refresh_html(rundir, run_info)  # index.html gains the groups' thumbnails (a failure there is a warning)
    result.timings["page"] = time.perf_counter() - started - result.seconds
    result.seconds += result.timings["page"]
    return result


def format_summary(result: DedupResult) -> list[str]:
    """The lines the CLI prints: what was read, the groups, and the similarity distribution as text bars."""
    incomplete = (f" (run incomplete: {result.shards} of {result.shards_total} shards)"
                  if result.shards_total and result.shards < result.shards_total else "")
    lines = [f"dedup: {result.n_items:,} items, {result.n_embedded:,} with embeddings{incomplete}; "
             f"{result.method} search, k {result.k}, threshold {result.threshold:g}, {result.seconds:.1f} s "
             f"(reading {result.timings['read']:.1f} s, search {result.timings['search']:.1f} s)",
             f"groups: {result.n_groups:,} ({result.in_groups:,} items, largest {result.largest}"
             f"; {result.byte_identical:,} byte-identical) -> {result.where}"]
    if result.histogram.sum():
        lines.append("nearest-neighbour cosine similarity of each item (pick --threshold from it):")
        top = result.histogram.max()
        for low, high, count in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], result.histogram):
            if count:
                bar = "#" * max(1, round(30 * count / top))
                lines.append(f"  [{low:+.2f}, {high:+.2f}{']' if high == 1.0 else ')'} {count:>10,}  {bar}")
    return lines
