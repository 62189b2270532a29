"""`mv2batch filter` over a generated finished run of N small files: a folder and WebDataset tars, files per second
and peak memory.

    python benchmarks/bench_filter.py [-n 100000] [--file-bytes 2048] [--threads 4] [--big-rows 1000000] [--keep DIR]

One child process writes the inputs (N files of --file-bytes random bytes in 100 sub-folders; the same bytes as
tars of 10,000 samples, each a jpg, a cls and a json member) and a finished classify run over each (run.json
through RunDir.prepare, parts of 10,000 rows through writer.BackgroundWriter, as a run writes them: id, path,
status, sha256, top-k; one error row in 1,000), plus OUT/report/duplicates.parquet (one item in 10 a duplicate of
the item before it) for --unique; and a run of --big-rows rows over the same files, read over and over (each row
its own id), filtered to about 0.5 %: memory against a run's rows. Each filter then runs in a child of its own
(filter_run, the CLI's code path), so that each peak RSS (getrusage maxrss) is that filter's alone. Printed per
case: rows, kept, seconds, rows and kept files (tars: samples) per second, files written, peak RSS; the plain
copy line is shutil.copyfile of the same kept files, one thread, no fsync: the floor of a copy on this disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_ROWS = 10_000
FOLDERS = 100
WHERE = "topk_scores[1] >= 0.87"  # the best of 5 uniform scores: about half the rows (1 - 0.87**5)
CASES = {  # name: (run, filter options)
    "folder, --where": ("folder", {"where": WHERE}),
    "folder, --where --unique": ("folder", {"where": WHERE, "unique": True}),
    "folder, all ok rows": ("folder", {}),
    "folder, --link hard": ("folder", {"where": WHERE, "link": "hard"}),
    "tars, --where": ("tars", {"where": WHERE}),
    "tars, all ok rows": ("tars", {}),
    "folder, big run, few kept": ("big", {"where": "topk_scores[1] >= 0.999"}),  # about 0.5 % of the rows
}


def item_name(i: int) -> str:
    return f"d{i % FOLDERS:03d}/img{i:07d}.jpg"


def write_inputs(root: Path, n: int, size: int) -> None:
    """The folder of n files and the tars of the same bytes."""
    import io
    import tarfile

    rng = np.random.default_rng(0)
    photos, shards = root / "photos", root / "shards"
    shards.mkdir(parents=True)
    for folder in range(FOLDERS):
        (photos / f"d{folder:03d}").mkdir(parents=True)
    for start in range(0, n, SHARD_ROWS):
        with tarfile.open(shards / f"data-{start // SHARD_ROWS:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + SHARD_ROWS)):
                data = rng.bytes(size)
                (photos / item_name(i)).write_bytes(data)
                for ext, member in (("jpg", data), ("cls", str(i % 10).encode()), ("json", b'{"i": %d}' % i)):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size, info.mtime = len(member), 1_700_000_000
                    tar.addfile(info, io.BytesIO(member))


def write_run(out: Path, n: int, input_info: dict, ids, paths) -> None:
    """A finished classify run of n rows (ids(i), paths(i)), and its duplicates.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mv2batch.out.rundir import RunDir, fingerprint_of
    from mv2batch.out.writer import BackgroundWriter, prediction_schema

    fields = {"task": "classify", "input": f"bench-{input_info['kind']}-{n}"}
    fingerprint = fingerprint_of(fields)
    n_shards = -(-n // SHARD_ROWS)
    rundir = RunDir(out)
    rundir.prepare({"task": "classify", "fingerprint": fingerprint, "fingerprint_fields": fields,
                    "plan": {"n_items": n, "shard_size": SHARD_ROWS, "n_shards": n_shards}, "input": input_info,
                    "model": {"id": "bench", "labels": []}}, False, False)
    task_fields = [pa.field("topk_ids", pa.list_(pa.int32())), pa.field("topk_labels", pa.list_(pa.string())),
                   pa.field("topk_scores", pa.list_(pa.float32())), pa.field("label", pa.int32())]
    schema = prediction_schema(task_fields, {"mv2batch.fingerprint": fingerprint})
    writer = BackgroundWriter(rundir, schema)
    rng = np.random.default_rng(1)
    for shard in range(n_shards):
        items = list(range(shard * SHARD_ROWS, min(n, (shard + 1) * SHARD_ROWS)))
        error = [i % 1000 == 7 for i in items]
        top = rng.integers(0, 10, (len(items), 5)).tolist()
        columns = {"id": [ids(i) for i in items], "path": [paths(i) for i in items], "shard": [shard] * len(items),
                   "width": [64] * len(items), "height": [64] * len(items),
                   "status": ["error" if e else "ok" for e in error],
                   "error": ["DecodeError: bad" if e else None for e in error],
                   "sha256": [None if e else f"{i:064x}" for i, e in zip(items, error)],
                   "topk_ids": top, "topk_labels": [[f"class {c}" for c in row] for row in top],
                   "topk_scores": np.sort(rng.random((len(items), 5), dtype=np.float32), axis=1)[:, ::-1].tolist(),
                   "label": [i % 10 for i in items]}
        writer.write(shard, columns)
        writer.commit(shard, {"shard": shard, "fingerprint": fingerprint, "rows": len(items), "errors": sum(error)})
    writer.close()
    members = [i for i in range(1, n) if i % 10 == 0]
    table = pa.table({"id": [ids(i) for i in members + [i - 1 for i in members]],
                      "path": [paths(i) for i in members + [i - 1 for i in members]],
                      "group": list(range(len(members))) * 2,
                      "duplicate_of": [ids(i - 1) for i in members] + [None] * len(members),
                      "similarity": [1.0] * len(members) + [None] * len(members)})
    table = table.replace_schema_metadata({"mv2batch.shards": json.dumps(list(range(n_shards)))})
    (out / "report").mkdir(exist_ok=True)
    pq.write_table(table, out / "report" / "duplicates.parquet")


def write_all(root: Path, n: int, size: int, big_rows: int) -> None:
    write_inputs(root, n, size)
    photos, shards = root / "photos", root / "shards"
    folder = {"kind": "folder", "name": str(photos), "description": "bench folder"}
    write_run(root / "run-folder", n, folder, item_name, lambda i: str(photos / item_name(i)))
    if big_rows:  # rows of their own (ids), read from the n files over and over: memory against rows, not files
        write_run(root / "run-big", big_rows, folder, item_name, lambda i: str(photos / item_name(i % n)))
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    write_run(root / "run-tars", n, {"kind": "webdataset", "name": str(shards), "description": "bench tars",
                                     "shards": tars},
              lambda i: f"data-{i // SHARD_ROWS:05d}/s{i:07d}", lambda i: f"{tars[i // SHARD_ROWS]}#s{i:07d}.jpg")


def run_filter(root: Path, case: str, threads: int) -> dict:
    from mv2batch.filter.pipeline import filter_run

    run, options = CASES[case]
    dest = root / "dest" / case.replace(" ", "_").replace(",", "").replace("-", "")
    result = filter_run(root / f"run-{run}", dest, threads=threads, **options)
    return {"rows": result.rows, "kept": result.kept, "seconds": result.seconds, "files": result.files_written,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def plain_copy(root: Path) -> dict:
    """The kept files of the first case copied by shutil.copyfile, one thread, no fsync: this disk's floor."""
    import pyarrow.parquet as pq

    kept = pq.read_table(root / "dest" / "folder_where" / "_mv2batch" / "predictions.parquet", columns=["id"])
    target = root / "plain"
    started = time.perf_counter()
    for item in kept.column("id").to_pylist():
        final = target / item
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "photos" / item, final)
    return {"rows": kept.num_rows, "kept": kept.num_rows, "seconds": time.perf_counter() - started,
            "files": kept.num_rows, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def in_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--file-bytes", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="rows of the big run over the same files "
                        "(0: none)")
    parser.add_argument("--keep", type=Path, help="write the inputs and runs here (else a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "write":
        started = time.perf_counter()
        write_all(args.root, args.n, args.file_bytes, args.big_rows)
        return print(json.dumps({"seconds": time.perf_counter() - started}))
    if args.child == "plain":
        return print(json.dumps(plain_copy(args.root)))
    if args.child:
        return print(json.dumps(run_filter(args.root, args.child, args.threads)))
    with tempfile.TemporaryDirectory(dir=args.keep) as temporary:
        root = Path(temporary)
        written = in_child("--child", "write", "--root", str(root), "-n", str(args.n),
                           "--file-bytes", str(args.file_bytes), "--big-rows", str(args.big_rows))
        print(f"inputs and runs of {args.n:,} files of {args.file_bytes} bytes (and a run of {args.big_rows:,} rows "
              f"over them) written in {written['seconds']:.1f} s; {args.threads} threads; {os.cpu_count()} cores")
        print(f"{'case':<28} {'rows':>9} {'kept':>8} {'seconds':>8} {'rows/s':>9} {'kept/s':>8} {'files':>7} "
              f"{'peak RSS':>9}")
        for case in [*(c for c in CASES if args.big_rows or CASES[c][0] != "big"), "plain copy (1 thread)"]:
            child = ["--child", "plain"] if case.startswith("plain") else ["--child", case]
            got = in_child(*child, "--root", str(root), "--threads", str(args.threads))
            rows, kept = got["rows"] / got["seconds"], got["kept"] / got["seconds"]
            print(f"{case:<28} {got['rows']:>9,} {got['kept']:>8,} {got['seconds']:>8.1f} {rows:>9,.0f} {kept:>8,.0f} "
                  f"{got['files']:>7,} {got['peak_rss'] / 1e6:>7.0f}MB", flush=True)


if __name__ == "__main__":
    main()
