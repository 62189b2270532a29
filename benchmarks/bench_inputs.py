"""Input kinds: the same photos as a folder, as 10 WebDataset tars and as one Parquet of image bytes, end to end
and the input alone, side by side in one run; peak RSS with 100 tars against 10; the datasets cache before and
after.

    python benchmarks/bench_inputs.py -n 1000 [--images DIR] [--repeat 2]

Every measurement runs in its own child process (fp32, mv2batch's defaults), one after the other, in turns.
Peak RSS is the whole process tree's (the loader workers read the tars), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

SCRIPT = Path(__file__).resolve()
KINDS = {"folder": "folder", "tars10": "10 tars", "tars100": "100 tars", "parquet": "1 Parquet of bytes"}


# ---- inputs ------------------------------------------------------------------------------------------------


def make_inputs(folder: Path, n: int) -> dict[str, str]:
    """The folder, 10 and 100 tars of its photos (jpg + cls), and a Parquet of their bytes, built once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mv2batch.testing import write_tar

    photos = sorted(folder.iterdir())
    root = common.CACHE / f"inputs-{folder.name}"
    made = {"folder": str(folder)}
    for count in (10, 100):
        tars = root / f"tars-{count}"
        if not (tars / f"part-{count - 1:04d}.tar").is_file():
            tars.mkdir(parents=True, exist_ok=True)
            per = -(-len(photos) // count)
            for number in range(count):
                samples = [(p.stem, {"jpg": p.read_bytes(), "cls": b"0"}) for p in photos[number * per :][:per]]
                write_tar(tars / f"part-{number:04d}.tar", samples)
        made[f"tars{count}"] = str(tars)
    table = root / "images.parquet"
    if not table.is_file():
        pq.write_table(pa.table({"key": [p.stem for p in photos], "jpg": [p.read_bytes() for p in photos]}), table,
                       row_group_size=100)
    made["parquet"] = str(table)
    return made


def _config(spec: dict):
    from mv2batch.config import RunConfig

    source, extra = {"folder": ("folder", {}), "parquet": ("dataset", {"streaming": True, "id_column": "key"})}.get(
        spec["kind"], ("webdataset", {}))
    return RunConfig(task="classify", source=source, input=spec["input"], out=Path(spec["out"]), model=spec["model"],
                     device="cpu", dtype="fp32", batch_size=spec["batch_size"], workers=spec["workers"],
                     overwrite=True, **extra)


def _cache_mb() -> float:
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20 if cache.is_dir() else 0.0


# ---- measurements (children) -------------------------------------------------------------------------------


def end_to_end(spec: dict, clock: common.Clock) -> dict:
    """mv2batch.run over one input kind, as a user would call it."""
    import mv2batch

    cache_before, rss = _cache_mb(), common.TreeRss()

    def progress(update) -> None:
        if update.done == 0 and clock.ready_s is None:
            clock.ready()
        elif update.done:
            clock.mark(update.done)

    report = mv2batch.run(_config(spec), progress)
    return {"images": report.ran_now, "errors": report.n_errors, "tree_rss_mb": rss.stop(),
            "cache_before_mb": cache_before, "cache_after_mb": _cache_mb()}


def input_alone(spec: dict, clock: common.Clock) -> dict:
    """The input kind's loader alone (read, decode, resize, crop in the workers mv2batch uses), no model."""
    from mv2batch.inputs.sources import is_sharded
    from mv2batch.loading.resources import LoaderSettings
    from mv2batch.runner.job import describe_job
    from mv2batch.runner.shards import ChunkReader, loader_factory, shard_loader_factory

    job = describe_job(_config(spec))
    placed = _Placed(job)
    plan = LoaderSettings(workers=spec["workers"], gate=False, batch_bytes=None, pin_memory=False)
    rss = common.TreeRss()
    clock.ready()
    if is_sharded(job.source):
        shards = [(n, None) for n in range(len(job.source.shards))]
        batches = shard_loader_factory(job, placed, plan, None, None, shards)
    elif job.source.streamed:
        records = list(job.source.records())
        read = ChunkReader(records, 0)
        batches = loader_factory(job, placed, plan, read, None, [(0, range(len(records)))])
    else:
        batches = loader_factory(job, placed, plan, job.source.read, None, [(0, range(len(job.source)))])
    done = 0
    for batch in batches:
        done += len(batch.samples)
        clock.mark(done)
    return {"images": done, "tree_rss_mb": rss.stop()}


class _Placed:
    """What the loader needs of a placement, without placing a model: the host pixel stage and the batch size."""

    def __init__(self, job):
        self.host_pixels, _ = job.preprocessing.stages(flip_on_host=True)
        self.batch_size = 32


# ---- the parent --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, default_n=1000, default_batch=32, default_model_images=0)
    parser.add_argument("--repeat", type=int, default=2, help="end-to-end runs of each kind, in turns")
    args = parser.parse_args()
    folder = common.image_folder(args.images, args.n)
    model, origin = common.checkpoint(args.model, "classify", args.images)
    inputs = make_inputs(folder, args.n)
    print(common.machine())
    print(f"{args.n} photos from {args.images}; {origin}")

    def child(name: str, label: str, kind: str, workers) -> common.Result:
        spec = {"kind": kind, "input": inputs[kind], "model": model, "batch_size": args.batch_size,
                "workers": workers, "out": str(common.CACHE / f"out-inputs-{kind}")}
        return common.run_child(SCRIPT, name, label, "fp32", spec, args.wait_idle)

    runs: dict[str, list[common.Result]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeat):
        for kind in ("folder", "tars10", "parquet", "tars100"):
            runs[kind].append(child("e2e", f"end to end, {KINDS[kind]}", kind, args.workers))
    ends = {kind: common.mean_of(results, KINDS[kind]) for kind, results in runs.items()}
    workers = args.workers if args.workers is not None else 2
    alone = {kind: child("input", f"input alone, {KINDS[kind]}", kind, workers) for kind in KINDS}
    report(ends, alone, workers)


def report(ends: dict, alone: dict, workers: int) -> None:
    folder = ends["folder"].steady
    rows = [[KINDS[kind], f"{ends[kind].steady:.1f}", f"{100 * ends[kind].steady / folder:.1f} %",
             f"{alone[kind].steady:.1f}", f"{ends[kind].data['tree_rss_mb']:.0f}",
             f"{ends[kind].data['cache_before_mb']:.1f} -> {ends[kind].data['cache_after_mb']:.1f}"] for kind in KINDS]
    print()
    print(common.table(["input", "end to end img/s", "of folder", f"input alone img/s ({workers} workers)",
                        "peak tree RSS MB", "datasets cache MB"], rows))
    print("\nend-to-end runs: " + "; ".join(f"{KINDS[k]} {', '.join(f'{r:.1f}' for r in e.data['runs'])}"
                                            for k, e in ends.items()))
    share = {kind: ends[kind].steady / folder for kind in ("tars10", "parquet")}
    growth = ends["tars100"].data["tree_rss_mb"] / ends["tars10"].data["tree_rss_mb"]
    cache_same = all(e.data["cache_before_mb"] == e.data["cache_after_mb"] for e in ends.values())
    verdicts = [("10 tars at least 95 % of the folder", share["tars10"] >= 0.95, f"{100 * share['tars10']:.1f} %"),
                ("Parquet at least 95 % of the folder", share["parquet"] >= 0.95, f"{100 * share['parquet']:.1f} %"),
                ("peak RSS with 100 tars at most 10 % above 10 tars", growth <= 1.10, f"{100 * growth:.1f} %"),
                ("the datasets cache the same size before and after", cache_same, "")]
    print()
    for what, met, figure in verdicts:
        print(f"{'MET' if met else 'NOT MET'}: {what} {figure}".rstrip())


if __name__ == "__main__":
    if common.is_child():
        common.child_main({"e2e": end_to_end, "input": input_alone})
    else:
        main()
