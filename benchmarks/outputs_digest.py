"""Digests of what classify, embed, segment, eval imagenet-val and eval voc write on the shared photos.

Run it on two commits with the same --models folder and compare the printed lines: equal digests mean the
same Parquet rows (every column, sorted by id) and the same report tables (images/s left out: it is a timing).

    python benchmarks/outputs_digest.py --work /tmp/digest --models /tmp/digest-models
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared" / "data").resolve()  # the same text in run.json from any checkout


def _digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _table_rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    rows = pq.read_table(path).to_pylist()
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def describe_out(out: Path) -> dict[str, str]:
    """One digest per table of a finished run, plus its row and error counts."""
    predictions = sorted(_table_rows(out / "predictions"), key=lambda row: row["id"])
    summary = _table_rows(out / "report" / "summary.parquet", drop=("images_per_s",))
    return {"rows": str(len(predictions)), "errors": str(sum(r["status"] == "error" for r in predictions)),
            "predictions": _digest(predictions), "summary": _digest(summary),
            "per_class": _digest(_table_rows(out / "report" / "per_class.parquet")),
            "confusion": _digest(_table_rows(out / "report" / "confusion.parquet"))}


def make_models(folder: Path) -> dict[str, Path]:
    """Random calibrated checkpoints of the real sizes (made once, reused by both commits)."""
    from mv2batch.testing import make_checkpoint

    models = {"classify": folder / "classify", "segment": folder / "segment"}
    if all((path / "config.json").is_file() for path in models.values()):
        return models
    photos = [Image.open(p).convert("RGB") for p in sorted((SHARED / "imagenet-photos").glob("n*/*"))[::50]]
    make_checkpoint(models["classify"], photos, size="full", num_labels=1000)
    make_checkpoint(models["segment"], photos[:6], size="full", num_labels=21, task="segment")
    return models


def make_voc(root: Path, photos: list[Path]) -> Path:
    """A VOC2012 layout over real photos, with a ground truth of colour bands (and ignore pixels)."""
    voc = root / "VOCdevkit" / "VOC2012"
    if voc.is_dir():
        return root / "VOCdevkit"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    names = []
    for number, path in enumerate(photos):
        name = f"2007_{number:06d}"
        image = Image.open(path).convert("RGB")
        image.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        grey = np.asarray(image.convert("L"))
        target = (grey // 13).astype(np.uint8) % 21
        target[:4] = 255
        Image.fromarray(target, mode="L").save(voc / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return root / "VOCdevkit"


def jobs(work: Path, models: dict[str, Path]) -> dict[str, dict]:
    imagenet = sorted((SHARED / "imagenet-photos").glob("n*/*"))
    segment_in = work / "segment-in"
    if not segment_in.is_dir():
        segment_in.mkdir(parents=True)
        for path in imagenet[::12][:40] + sorted((SHARED / "camera-photos").glob("*.jpg"))[:4]:
            shutil.copy(path, segment_in / path.name)
    voc = make_voc(work / "voc", imagenet[5::30][:16])
    common = {"device": "cpu", "workers": 1}
    return {
        "classify folder": dict(task="classify", source="folder", input=str(SHARED / "imagenet-photos"),
                                model=str(models["classify"]), shard_size=250, **common),
        "embed folder": dict(task="embed", source="folder", input=str(SHARED / "imagenet-photos"),
                             model=str(models["classify"]), shard_size=250, **common),
        "classify --embeddings": dict(task="classify", source="folder", input=str(SHARED / "imagenet-photos"),
                                      model=str(models["classify"]), shard_size=250, embeddings=True, **common),
        "eval imagenet-val": dict(task="classify", source="imagenet", input=str(SHARED / "imagenet-photos"),
                                  model=str(models["classify"]), shard_size=250, **common),
        "segment folder": dict(task="segment", source="folder", input=str(segment_in),
                               model=str(models["segment"]), shard_size=20, **common),
        "eval voc": dict(task="segment", source="voc", input=str(voc), model=str(models["segment"]),
                         shard_size=10, **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="inputs and OUT folders go here")
    parser.add_argument("--models", type=Path, required=True, help="checkpoints (made on the first run)")
    args = parser.parse_args()
    import mv2batch
    from mv2batch.config import RunConfig

    models = make_models(args.models)
    for name, options in jobs(args.work, models).items():
        out = args.work / ("out-" + name.replace(" ", "-"))
        mv2batch.run(RunConfig(out=out, overwrite=True, **options))
        print(name, json.dumps(describe_out(out), sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
