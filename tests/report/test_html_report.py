"""OUT/report/index.html, loaded in a real browser: Debian's chromium, headless (installed by .ci/run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import classify, read_rows, real_photos, segment
from PIL import Image

from mv2batch.inputs.eval_layouts import imagenet_wnids
from mv2batch.tasks.masks import decode_png, voc_palette

# Runs before anything else on the page: records script errors and resources that fail to load.
WATCH = """<script>window.__errors = [];
window.addEventListener('error',
    e => window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)))), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  const figures = {};
  document.querySelectorAll('[data-figure]').forEach(cell => figures[cell.dataset.figure] = cell.textContent);
  const metrics = {};
  document.querySelectorAll('[data-metric]').forEach(cell => metrics[cell.dataset.metric] = cell.textContent);
  const pre = document.createElement('pre');
  pre.id = 'checks';
  pre.textContent = JSON.stringify({images: images.length, broken: images.filter(i => !(i.naturalWidth > 0)).length,
    errors: window.__errors, figures: figures, metrics: metrics, svgs: document.querySelectorAll('svg').length});
  document.body.appendChild(pre);
});</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    return found


def _browser(chromium: str, page: Path, tmp_path: Path) -> dict:
    """What the watch script saw once the page loaded, and a screenshot of it."""
    watched = tmp_path / "watched.html"
    watched.write_text(page.read_text().replace("<head>", "<head>" + WATCH, 1))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=5000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", watched.as_uri()], capture_output=True, text=True, timeout=120).stdout
    checks = json.loads(re.search(r'<pre id="checks">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True,
                   timeout=120)
    checks["screenshot_std"] = float(np.asarray(Image.open(shot).convert("L"), dtype=np.float32).std())
    return checks


def _photos(folder: Path, count: int) -> None:
    folder.mkdir()
    for i, photo in enumerate(real_photos(count)):
        photo.save(folder / f"{i:02d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def _check_page(out: Path, checks: dict, galleries_at_least: int, metrics: tuple[str, ...] = (),
                charts: int = 1) -> str:
    page = (out / "report" / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page), "the page fetches something"
    assert len(page.encode()) < 3 * 2**20
    summary = pq.read_table(out / "report" / "summary.parquet").to_pylist()[0]
    assert checks["errors"] == [] and checks["broken"] == 0
    assert checks["images"] >= galleries_at_least and checks["svgs"] >= charts
    assert int(checks["figures"]["images"]) == summary["n_images"]
    assert int(checks["figures"]["errors"]) == summary["n_errors"] == 1
    assert checks["screenshot_std"] > 10  # not a blank page
    assert "broken.jpg" in page  # the error row, with its message
    for name in metrics:
        assert summary[name] is not None and float(checks["metrics"][name]) == pytest.approx(summary[name], abs=1e-6)
    return page


@pytest.mark.slow
def test_a_classify_report_loads_in_chromium_with_its_figures_and_thumbnails(tmp_path, tiny_model, chromium):
    _photos(tmp_path / "in", 12)
    classify(tmp_path / "in", tmp_path / "out", tiny_model)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=2 * 12)
    assert "Least confident" in page and "Top-1 confidence" in page


@pytest.mark.slow
def test_a_segment_report_shows_overlays_with_their_legends(tmp_path, tiny_segmenter, chromium):
    _photos(tmp_path / "in", 6)
    segment(tmp_path / "in", tmp_path / "out", tiny_segmenter, batch_size=2)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=6)
    assert page.count('class="swatch"') >= 6 and "Class pixel shares" in page


