"""A segment run's masks as COCO results: one run-length encoding per class present per image (pycocotools).

Two files: the results themselves (a JSON list, what `COCO.loadRes` takes) and, beside them, the images and
categories they refer to (a COCO dataset without annotations, `<name>.images.json`), so that
`COCO("results.images.json").loadRes("results.json")` works with nothing else at hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from mv2batch import storage
from mv2batch.errors import ConfigError, OutputError
from mv2batch.out.rundir import open_run, output_errors

COLUMNS = ["id", "path", "status", "width", "height", "mask_png", "classes", "class_pixels"]


@dataclass(frozen=True)
class CocoExport:
    """What was written: the two files and their counts."""

    results: Path | str  # a local file, or an object's URL
    images_file: Path | str
    images: int
    annotations: int
    skipped_errors: int
    shards_done: int = 0  # the committed shards exported
    shards_total: int | None = None  # the run's planned shards (None: a stream whose length is not known yet)

    @property
    def complete(self) -> bool:
        return self.shards_total is not None and self.shards_done >= self.shards_total


def images_file_for(results: Path | str) -> Path | str:
    """results.json -> results.images.json (the images and categories the results refer to), beside it."""
    name = storage.name_of(results)
    stem = name.rsplit(".", 1)[0] if "." in name else name  # as Path.stem
    return storage.join(storage.parent_of(results), stem + ".images.json")


def export_coco(out: Path | str, results: Path | str, storage_options: dict | None = None,
                allow_incomplete: bool = False) -> CocoExport:
    """Write the committed masks of the segment run in OUT as COCO results (image ids in the run's row order).
    results: a local path or a URL (s3://, gs://, ...: each file one PUT, with storage_options). A run with shards
    still to do is refused, saying how many, unless allow_incomplete (then its committed shards are exported)."""
    mask_utils = _pycocotools_mask()
    results = storage.location(results)
    rundir, run_info = open_run(out, storage_options, needs=("model",))
    if run_info["task"] != "segment":
        raise ConfigError(f"{out} holds a {run_info['task']} run, not a segment run: export coco needs its masks")
    labels = run_info["model"]["labels"]
    done, total = sorted(rundir.committed(run_info["fingerprint"])), run_info["plan"]["n_shards"]
    if not allow_incomplete and (total is None or len(done) < total):
        raise OutputError(f"{out} is an unfinished run: {_missing(len(done), total)}; resume it first, or pass "
                          "--allow-incomplete to export the shards that are done")
    images, annotations, errors = [], [], 0
    for shard in done:
        for row in rundir.read_part(shard, COLUMNS).to_pylist():
            if row["status"] != "ok":
                errors += 1
                continue
            image_id = len(images) + 1  # COCO ids start at 1; 0 reads as "no image" in some tools
            images.append({"id": image_id, "file_name": row["id"], "width": row["width"], "height": row["height"]})
            annotations += list(_annotations(image_id, row, mask_utils))
    categories = [{"id": index, "name": name} for index, name in enumerate(labels)]
    images_file = images_file_for(results)
    with output_errors(f"the COCO export {results}"):
        storage.write_bytes(results, json.dumps(annotations).encode(), storage_options)
        storage.write_bytes(images_file, json.dumps({"images": images, "categories": categories,
                                                     "annotations": []}).encode(), storage_options)
    return CocoExport(results, images_file, len(images), len(annotations), errors, len(done), total)


def _missing(done: int, total: int | None) -> str:
    if total is None:
        return f"{done} shard(s) done of a stream whose length is not known yet"
    return f"{total - done} of its {total} shards are missing"


def _annotations(image_id: int, row: dict, mask_utils: ModuleType) -> list[dict]:  # pycocotools.mask
    """One result per class present: its pixels as COCO's compressed RLE (column-major, as pycocotools wants),
    `area` its pixels, and its bounding box: FiftyOne's COCO reader makes no label of a result without one
    (detectron2's segmentation results carry one too). pycocotools' loadRes then sets `area` to the box's."""
    from mv2batch.tasks.masks import decode_png

    mask = decode_png(row["mask_png"])
    found = []
    for class_id, pixels in zip(row["classes"], row["class_pixels"]):
        rle = mask_utils.encode(np.asfortranarray(mask == class_id, dtype=np.uint8))
        found.append({"image_id": image_id, "category_id": int(class_id), "score": 1.0, "area": int(pixels),
                      "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                      "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return found


def _pycocotools_mask() -> ModuleType:
    try:
        from pycocotools import mask
    except ImportError:
        raise ConfigError("export coco needs pycocotools: pip install 'mv2batch[coco]'") from None
    return mask
