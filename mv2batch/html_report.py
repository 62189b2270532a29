"""OUT/report/index.html: one self-contained page per run (charts as inline SVG, thumbnails as data URIs).

Nothing on the page is fetched when it is viewed: no scripts, fonts or styles from a CDN, so it opens from disk
or from a bucket's download with no network. It stays small whatever the run's size: at most GALLERY
thumbnails per gallery, the first ERRORS_SHOWN error rows, charts of at most TOP_LABELS bars.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import numpy as np

ERRORS_SHOWN = 100
GALLERY = 24  # thumbnails per gallery
TOP_LABELS = 30
THUMB_EDGE = 200  # longest side of a thumbnail, in pixels
TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"
ROW_COLUMNS = {"classify": ["id", "path", "status", "error", "topk_labels", "topk_scores"],
               "segment": ["id", "path", "status", "error", "classes", "class_pixels"]}


def build_page(report: Any, run_info: dict, rows: list[dict], read_photo: Any, read_mask: Any = None) -> str:
    """The page for a report, its run.json, its prediction rows (ROW_COLUMNS), a reader of their photos
    (path -> encoded bytes; a failure leaves that thumbnail out) and, for segmentation, of a row's mask_png
    (row -> bytes: only the gallery's masks are read, not a whole run's)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), autoescape=True)
    errors = [row for row in rows if row["status"] != "ok"]
    page = {"header": _header(report, run_info), "errors": errors[:ERRORS_SHOWN], "n_errors": len(errors),
            "metrics": {name: value for name, value in report.metrics.items() if isinstance(value, (int, float))},
            "task": report.task, "charts": [], "galleries": []}
    ok = [row for row in rows if row["status"] == "ok"]
    read_photo = Thumbnails(read_photo)
    if report.task == "classify":
        _classify_views(page, ok, read_photo)
    else:
        _segment_views(page, ok, read_photo, read_mask, run_info["model"]["labels"])
    return environment.get_template(TEMPLATE.name).render(**page)


def _header(report: Any, run_info: dict) -> list[tuple[str, str]]:
    options, versions = run_info.get("options", {}), run_info.get("versions", {})
    speed = f"{report.images_per_s:.1f}" if report.images_per_s else "-"
    return [("task", report.task), ("input", report.dataset),
            ("model", f"{run_info['model']['id']} @ {run_info['model'].get('revision') or '-'}"),
            ("protocol", str(run_info.get("preprocessing", {}).get("protocol", "-"))),
            ("dtype", str(options.get("dtype", "-"))), ("speed-ups", str(options.get("speedups", "default"))),
            ("images", str(report.n_images)), ("errors", str(report.n_errors)), ("images/s", speed),
            ("wall time", f"{report.elapsed_s:.1f} s" if report.elapsed_s else "-"),
            ("versions", ", ".join(f"{name} {value}" for name, value in versions.items()))]


def _classify_views(page: dict, ok: list[dict], read_photo: Any) -> None:
    from collections import Counter

    top1 = Counter(row["topk_labels"][0] for row in ok)
    common = top1.most_common(TOP_LABELS)
    page["charts"].append(("Top-1 labels (the 30 most frequent)",
                           _bar_chart([label for label, _ in common], [count for _, count in common], "images")))
    page["charts"].append(("Top-1 confidence", _histogram([row["topk_scores"][0] for row in ok])))
    least = sorted(ok, key=lambda row: row["topk_scores"][0])[:GALLERY]
    sample = random.Random(0).sample(ok, min(GALLERY, len(ok)))
    for title, chosen in (("Least confident", least), ("A random sample", sample)):
        page["galleries"].append((title, [_thumb(row, read_photo, [
            f"{label} {score:.2f}" for label, score in zip(row["topk_labels"][:3], row["topk_scores"][:3])])
            for row in chosen]))


