"""OUT/report/index.html: one self-contained page per run (charts as inline SVG, thumbnails as data URIs).

Nothing on the page is fetched when it is viewed: no scripts, fonts or styles from a CDN, so it opens from disk
or from a bucket's download with no network. It stays small whatever the run's size: at most GALLERY
thumbnails per gallery, the first ERRORS_SHOWN error rows, charts of at most TOP_LABELS bars. The evaluation
views (gold labels, ground truth) are html_eval's; the charts and thumbnails html_parts'.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mv2batch.report.eval_views import (
    GALLERY,
    classify_eval_views,
    is_classify_eval,
    is_segment_eval,
    segment_eval_views,
)
from mv2batch.report.page_parts import THUMB_EDGE, bar_chart, chart, gallery, histogram, overlay_thumb, thumb

if TYPE_CHECKING:
    from PIL import Image

    from mv2batch.report.page_parts import PageReport, ThumbnailReader

ERRORS_SHOWN = 100
TOP_LABELS = 30
DUPLICATE_GROUPS = 6  # the largest groups shown, each as a gallery of at most DUPLICATES_PER_GROUP
DUPLICATES_PER_GROUP = 8
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"
# What the page reads of each row (a column a part lacks, such as an older run's miou, is left out).
ROW_COLUMNS = {"classify": ["id", "path", "status", "error", "topk_labels", "topk_scores", "topk_ids", "label"],
               "segment": ["id", "path", "status", "error", "classes", "class_pixels", "miou"],
               "embed": ["id", "path", "status", "error"]}  # embed: the header and the errors (dedup has its own)


def build_page(report: PageReport, run_info: dict, rows: list[dict], read_photo: Callable[[str], bytes],
               read_mask: Callable[[dict], bytes] | None = None,
               read_target: Callable[[dict], np.ndarray | None] | None = None, duplicates: dict | None = None) -> str:
    """The page for a report, its run.json, its prediction rows (ROW_COLUMNS, each with its `_shard` and
    `_row`), a reader of their photos (path -> encoded bytes; a failure leaves that thumbnail out) and, for
    segmentation, of a row's mask_png (row -> bytes: only the galleries' masks are read, not a whole run's) and
    of its ground truth (row -> class ids, or None; eval voc / ade20k). duplicates: duplicates.parquet's rows
    and the shards and threshold dedup read (report._duplicates), where it ran."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), autoescape=True)
    errors = [row for row in rows if row["status"] != "ok"]
    page = {"header": _header(report, run_info), "errors": errors[:ERRORS_SHOWN], "n_errors": len(errors),
            "metrics": {name: value for name, value in report.metrics.items() if isinstance(value, (int, float))},
            "task": report.task, "sections": []}
    ok = [row for row in rows if row["status"] == "ok"]
    read_photo = Thumbnails(read_photo)
    labels = run_info["model"]["labels"]
    # An evaluation's own views first: its accuracy is what the page is opened for.
    if report.task == "embed":
        pass  # vectors have nothing to chart here; `mv2batch dedup` summarises their neighbours
    elif report.task == "classify":
        if is_classify_eval(report):
            classify_eval_views(page, report, ok, read_photo, labels)
        _classify_views(page, ok, read_photo)
    else:
        if is_segment_eval(report):
            segment_eval_views(page, report, ok, read_photo, read_mask, read_target or (lambda row: None), labels)
        _segment_views(page, ok, read_photo, read_mask, labels)
    if duplicates is not None:
        _duplicate_views(page, duplicates, report.shards, read_photo)
    return environment.get_template(TEMPLATE.name).render(**page)


def _header(report: PageReport, run_info: dict) -> list[tuple[str, str]]:
    options, versions = run_info.get("options", {}), run_info.get("versions", {})
    speed = f"{report.images_per_s:.1f}" if report.images_per_s else "-"
    return [("task", report.task), ("input", report.dataset),
            ("model", f"{run_info['model']['id']} @ {run_info['model'].get('revision') or '-'}"),
            ("protocol", str(run_info.get("preprocessing", {}).get("protocol", "-"))),
            ("dtype", str(options.get("dtype", "-"))), ("speed-ups", str(options.get("speedups", "default"))),
            ("images", str(report.n_images)), ("errors", str(report.n_errors)), ("images/s", speed),
            ("wall time", f"{report.elapsed_s:.1f} s" if report.elapsed_s else "-"),
            ("versions", ", ".join(f"{name} {value}" for name, value in versions.items()))]


