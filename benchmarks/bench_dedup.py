"""`mv2batch dedup OUT` over N random 512-d embeddings with planted near-duplicates, side by side per size.

    python benchmarks/bench_dedup.py [--sizes 100000 1000000] [-d 512] [--keep DIR]

For each size, one child process writes a finished fake embed run (run.json through RunDir.prepare, parts of
10,000 rows through writer.BackgroundWriter, as a run writes them: id, path, status, sha256, fp32 embedding;
a few error rows), then another child runs dedup.find_duplicates on it (the CLI's code path), so that each
peak RSS (getrusage maxrss) is the dedup's own. Planted: pairs and triples at cosine 0.97 to their first
member, among unrelated random unit vectors; recall = planted (first, member) pairs whose two items share a
group in duplicates.parquet. Printed per size: reading, search, page (index.html rebuilt with the groups; the
fake photos cannot be read: captions only) and total seconds, peak RSS, N x D x 4.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD_ROWS = 10_000
PLANTED_PAIRS, PLANTED_TRIPLES, COSINE = 1_000, 300, 0.97


def planted_groups(n: int, rng: np.random.Generator) -> list[list[int]]:
    chosen = rng.permutation(n)[: 2 * PLANTED_PAIRS + 3 * PLANTED_TRIPLES].tolist()
    sizes = [2] * PLANTED_PAIRS + [3] * PLANTED_TRIPLES
    starts = np.cumsum([0] + sizes)
    return [chosen[start:start + size] for start, size in zip(starts, sizes)]


def write_run(out: Path, n: int, d: int) -> dict:
    """The fake finished run; returns what the dedup child checks against (planted groups)."""
    import pyarrow as pa

    from mv2batch.out.rundir import RunDir, fingerprint_of
    from mv2batch.out.writer import BackgroundWriter, prediction_schema

    rng = np.random.default_rng(0)
    groups = planted_groups(n, rng)
    anchor_of = {member: group[0] for group in groups for member in group[1:]}
    fields = {"task": "embed", "input": f"bench-{n}x{d}"}
    fingerprint = fingerprint_of(fields)
    n_shards = -(-n // SHARD_ROWS)
    rundir = RunDir(out)
    rundir.prepare({"task": "embed", "fingerprint": fingerprint, "fingerprint_fields": fields,
                    "plan": {"n_items": n, "shard_size": SHARD_ROWS, "n_shards": n_shards},
                    # what the page needs of run.json (it is rebuilt with the groups; the photos are not there)
                    "input": {"kind": "folder", "name": "/photos", "description": f"fake {n}x{d}"},
                    "model": {"id": "bench", "labels": []}}, False, False)
    schema = prediction_schema([pa.field("label", pa.int32()), pa.field("embedding", pa.list_(pa.float32(), d))],
                               {"mv2batch.fingerprint": fingerprint})
    writer = BackgroundWriter(rundir, schema)
    anchors: dict[int, np.ndarray] = {}
    firsts = {group[0] for group in groups}
    for shard in range(n_shards):
        items = np.arange(shard * SHARD_ROWS, min(n, (shard + 1) * SHARD_ROWS))
        block = rng.standard_normal((len(items), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        for row, item in enumerate(items.tolist()):
            if item in anchor_of:  # anchors come before members in no particular order: drawn from the seed
                block[row] = _near(_anchor(anchors, anchor_of[item], d), rng)
            elif item in firsts:
                block[row] = _anchor(anchors, item, d)
        error = items % 997 == 0  # a few error rows: no embedding, no hash
        values = pa.array(block.reshape(-1))
        columns = {"id": [f"img{i:07d}.jpg" for i in items], "path": [f"/photos/img{i:07d}.jpg" for i in items],
                   "shard": [shard] * len(items), "width": [640] * len(items), "height": [480] * len(items),
                   "status": np.where(error, "error", "ok").tolist(),
                   "error": [("DecodeError: bad" if e else None) for e in error],
                   "sha256": [None if e else f"{i:064x}" for i, e in zip(items, error)], "label": [None] * len(items),
                   "embedding": pa.FixedSizeListArray.from_arrays(values, d, mask=pa.array(error))}
        writer.write(shard, columns)
        writer.commit(shard, {"shard": shard, "fingerprint": fingerprint, "rows": len(items),
                              "errors": int(error.sum())})
    writer.close()
    # error rows are no one's duplicate; a group whose first is one leaves members at cosine**2: not planted
    kept = [[int(m) for m in group if m % 997] for group in groups if group[0] % 997]
    return {"groups": [group for group in kept if len(group) >= 2]}


def _anchor(anchors: dict, item: int, d: int) -> np.ndarray:
    if item not in anchors:
        vector = np.random.default_rng(item).standard_normal(d).astype(np.float32)
        anchors[item] = vector / np.linalg.norm(vector)
    return anchors[item]


def _near(anchor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(len(anchor)).astype(np.float32)
    noise -= noise.dot(anchor) * anchor
    return COSINE * anchor + np.sqrt(1 - COSINE**2) * noise / np.linalg.norm(noise)


def run_dedup(out: Path, groups: list[list[int]]) -> dict:
    import pyarrow.parquet as pq

    from mv2batch.dedup.duplicates import find_duplicates

    result = find_duplicates(out)
    table = pq.read_table(out / "report" / "duplicates.parquet").to_pydict()
    group_of = {int(name[3:10]): group for name, group in zip(table["id"], table["group"])}
    wanted = [(group[0], member) for group in groups for member in group[1:]]
    found = sum(first in group_of and group_of.get(member) == group_of[first] for first, member in wanted)
    planted = {frozenset(group) for group in groups}
    members: dict[int, set] = {}
    for item, group in group_of.items():
        members.setdefault(group, set()).add(item)
    return {"read_s": result.timings["read"], "search_s": result.timings["search"], "total_s": result.seconds,
            "page_s": result.timings["page"],
            "method": result.method, "recall": found / max(1, len(wanted)), "pairs": len(wanted),
            "false_groups": sum(frozenset(group) not in planted for group in members.values()),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.child == "write":
        started = time.perf_counter()
        planted = write_run(out, args.n, args.d)
        (out / "planted.json").write_text(json.dumps(planted))
        print(json.dumps({"write_s": time.perf_counter() - started}))
    else:
        print(json.dumps(run_dedup(out, json.loads((out / "planted.json").read_text())["groups"])))


def in_child(kind: str, out: Path, n: int, d: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--out", str(out), "-n", str(n), "-d", str(d)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{kind} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("-d", type=int, default=512)
    parser.add_argument("--keep", type=Path, help="write the fake runs here (else a temporary folder)")
    parser.add_argument("--child", choices=["write", "dedup"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep or Path(temporary)
        print(f"{'N':>10} {'D':>4} {'write s':>8} {'read s':>7} {'search s':>9} {'page s':>7} {'dedup s':>8} "
              f"{'peak RSS':>9} {'N*D*4':>8}  recall  false groups  search")
        for n in args.sizes:
            out = root / f"run-{n}x{args.d}"
            written = in_child("write", out, n, args.d)
            found = in_child("dedup", out, n, args.d)
            print(f"{n:>10,} {args.d:>4} {written['write_s']:>8.1f} {found['read_s']:>7.1f} {found['search_s']:>9.1f} "
                  f"{found['page_s']:>7.1f} "
                  f"{found['total_s']:>8.1f} {found['peak_rss'] / 1e9:>7.2f}GB {n * args.d * 4 / 1e9:>6.2f}GB"
                  f"  {found['recall']:>6.1%}  {found['false_groups']:>12}  {found['method']}", flush=True)


if __name__ == "__main__":
    main()