def _segment_views(page: dict, ok: list[dict], read_photo: Any, read_mask: Any, labels: list[str]) -> None:
    pixels = np.zeros(len(labels), dtype=np.int64)
    for row in ok:
        np.add.at(pixels, row["classes"], row["class_pixels"])
    order = np.argsort(-pixels, kind="stable")[:TOP_LABELS]
    order = [int(i) for i in order if pixels[i] > 0]
    shares = [100 * pixels[i] / max(1, pixels.sum()) for i in order]
    page["charts"].append(("Class pixel shares (%)", _bar_chart([labels[i] for i in order], shares, "% of pixels")))
    # In the rows' own order: the masks are read part by part, each part once.
    chosen = [ok[i] for i in sorted(random.Random(0).sample(range(len(ok)), min(GALLERY, len(ok))))]
    page["galleries"].append(("Overlays", [_overlay_thumb(row, read_photo, read_mask(row), labels) for row in chosen]))


def _thumb(row: dict, read_photo: Any, lines: list[str]) -> dict:
    image = read_photo(row)
    return {"id": row["id"], "lines": lines, "src": _data_uri(image) if image is not None else None}


def _overlay_thumb(row: dict, read_photo: Any, mask_png: bytes, labels: list[str]) -> dict:
    from PIL import Image

    from .masks import decode_png, voc_palette

    mask = decode_png(mask_png)
    photo = read_photo(row, size=(mask.shape[1], mask.shape[0]))
    small = Image.fromarray(mask.astype(np.int32)).resize(_thumb_size(mask.shape[1], mask.shape[0]), Image.NEAREST)
    ids = np.asarray(small).astype(np.int64)
    palette = voc_palette(max(256, int(ids.max(initial=0)) + 1))
    colours = palette[ids].astype(np.float32)
    base = np.asarray(photo.resize(small.size), dtype=np.float32) if photo is not None else colours
    blended = Image.fromarray((0.5 * base + 0.5 * colours).astype(np.uint8))
    legend = [{"name": labels[c] if c < len(labels) else str(c), "colour": "#%02x%02x%02x" % tuple(palette[c])}
              for c in row["classes"]]
    return {"id": row["id"], "lines": [], "legend": legend, "src": _data_uri(blended)}


class Thumbnails:
    """Each row's photo read once (a photo in two galleries is one read), decoded as the run decoded it and
    shrunk; None where it cannot be had: a thumbnail is decoration, never a reason to fail the page."""

    def __init__(self, read_photo: Any):
        self.read_photo = read_photo
        self.made: dict[str, tuple | None] = {}

    def __call__(self, row: dict, size: tuple[int, int] | None = None) -> Any:
        path = row.get("path")
        if path not in self.made:
            self.made[path] = self._make(path)
        made = self.made[path]
        if made is None or (size is not None and made[0] != size):
            return None
        return made[1]

    def _make(self, path: str | None) -> tuple | None:
        from .decode import decode_image

        if not path:
            return None
        try:
            image = decode_image(self.read_photo(path)).image
        except Exception:  # noqa: BLE001  (see the class docstring)
            return None
        size = image.size
        image.thumbnail((THUMB_EDGE, THUMB_EDGE))
        return size, image


def _thumb_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, THUMB_EDGE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _svg(figure: Any) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path"}):  # text drawn as paths: no font to fetch or to lack
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE inside the HTML


def _bar_chart(names: list[str], values: list[float], unit: str) -> str:
    figure, axes = _figure(height=0.25 * max(4, len(names)) + 0.6)
    positions = np.arange(len(names))
    axes.barh(positions, values, color="#4c72b0")
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlabel(unit)
    return _svg(figure)


def _histogram(values: list[float]) -> str:
    figure, axes = _figure(height=2.6)
    axes.hist(values, bins=20, range=(0, 1), color="#4c72b0")
    axes.set_xlabel("top-1 probability")
    axes.set_ylabel("images")
    return _svg(figure)


def _figure(height: float) -> tuple[Any, Any]:
    # A Figure of its own, not pyplot: no backend is chosen or changed in the caller's process.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, height))
    return figure, figure.subplots()