def _classify_views(page: dict, ok: list[dict], read_photo: ThumbnailReader) -> None:
    from collections import Counter

    top1 = Counter(row["topk_labels"][0] for row in ok)
    common = top1.most_common(TOP_LABELS)
    page["sections"].append(chart("Top-1 labels (the 30 most frequent)",
                                  bar_chart([label for label, _ in common], [count for _, count in common], "images")))
    page["sections"].append(chart("Top-1 confidence", histogram([row["topk_scores"][0] for row in ok])))
    least = sorted(ok, key=lambda row: row["topk_scores"][0])[:GALLERY]
    sample = random.Random(0).sample(ok, min(GALLERY, len(ok)))
    for title, chosen in (("Least confident", least), ("A random sample", sample)):
        page["sections"].append(gallery(title, [thumb(row, read_photo, [
            f"{label} {score:.2f}" for label, score in zip(row["topk_labels"][:3], row["topk_scores"][:3])])
            for row in chosen]))


def _segment_views(page: dict, ok: list[dict], read_photo: ThumbnailReader, read_mask: Callable[[dict], bytes],
                   labels: list[str]) -> None:
    pixels = np.zeros(len(labels), dtype=np.int64)
    for row in ok:
        np.add.at(pixels, row["classes"], row["class_pixels"])
    order = np.argsort(-pixels, kind="stable")[:TOP_LABELS]
    order = [int(i) for i in order if pixels[i] > 0]
    shares = [100 * pixels[i] / max(1, pixels.sum()) for i in order]
    page["sections"].append(chart("Class pixel shares (%)",
                                  bar_chart([labels[i] for i in order], shares, "% of pixels")))
    # In the rows' own order: the masks are read part by part, each part once.
    chosen = [ok[i] for i in sorted(random.Random(0).sample(range(len(ok)), min(GALLERY, len(ok))))]
    page["sections"].append(gallery("Overlays", [overlay_thumb(row, read_photo, read_mask(row), labels)
                                                 for row in chosen]))


def _duplicate_views(page: dict, duplicates: dict, shards: list[int], read_photo: ThumbnailReader) -> None:
    """dedup's groups: a line of figures, then the largest groups, each its own gallery (first item kept)."""
    from collections import defaultdict

    groups = defaultdict(list)
    for row in duplicates["rows"]:
        groups[row["group"]].append(row)
    largest = sorted(groups.values(), key=lambda members: (-len(members), members[0]["group"]))
    read = duplicates["shards"]
    stale = "" if read is None or sorted(read) == sorted(shards) else (
        f" (dedup read {len(read)} shards, the run has {len(shards)} now: run `mv2batch dedup` again)")
    page["sections"].append({"kind": "table", "title": "Near-duplicates" + stale,
                             "headers": ["groups", "images in groups", "largest", "threshold"],
                             "rows": [[len(groups), len(duplicates["rows"]), len(largest[0]) if largest else 0,
                                       duplicates["threshold"] if duplicates["threshold"] is not None else "-"]]})
    for members in largest[:DUPLICATE_GROUPS]:
        shown = members[:DUPLICATES_PER_GROUP]
        more = f"; the first {len(shown)}" if len(members) > len(shown) else ""
        page["sections"].append(gallery(
            f"Group {members[0]['group']}: {len(members)} images{more}",
            [thumb(row, read_photo, ["kept: the group's first" if row["duplicate_of"] is None else
                                     f"cosine {row['similarity']:.4f} to {row['duplicate_of']}"
                                     if row["similarity"] is not None else f"same group as {row['duplicate_of']}"])
             for row in shown]))


class Thumbnails:
    """Each row's photo read once (a photo in two galleries is one read), decoded as the run decoded it and
    shrunk; None where it cannot be had: a thumbnail is decoration, never a reason to fail the page."""

    def __init__(self, read_photo: Callable[[str], bytes]):
        self.read_photo = read_photo
        self.made: dict[str | None, tuple[tuple[int, int], Image.Image] | None] = {}

    def __call__(self, row: dict, size: tuple[int, int] | None = None) -> Image.Image | None:
        path = row.get("path")
        if path not in self.made:
            self.made[path] = self._make(path)
        made = self.made[path]
        if made is None or (size is not None and made[0] != size):
            return None
        return made[1]

    def _make(self, path: str | None) -> tuple[tuple[int, int], Image.Image] | None:
        from mv2batch.loading.decode import decode_image

        if not path:
            return None
        try:
            image = decode_image(self.read_photo(path)).image
        except Exception:  # noqa: BLE001  (see the class docstring)
            return None
        size = image.size
        image.thumbnail((THUMB_EDGE, THUMB_EDGE))
        return size, image
