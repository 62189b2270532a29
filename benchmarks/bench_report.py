"""The per-run HTML report over a large run: OUT/report/ rebuilt by `report.load_report` (the code path of
`mv2batch report OUT` and of a run's end) for a fake finished OUT of N rows, side by side for a classify run,
an eval imagenet-val run, a segment run and an eval voc run.

    python benchmarks/bench_report.py [-n 100000] [--shard-size 1000] [--images DIR]

Each fake OUT starts from a small real run on real photos (its run.json, schema, masks and markers), whose
rows are then repeated, with varied predictions, into N rows of parts and markers of the same run: the page
reads every part's row columns, builds its charts and decodes its thumbnails exactly as for a real run. Printed:
the whole load_report (markers merged, summary / per-class tables, page) and write_html alone, in seconds, and
the page's size. The report reads N rows whatever the task; the page's galleries stay GALLERY thumbnails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

SEED_PHOTOS = 48


def seed_photos(images: Path) -> list[Path]:
    """SEED_PHOTOS photos spread over the folder's classes."""
    photos = common.source_photos(images)
    return photos[:: max(1, len(photos) // SEED_PHOTOS)][:SEED_PHOTOS]


def run(task: str, source: str, input_path: Path, out: Path, model: Path) -> None:
    import mv2batch
    from mv2batch.config import RunConfig

    mv2batch.run(RunConfig(input=str(input_path), out=out, model=str(model), task=task, source=source,
                           device="cpu", workers=0))


def imagenet_layout(photos: list[Path], root: Path) -> Path:
    """The photos in their class folders (those of the shared photos)."""
    for photo in photos:
        (root / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, root / photo.parent.name / photo.name)
    return root


def voc_layout(photos: list[Path], root: Path) -> Path:
    """A VOC2012 layout of the photos, with blocky ground truth (void border): the report's path, not realism."""
    from mv2batch.tasks.masks import voc_palette

    base = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"2007_{i:06d}" for i in range(len(photos))]
    for name, path in zip(names, photos):
        photo = Image.open(path).convert("RGB")
        photo.save(base / "JPEGImages" / f"{name}.jpg", quality=92)
        cells = rng.choice([0, 0, 0, 8, 12, 15, 3], size=(photo.height // 40 + 1, photo.width // 40 + 1))
        mask = np.kron(cells, np.ones((40, 40), dtype=np.uint8))[: photo.height, : photo.width].astype(np.uint8)
        mask[:4], mask[:, :4] = 255, 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(voc_palette().reshape(-1).tolist())
        png.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return root


def varied(seed: pa.Table, rows: int, start: int, rng: np.random.Generator, classes: int) -> pa.Table:
    """rows rows cycling the seed run's (same photos, masks, ids), predictions and scores varied."""
    table = seed.take(np.arange(start, start + rows) % seed.num_rows)
    if "topk_ids" in table.column_names:
        ids = rng.integers(0, classes, (rows, 5)).astype(np.int32)
        scores = np.sort(rng.dirichlet(np.ones(6), rows)[:, :5].astype(np.float32), axis=1)[:, ::-1]
        labels = [[f"class_{i:04d}" for i in row] for row in ids.tolist()]
        for name, value in (("topk_ids", ids.tolist()), ("topk_scores", scores.tolist()), ("topk_labels", labels)):
            column = pa.array(value, table.schema.field(name).type)
            table = table.set_column(table.column_names.index(name), name, column)
        if table.column("label").null_count == 0:  # eval: the top-1 right about half the time
            right = rng.random(rows) < 0.5
            gold = np.where(right, ids[:, 0], rng.integers(0, classes, rows)).astype(np.int32)
            table = table.set_column(table.column_names.index("label"), "label", pa.array(gold, pa.int32()))
    if "miou" in table.column_names:
        table = table.set_column(table.column_names.index("miou"), "miou", pa.array(rng.random(rows), pa.float32()))
    return table


def shard_metrics(task, table: pa.Table, seed_marker: dict, rows: int) -> dict:
    """The shard's metric partials: counted from its rows for classification, the seed's scaled for masks."""
    if "topk_ids" in table.column_names:
        counts = task.new_counts()
        for label, ids in zip(table.column("label").to_pylist(), table.column("topk_ids").to_pylist()):
            if label is not None:
                counts.add(label, ids)
        return counts.to_json()
    scale = rows / max(1, seed_marker["rows"])
    return {name: {key: int(value * scale) for key, value in cells.items()}
            for name, cells in seed_marker["metrics"].items()}


def fake_out(seed_out: Path, out: Path, n: int, shard_size: int) -> None:
    """A finished OUT of n rows made from a finished seed run: same run.json (planned for n), parts, markers."""
    from mv2batch.tasks.task import TASKS

    run_info = json.loads((seed_out / "run.json").read_text())
    seed = pq.read_table(seed_out / "predictions")
    seed_marker = json.loads(sorted((seed_out / "shards").glob("*.json"))[0].read_text())
    schema = pq.read_schema(next((seed_out / "predictions").glob("part-*.parquet")))
    labels = run_info["model"]["labels"]
    task = TASKS[run_info["task"]](labels)
    n_shards = -(-n // shard_size)
    run_info["plan"] = {"n_items": n, "shard_size": shard_size, "n_shards": n_shards}
    (out / "predictions").mkdir(parents=True)
    (out / "shards").mkdir()
    (out / "run.json").write_text(json.dumps(run_info))
    rng = np.random.default_rng(0)
    for shard in range(n_shards):
        rows = min(shard_size, n - shard * shard_size)
        table = varied(seed, rows, shard * shard_size, rng, len(labels)).cast(schema)
        pq.write_table(table, out / "predictions" / f"part-{shard:05d}.parquet", compression="zstd")
        errors = sum(status != "ok" for status in table.column("status").to_pylist())
        marker = {**seed_marker, "shard": shard, "part": f"part-{shard:05d}.parquet", "rows": rows,
                  "errors": errors, "metrics": shard_metrics(task, table, seed_marker, rows)}
        (out / "shards" / f"{shard:05d}.json").write_text(json.dumps(marker))


def measure(out: Path) -> dict:
    from mv2batch.out.rundir import RunDir
    from mv2batch.report.tables import load_report, write_html

    started = time.perf_counter()
    report = load_report(out)
    whole = time.perf_counter() - started
    page = out / "report" / "index.html"
    page.unlink()  # write_html only warns on a failure: the page must be there again after it
    started = time.perf_counter()
    write_html(report, RunDir(out))
    return {"rows": report.n_images, "load_report_s": whole, "write_html_s": time.perf_counter() - started,
            "page_kb": page.stat().st_size / 1024 if page.is_file() else None, "complete": report.complete}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--images", type=Path, default=common.DEFAULT_PHOTOS)
    args = parser.parse_args()
    from mv2batch.testing import make_checkpoint

    photos = seed_photos(args.images)
    calibration = [Image.open(p).convert("RGB") for p in photos[:8]]
    work = Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        models = {"classify": make_checkpoint(work / "m10", calibration, num_labels=10),
                  "imagenet": make_checkpoint(work / "m1000", calibration, num_labels=1000),
                  "segment": make_checkpoint(work / "s21", calibration, num_labels=21, task="segment")}
        imagenet_layout(photos, work / "val")
        voc_layout(photos, work / "voc")
        runs = [("classify", "classify", "folder", work / "val", models["classify"]),
                ("eval imagenet-val", "classify", "imagenet", work / "val", models["imagenet"]),
                ("segment", "segment", "folder", work / "voc" / "VOC2012" / "JPEGImages", models["segment"]),
                ("eval voc", "segment", "voc", work / "voc", models["segment"])]
        print(f"{args.n} rows in parts of {args.shard_size}; {len(photos)} real photos repeated")
        print(f"{'run':<20}{'rows':>9}{'load_report s':>15}{'write_html s':>14}{'page KB':>10}")
        for name, task, source, input_path, model in runs:
            slug = name.replace(" ", "-")
            run(task, source, input_path, work / f"seed-{slug}", model)
            fake_out(work / f"seed-{slug}", work / f"out-{slug}", args.n, args.shard_size)
            figures = measure(work / f"out-{slug}")
            assert figures["complete"] and figures["page_kb"] is not None, f"{name}: no page (see the warning)"
            print(f"{name:<20}{figures['rows']:>9}{figures['load_report_s']:>15.2f}{figures['write_html_s']:>14.2f}"
                  f"{figures['page_kb']:>10.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