def _imagenet_class_folders(root: Path, per_class: int) -> None:
    """Real photos in a few ImageNet-1k class folders (gold label = the folder's index), one unreadable file."""
    photos = real_photos(4 * per_class)
    for i, photo in enumerate(photos):
        folder = root / imagenet_wnids()[(i % 4) * 250]
        folder.mkdir(parents=True, exist_ok=True)
        photo.save(folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    (root / imagenet_wnids()[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")


@pytest.mark.slow
def test_an_imagenet_eval_report_shows_accuracy_confusions_and_mistakes(tmp_path, imagenet_model, chromium):
    _imagenet_class_folders(tmp_path / "val", per_class=4)
    real = tmp_path / "real.json"  # ImageNet-ReaL sets: every other image's set holds its gold label and 7
    real.write_text(json.dumps([[(i % 4) * 250, 7] if i % 2 else [7] for i in range(16)]))
    classify(tmp_path / "val", tmp_path / "out", imagenet_model, source="imagenet", batch_size=8, real_labels=real)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=2 * 16, metrics=("top1", "top5", "real_top1"))
    rows = [row for row in read_rows(tmp_path / "out") if row["status"] == "ok"]
    wrong = [row for row in rows if row["topk_ids"][0] != row["label"]]
    assert wrong, "the random model gets some wrong: the gallery has something to show"
    assert f"Misclassified ({len(wrong)} images; the {min(24, len(wrong))} most confident)" in page
    assert page.count("<br>gold: ") == min(24, len(wrong))
    assert "Per-class top-1 accuracy (all 4 classes, worst first)" in page and "Most frequent confusions" in page
    most = max({(r["label"], r["topk_ids"][0]) for r in wrong}, key=lambda p: sum(
        (r["label"], r["topk_ids"][0]) == p for r in wrong))
    count = sum((r["label"], r["topk_ids"][0]) == most for r in wrong)
    assert f'<td class="number">{count}</td>' in page  # the top confusion's count in the table


def _voc(root: Path, count: int) -> list[str]:
    """A VOC2012 layout of real photos with blocky ground truth (255 = void border), one unreadable photo."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"2007_{i:06d}" for i in range(count)]
    for name, photo in zip(names, real_photos(count)):
        photo = photo.resize((160, 120))
        photo.save(base / "JPEGImages" / f"{name}.jpg", quality=92)
        mask = np.kron(rng.choice([0, 0, 8, 12, 15], size=(6, 8)), np.ones((20, 20), dtype=np.uint8))
        mask[:3], mask[:, :3] = 255, 255
        png = Image.fromarray(mask.astype(np.uint8), mode="P")
        png.putpalette(voc_palette().reshape(-1).tolist())
        png.save(base / "SegmentationClass" / f"{name}.png")
    (base / "JPEGImages" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join([*names, "broken"]) + "\n")
    return names


def _brute_image_miou(pred: np.ndarray, gt: np.ndarray) -> float:
    valid = gt != 255
    present = set(np.unique(pred[valid])) | set(np.unique(gt[valid]))
    return float(np.mean([np.sum((pred == c) & (gt == c) & valid) / np.sum(((pred == c) | (gt == c)) & valid)
                          for c in present]))


@pytest.mark.slow
def test_a_voc_eval_report_shows_iou_the_heat_map_and_the_worst_images(tmp_path, tiny_segmenter, chromium):
    names = _voc(tmp_path, 6)
    segment(tmp_path / "VOCdevkit", tmp_path / "out", tiny_segmenter, source="voc", batch_size=2)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out") if row["status"] == "ok"}
    for name in names:  # each row's own mIoU, against numpy on its mask and its ground truth
        gt = np.asarray(Image.open(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{name}.png"))
        row = rows[f"JPEGImages/{name}.jpg"]
        assert row["miou"] == pytest.approx(_brute_image_miou(decode_png(row["mask_png"]), gt), rel=1e-6)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=6 + 2 * 6, metrics=("miou", "pixel_acc"))
    assert "Per-class IoU" in page and "Confusion matrix (share of each ground-truth class" in page
    worst = sorted(rows.values(), key=lambda row: row["miou"])
    assert page.count(": ground truth\"") == page.count(": prediction\"") == len(worst)
    shown = re.findall(r"image mIoU (\d\.\d+)", page)
    assert shown == [f"{row['miou']:.3f}" for row in worst]  # worst first


def test_eval_charts_of_many_classes_stay_bounded():
    from mv2batch.report.eval_views import HEAT_MAP_CLASSES, TOP_CLASSES, confusion_heat_map, per_class_charts

    per_class = [{"class_id": c, "class_name": f"class {c}", "top1_acc": (c % 7) / 7} for c in range(100)]
    (only,) = per_class_charts(per_class, "top1_acc", "top-1 accuracy")
    title = f"Per-class top-1 accuracy: the {TOP_CLASSES} worst and the {TOP_CLASSES} best of 100 classes"
    assert only["title"] == title
    cells = [{"gt_class": c, "pred_class": (c * 7) % 150, "pixels": 1000 - c} for c in range(150)]
    heat = confusion_heat_map(cells, [f"class {c}" for c in range(150)])
    assert heat["title"].endswith(f"the {HEAT_MAP_CLASSES} of 150 classes with the most ground-truth pixels")
    assert len(heat["svg"]) < 150_000  # 30 named rows and columns (all 150 would be about 380 KB of SVG)


@pytest.mark.slow
def test_dedup_adds_its_groups_to_an_embed_run_s_page(tmp_path, tiny_model, chromium):
    """After `dedup`, the page shows its figures and each group's photos, captioned with their similarity; a
    resumed run that has more shards since says the groups are older than the run."""
    from mv2batch.dedup import duplicates

    _photos(tmp_path / "in", 6)
    (tmp_path / "in" / "copy_of_02.jpg").write_bytes((tmp_path / "in" / "02.jpg").read_bytes())
    (tmp_path / "in" / "copy_of_04.jpg").write_bytes((tmp_path / "in" / "04.jpg").read_bytes())
    classify(tmp_path / "in", tmp_path / "out", tiny_model, task="embed", batch_size=4)
    assert "Near-duplicates" not in (tmp_path / "out" / "report" / "index.html").read_text()
    result = duplicates.find_duplicates(tmp_path / "out", threshold=0.9999)
    checks = _browser(chromium, tmp_path / "out" / "report" / "index.html", tmp_path)
    page = _check_page(tmp_path / "out", checks, galleries_at_least=4, charts=0)  # an embed page has none
    assert result.n_groups == 2 and "Near-duplicates</h2>" in page
    assert page.count("Group 0: 2 images") == 1 and page.count("Group 1: 2 images") == 1
    assert page.count("kept: the group&#39;s first") == 2 and page.count("cosine 1.0000 to 0") == 2
    assert checks["images"] == 4  # the four photos of the two groups, each read and shown


def test_groups_of_a_run_that_had_fewer_shards_are_shown_as_older_than_the_run(tmp_path, tiny_model):
    from mv2batch.dedup import duplicates

    _photos(tmp_path / "in", 9)
    (tmp_path / "in" / "00_copy.jpg").write_bytes((tmp_path / "in" / "00.jpg").read_bytes())

    def stop_after_two_shards(update):
        if update.done >= 8:
            raise KeyboardInterrupt

    options = {"task": "embed", "batch_size": 4, "shard_size": 4}
    with pytest.raises(KeyboardInterrupt):
        classify(tmp_path / "in", tmp_path / "out", tiny_model, progress=stop_after_two_shards, **options)
    assert duplicates.find_duplicates(tmp_path / "out", threshold=0.9999).shards == 2
    classify(tmp_path / "in", tmp_path / "out", tiny_model, **options)  # the rest: the page is written again
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "Near-duplicates (dedup read 2 shards, the run has 3 now: run `mv2batch dedup` again)" in page
    assert "Group 0: 2 images" in page  # the groups it found are still shown
