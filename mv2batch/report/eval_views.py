"""The evaluation views of the report page: eval imagenet-val (rows with gold labels) and eval voc / ade20k
(ground truth): per-class charts, confusions, and the images that went worst.

Sizes stay bounded whatever the run: per-class charts of at most 2 x TOP_CLASSES bars, CONFUSIONS table rows,
a heat map of at most HEAT_MAP_CLASSES classes, GALLERY thumbnails per gallery.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable

import numpy as np

from mv2batch.report.page_parts import (
    bar_chart,
    bar_chart_pair,
    chart,
    gallery,
    heat_map,
    legend,
    overlay_src,
    table,
    thumb,
)

if TYPE_CHECKING:
    from mv2batch.report.page_parts import PageReport, ThumbnailReader

GALLERY = 24  # thumbnails per gallery (the worst-IoU gallery: GALLERY // 2 pairs)
TOP_CLASSES = 30  # the worst and the best classes of a per-class chart
CONFUSIONS = 20
HEAT_MAP_CLASSES = 30  # more rows and columns than this cannot be read: those with the most ground-truth pixels
NAME_CHARS = 28  # ImageNet's names ("tench, Tinca tinca"): the first synonym, cut, so the bars keep the width


def is_classify_eval(report: PageReport) -> bool:
    return report.metrics.get("top1") is not None


def is_segment_eval(report: PageReport) -> bool:
    return report.metrics.get("miou") is not None


def classify_eval_views(page: dict, report: PageReport, ok: list[dict], read_photo: ThumbnailReader,
                        labels: list[str]) -> None:
    """Per-class top-1 (worst and best), the most frequent confusions, the most confident mistakes."""
    page["sections"] += per_class_charts(report.per_class, "top1_acc", "top-1 accuracy")
    wrong = [row for row in ok if row.get("label") is not None and row["topk_ids"][0] != row["label"]]
    pairs = Counter((row["label"], row["topk_ids"][0]) for row in wrong).most_common(CONFUSIONS)
    page["sections"].append(table(f"Most frequent confusions (gold -> predicted, at most {CONFUSIONS})",
                                  ["gold", "predicted", "images"],
                                  [[_name(labels, gold), _name(labels, predicted), count]
                                   for (gold, predicted), count in pairs]))
    # The most confident mistakes first: those say most about the model (or about the gold label).
    shown = sorted(wrong, key=lambda row: -row["topk_scores"][0])[:GALLERY]
    page["sections"].append(gallery(f"Misclassified ({len(wrong)} images; the {len(shown)} most confident)", [
        thumb(row, read_photo, [f"gold: {_name(labels, row['label'])}",
                                f"predicted: {_name(labels, row['topk_ids'][0])} {row['topk_scores'][0]:.2f}"])
        for row in shown]))


def segment_eval_views(page: dict, report: PageReport, ok: list[dict], read_photo: ThumbnailReader,
                       read_mask: Callable[[dict], bytes], read_target: Callable[[dict], np.ndarray | None],
                       labels: list[str]) -> None:
    """Per-class IoU, the row-normalised confusion heat map, the worst images beside their ground truth."""
    page["sections"] += per_class_charts(report.per_class, "iou", "IoU")
    page["sections"].append(confusion_heat_map(report.confusion, labels))
    scored = [row for row in ok if row.get("miou") is not None]
    worst = sorted(scored, key=lambda row: (row["miou"], row["id"]))[:GALLERY // 2]
    # Read in the rows' own order (the masks part by part, each part once), shown worst first.
    def place(row: dict) -> tuple[int, int]:
        return row["_shard"], row["_row"]

    items = {place(row): _pair(row, read_photo, read_mask, read_target, labels) for row in sorted(worst, key=place)}
    page["sections"].append(gallery(f"Worst images by image mIoU (the {len(worst)} worst of {len(scored)})",
                                    [items[place(row)] for row in worst]))


def per_class_charts(per_class: list[dict], key: str, what: str) -> list[dict]:
    """One chart of every class with a score, worst first, or the TOP_CLASSES worst and best when there are more."""
    scored = sorted((row for row in per_class if row.get(key) is not None), key=lambda row: (row[key], row["class_id"]))

    def bars(rows: list[dict]) -> str:
        return bar_chart([_short(row["class_name"]) for row in rows], [row[key] for row in rows], what, limit=1)

    if len(scored) <= 2 * TOP_CLASSES:
        return [chart(f"Per-class {what} (all {len(scored)} classes, worst first)", bars(scored))]
    worst, best = scored[:TOP_CLASSES], scored[::-1][:TOP_CLASSES]
    panels = [(f"the {TOP_CLASSES} {which}", [_short(row["class_name"]) for row in rows], [row[key] for row in rows])
              for which, rows in (("worst", worst), ("best", best))]
    return [chart(f"Per-class {what}: the {TOP_CLASSES} worst and the {TOP_CLASSES} best of {len(scored)} classes",
                  bar_chart_pair(*panels, what, limit=1))]


def confusion_heat_map(cells: list[dict], labels: list[str]) -> dict:
    """Ground truth x prediction, each row divided by its ground-truth pixels, over the classes that occur
    (the HEAT_MAP_CLASSES with the most ground-truth pixels where more occur)."""
    size = max(len(labels), 1 + max((max(c["gt_class"], c["pred_class"]) for c in cells), default=0))
    matrix = np.zeros((size, size), dtype=np.float64)
    for cell in cells:
        matrix[cell["gt_class"], cell["pred_class"]] += cell["pixels"]
    gt_pixels = matrix.sum(axis=1)
    shares = np.divide(matrix, gt_pixels[:, None], out=np.zeros_like(matrix), where=gt_pixels[:, None] > 0)
    occurring = np.flatnonzero(gt_pixels + matrix.sum(axis=0))
    chosen = occurring if len(occurring) <= HEAT_MAP_CLASSES else np.sort(
        occurring[np.argsort(-gt_pixels[occurring], kind="stable")[:HEAT_MAP_CLASSES]])
    title = "Confusion matrix (share of each ground-truth class's pixels)"
    if len(chosen) < len(occurring):
        title += f": the {len(chosen)} of {len(occurring)} classes with the most ground-truth pixels"
    names = [_short(_name(labels, int(c))) for c in chosen]
    return chart(title, heat_map(shares[np.ix_(chosen, chosen)], names, "predicted", "ground truth"))


def _pair(row: dict, read_photo: ThumbnailReader, read_mask: Callable[[dict], bytes],
          read_target: Callable[[dict], np.ndarray | None], labels: list[str]) -> dict:
    """Prediction and ground truth over the same photo, one legend for the classes of both."""
    from mv2batch.tasks.masks import decode_png

    mask = decode_png(read_mask(row))
    photo = read_photo(row, size=(mask.shape[1], mask.shape[0]))
    target = read_target(row)
    classes = set(int(c) for c in row["classes"])
    pair = [{"title": "prediction", "src": overlay_src(photo, mask)}]
    if target is not None and target.shape == mask.shape:
        classes |= set(int(c) for c in np.unique(target))
        pair.append({"title": "ground truth", "src": overlay_src(photo, target)})
    else:
        pair.append({"title": "ground truth not readable here", "src": None})
    return {"id": row["id"], "lines": [f"image mIoU {row['miou']:.3f}"], "pair": pair,
            "legend": legend(sorted(classes), labels, void=255)}


def _name(labels: list[str], class_id: int) -> str:
    return labels[class_id] if class_id < len(labels) else str(class_id)


def _short(name: str) -> str:
    first = name.split(",")[0].strip()
    return first if len(first) <= NAME_CHARS else first[: NAME_CHARS - 1] + "…"
