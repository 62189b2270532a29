"""Evaluation: ImageNet-val layouts, gold labels, ReaL, mIoU against brute force, VOC / ADE20k end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import classify, read_rows, skimage_photos
from PIL import Image
from typer.testing import CliRunner

from mv2batch.cli.app import app
from mv2batch.errors import ModelError
from mv2batch.inputs.eval_layouts import imagenet_val_labels, imagenet_wnids
from mv2batch.tasks.masks import decode_png, voc_palette
from mv2batch.tasks.metrics import SegmentCounts, segmentation_metrics
from mv2batch.tasks.postprocess import confusion_cells

CLASSES = [0, 1, 7, 100, 333, 999]


def _val_files_by_class(per_class: int) -> dict[int, list[str]]:
    """Real validation file names whose official label is each chosen class."""
    by_class: dict[int, list[str]] = {c: [] for c in CLASSES}
    for stem, label in sorted(imagenet_val_labels().items()):
        if label in by_class and len(by_class[label]) < per_class:
            by_class[label].append(f"{stem}.JPEG")
    return by_class


def _photo(seed: int) -> Image.Image:
    photos = list(skimage_photos().values())
    rng = np.random.default_rng(seed)
    base = np.asarray(photos[seed % len(photos)].resize((160, 120)), dtype=np.int16)
    return Image.fromarray(np.clip(base + rng.integers(-60, 60, base.shape), 0, 255).astype(np.uint8))


def _write_layouts(root: Path) -> dict[str, Path]:
    """The same photos as class folders, a flat folder, two label CSVs and a saved `datasets` dataset."""
    import datasets

    wnids = imagenet_wnids()
    class_folders, flat = root / "val", root / "flat"
    flat.mkdir(parents=True)
    rows = []
    for seed, (label, names) in enumerate((c, n) for c, ns in _val_files_by_class(2).items() for n in ns):
        image = _photo(seed * 7 + label)
        (class_folders / wnids[label]).mkdir(parents=True, exist_ok=True)
        image.save(class_folders / wnids[label] / names, format="JPEG", quality=95)
        image.save(flat / names, format="JPEG", quality=95)
        rows.append((names, label))
    kaggle, simple = root / "LOC_val_solution.csv", root / "labels.csv"
    with kaggle.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows([Path(n).stem, f"{wnids[label]} 1 2 3 4"] for n, label in rows)
    with simple.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(wnids))})
    columns = {"image": [str(flat / n) for n, _ in rows], "label": [label for _, label in rows]}
    data = datasets.Dataset.from_dict(columns, features=features)
    data.save_to_disk(str(root / "hf"))
    return {"class_folders": class_folders, "flat": flat, "kaggle": kaggle, "simple": simple, "hf": root / "hf"}


def _eval_imagenet(input_path: Path, out: Path, model: Path, **options):
    options = {"shard_size": 5, "batch_size": 4, **options}
    return classify(input_path, out, model, source="imagenet", **options)


def _report_tables(out: Path) -> tuple[list[dict], list[dict]]:
    summary = pq.read_table(out / "report" / "summary.parquet").to_pylist()[0]
    stable = {k: summary[k] for k in ("n_images", "n_errors", "top1", "top5")}
    return [stable], pq.read_table(out / "report" / "per_class.parquet").to_pylist()


def test_three_imagenet_layouts_give_identical_reports(imagenet_model, tmp_path):
    layouts = _write_layouts(tmp_path / "data")
    _eval_imagenet(layouts["class_folders"], tmp_path / "o1", imagenet_model)
    _eval_imagenet(layouts["flat"], tmp_path / "o2", imagenet_model)
    _eval_imagenet(layouts["flat"], tmp_path / "o3", imagenet_model, labels_file=layouts["kaggle"])
    _eval_imagenet(layouts["flat"], tmp_path / "o4", imagenet_model, labels_file=layouts["simple"])
    _eval_imagenet(layouts["hf"], tmp_path / "o5", imagenet_model)
    reference = _report_tables(tmp_path / "o1")
    assert reference[0][0]["n_images"] == 2 * len(CLASSES)
    assert [row["class_id"] for row in reference[1]] == CLASSES
    for out in ("o2", "o3", "o4", "o5"):
        assert _report_tables(tmp_path / out) == reference, out
    rows = read_rows(tmp_path / "o1")
    top1 = np.mean([r["topk_ids"][0] == r["label"] for r in rows])
    assert reference[0][0]["top1"] == pytest.approx(top1)


def test_gold_label_is_the_sorted_wordnet_index_for_all_1000_classes(imagenet_model, tmp_path):
    wnids = sorted(imagenet_wnids())
    assert len(set(wnids)) == 1000
    folder = tmp_path / "val"
    tiny = Image.new("RGB", (8, 8), (90, 120, 30))
    for wnid in reversed(wnids):  # creation order must not matter
        (folder / wnid).mkdir(parents=True)
        tiny.save(folder / wnid / f"{wnid}_1.png")
    report = _eval_imagenet(folder, tmp_path / "out", imagenet_model, batch_size=100, shard_size=400)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 1000 and report.n_errors == 0
    for row in rows:
        assert row["label"] == wnids.index(row["id"].split("/")[0]), row["id"]
    per_class = pq.read_table(tmp_path / "out" / "report" / "per_class.parquet").to_pylist()
    assert [r["class_id"] for r in per_class] == list(range(1000))


def test_real_labels_add_real_top1(imagenet_model, tmp_path):
    layouts = _write_layouts(tmp_path / "data")
    _eval_imagenet(layouts["flat"], tmp_path / "first", imagenet_model)
    rows = read_rows(tmp_path / "first")
    real = [[] for _ in range(50000)]
    for i, row in enumerate(rows):  # one image left out (empty set), others alternately right and wrong
        index = int(Path(row["id"]).stem.split("_")[-1]) - 1
        real[index] = [] if i == 0 else [row["topk_ids"][0]] if i % 2 else [(row["topk_ids"][0] + 1) % 1000]
    real_file = tmp_path / "real.json"
    real_file.write_text(json.dumps(real))
    report = _eval_imagenet(layouts["flat"], tmp_path / "out", imagenet_model, real_labels=real_file)
    expected = np.mean([1.0 if i % 2 else 0.0 for i in range(1, len(rows))])
    assert report.metrics["real_top1"] == pytest.approx(expected)


def test_imagenet_needs_a_1000_class_model(tiny_model, tmp_path):
    layouts = _write_layouts(tmp_path / "data")
    with pytest.raises(ModelError, match="1000"):
        _eval_imagenet(layouts["class_folders"], tmp_path / "out", tiny_model)


# ---- segmentation metrics -----------------------------------------------------------------------------------


def _brute_force(pred: np.ndarray, gt: np.ndarray, classes: int) -> tuple[dict, list]:
    valid = gt != 255
    ious, accs = [], []
    for c in range(classes):
        p, g = (pred == c) & valid, (gt == c) & valid
        inter, union = np.sum(p & g), np.sum(p | g)
        ious.append(inter / union if union else None)
        accs.append(inter / g.sum() if g.sum() else None)
    summary = {"miou": np.mean([x for x in ious if x is not None]),
               "pixel_acc": np.sum((pred == gt) & valid) / valid.sum(),
               "mean_acc": np.mean([x for x in accs if x is not None])}
    return summary, list(zip(ious, accs))


def _random_masks(seed: int, classes: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        shape = tuple(rng.integers(5, 40, 2))
        gt = rng.integers(0, classes - 2, shape).astype(np.uint8)  # the last classes never occur in gt
        gt[rng.random(shape) < 0.2] = 255
        pairs.append((rng.integers(0, classes - 1, shape).astype(np.int16), gt))
    return pairs


def _counts(pairs: list[tuple[np.ndarray, np.ndarray]], classes: int) -> SegmentCounts:
    counts = SegmentCounts()
    for pred, gt in pairs:
        counts.add([], [], confusion_cells(torch.from_numpy(pred), gt, classes))
    return counts


def test_segmentation_metrics_equal_brute_force_numpy():
    classes = 7
    pairs = _random_masks(0, classes, 12)
    summary, per_class = segmentation_metrics(_counts(pairs, classes).confusion_matrix(classes))
    pred = np.concatenate([p.reshape(-1) for p, _ in pairs])
    gt = np.concatenate([g.reshape(-1) for _, g in pairs])
    expected, expected_per_class = _brute_force(pred, gt, classes)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    for row, (iou, acc) in zip(per_class, expected_per_class):
        assert row["iou"] == (pytest.approx(iou) if iou is not None else None)
        assert row["acc"] == (pytest.approx(acc) if acc is not None else None)
    assert per_class[-1]["iou"] is None  # no union: left out of the mean


def test_merging_shard_partials_equals_one_pass():
    classes = 5
    pairs = _random_masks(1, classes, 10)
    merged = SegmentCounts()
    for shard in (pairs[:3], pairs[3:4], pairs[4:]):
        merged = merged.merge(SegmentCounts.from_json(json.loads(json.dumps(_counts(shard, classes).to_json()))))
    assert merged == _counts(pairs, classes)


# ---- VOC and ADE20k layouts, end to end ---------------------------------------------------------------------


def _blocks(seed: int, shape: tuple[int, int], labels: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.choice(labels, size=(shape[0] // 20 + 1, shape[1] // 20 + 1))
    return np.kron(cells, np.ones((20, 20), dtype=np.int64))[: shape[0], : shape[1]].astype(np.uint8)


def _write_voc(root: Path) -> list[str]:
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    names = [f"2007_{i:06d}" for i in range(5)]
    for i, name in enumerate(names):
        photo = _photo(i).resize((120 + 10 * i, 90))
        photo.save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        mask = _blocks(i, (90, 120 + 10 * i), list(range(21)))
        mask[:3], mask[:, :3] = 255, 255  # the VOC-style void border
        png = Image.fromarray(mask, mode="P")
        png.putpalette(voc_palette().reshape(-1).tolist())
        png.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[1:]) + "\n")
    return names[1:]


def _write_ade(root: Path) -> list[str]:
    base = root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "annotations" / "validation").mkdir(parents=True)
    names = [f"ADE_val_{i:08d}" for i in range(1, 4)]
    for i, name in enumerate(names):
        _photo(i + 3).resize((100, 80 + 10 * i)).save(base / "images" / "validation" / f"{name}.jpg")
        Image.fromarray(_blocks(i, (80 + 10 * i, 100), list(range(151)))).save(
            base / "annotations" / "validation" / f"{name}.png")
    return names


def _miou_from_rows(out: Path, targets: list[np.ndarray], classes: int) -> float:
    rows = read_rows(out)
    pred = np.concatenate([decode_png(r["mask_png"]).reshape(-1) for r in rows])
    gt = np.concatenate([t.reshape(-1) for t in targets])
    return _brute_force(pred, gt, classes)[0]["miou"]


def _cli_eval(*args: str) -> None:
    result = CliRunner().invoke(app, ["eval", *args, "--device", "cpu", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output


def test_voc_layout_end_to_end(tmp_path, calibration_photos):
    from mv2batch.testing import make_checkpoint

    model = make_checkpoint(tmp_path / "voc-model", calibration_photos, num_labels=21, task="segment")
    names = _write_voc(tmp_path)
    _cli_eval("voc", str(tmp_path / "VOCdevkit"), "-o", str(tmp_path / "out"), "--model", str(model),
              "--shard-size", "2")
    base = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    targets = [np.asarray(Image.open(base / f"{n}.png")) for n in names]
    summary = pq.read_table(tmp_path / "out" / "report" / "summary.parquet").to_pylist()[0]
    assert summary["n_images"] == len(names)
    assert summary["miou"] == pytest.approx(_miou_from_rows(tmp_path / "out", targets, 21))
    assert (tmp_path / "out" / "report" / "confusion.parquet").is_file()
    per_class = pq.read_table(tmp_path / "out" / "report" / "per_class.parquet").to_pylist()
    assert len(per_class) == 21 and {"iou", "acc", "gt_pixels", "pred_pixels"} <= set(per_class[0])


def test_ade20k_layout_end_to_end_with_reduced_labels(tmp_path, calibration_photos):
    from mv2batch.testing import make_checkpoint

    model = make_checkpoint(tmp_path / "ade-model", calibration_photos, num_labels=150, task="segment")
    names = _write_ade(tmp_path)
    _cli_eval("ade20k", str(tmp_path / "ADEChallengeData2016"), "-o", str(tmp_path / "out"), "--model", str(model))
    base = tmp_path / "ADEChallengeData2016" / "annotations" / "validation"
    raw = [np.asarray(Image.open(base / f"{n}.png")).astype(np.int16) for n in names]
    targets = [np.where(t == 0, 255, t - 1).astype(np.uint8) for t in raw]  # label 0 ignored, k -> k - 1
    summary = pq.read_table(tmp_path / "out" / "report" / "summary.parquet").to_pylist()[0]
    assert summary["miou"] == pytest.approx(_miou_from_rows(tmp_path / "out", targets, 150))
    per_class = pq.read_table(tmp_path / "out" / "report" / "per_class.parquet").to_pylist()
    gt_pixels = sum(r["gt_pixels"] for r in per_class)
    assert gt_pixels == sum(int((t != 255).sum()) for t in targets)


def test_missing_voc_pieces_are_one_clear_error(tmp_path):
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    result = CliRunner().invoke(app, ["eval", "voc", str(tmp_path), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0
    assert "SegmentationClass" in result.output and "Traceback" not in result.output
