"""`mv2batch export coco`: a segment run's masks as COCO results, read back by pycocotools itself."""

from __future__ import annotations

import json

import numpy as np
from conftest import classify, read_rows, real_photos, segment
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from mv2batch.cli.app import app
from mv2batch.tasks.masks import decode_png


def _segmented(tmp_path, model, count: int = 5):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, photo in enumerate(real_photos(count)):
        photo.save(folder / ("sub" if i % 2 else "") / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    segment(folder, tmp_path / "out", model, batch_size=2)
    return tmp_path / "out"


def test_every_rle_decodes_to_the_parquet_mask_and_loadres_accepts_the_file(tmp_path, tiny_segmenter):
    out = _segmented(tmp_path, tiny_segmenter)
    results = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["export", "coco", str(out), "-o", str(results)])
    assert result.exit_code == 0, result.output
    assert "1 error rows left out" in result.output
    rows = {row["id"]: row for row in read_rows(out) if row["status"] == "ok"}
    gt = COCO(str(tmp_path / "results.images.json"))
    loaded = gt.loadRes(str(results))
    labels = json.loads((out / "run.json").read_text())["model"]["labels"]
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == labels
    assert sorted(image["file_name"] for image in gt.dataset["images"]) == sorted(rows)
    in_file = {(a["image_id"], a["category_id"]): a for a in json.loads(results.read_text())}
    checked = 0
    for image in gt.dataset["images"]:
        row = rows[image["file_name"]]
        mask = decode_png(row["mask_png"])
        assert (image["height"], image["width"]) == mask.shape
        anns = loaded.loadAnns(loaded.getAnnIds(imgIds=[image["id"]]))
        assert sorted(a["category_id"] for a in anns) == sorted(row["classes"])
        for ann in anns:
            decoded = mask_utils.decode(ann["segmentation"])
            assert np.array_equal(decoded.astype(bool), mask == ann["category_id"])
            written = in_file[(image["id"], ann["category_id"])]
            assert written["area"] == int(decoded.sum())  # loadRes replaces it with the box's, its rule for boxes
            ys, xs = np.nonzero(decoded)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert written["bbox"] == [float(v) for v in box]  # FiftyOne's reader needs it
            checked += 1
        # Together the classes cover every pixel once.
        assert sum(mask_utils.decode(a["segmentation"]).astype(int) for a in anns).max() == 1
    assert checked == sum(len(row["classes"]) for row in rows.values()) > len(rows)


def test_a_classify_run_or_no_run_is_one_line(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    real_photos(1)[0].save(folder / "a.jpg")
    classify(folder, tmp_path / "out", tiny_model)
    refusals = [(tmp_path / "out", "holds a classify run, not a segment run", 2), (tmp_path / "nothing", "no such", 5)]
    for target, words, code in refusals:
        result = CliRunner().invoke(app, ["export", "coco", str(target), "-o", str(tmp_path / "r.json")])
        assert result.exit_code == code and words in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
