"""The report page's pieces: matplotlib charts as inline SVG, thumbnails and mask overlays as data-URI JPEGs.

Shared by html_report (every run's views) and html_eval (the evaluation views); neither imports the other's views.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

THUMB_EDGE = 200  # longest side of a thumbnail, in pixels
BAR_COLOUR = "#4c72b0"


class PageReport(Protocol):
    """What the page reads of a run's report (report.tables.Report, which imports the page: not named here)."""

    task: str
    dataset: str
    n_images: int
    n_errors: int
    images_per_s: float | None
    elapsed_s: float
    metrics: dict[str, Any]  # JSON values: numbers, and the names or counts some tasks add
    per_class: list[dict]
    confusion: list[dict]
    shards: list[int]


class ThumbnailReader(Protocol):
    """A row's photo as a thumbnail (page.Thumbnails); None where it cannot be had, or is not of the size asked."""

    def __call__(self, row: dict, size: tuple[int, int] | None = None) -> Image.Image | None: ...


def chart(title: str, svg_text: str) -> dict:
    """A section of the page (the template shows sections in order): a chart."""
    return {"kind": "chart", "title": title, "svg": svg_text}


def table(title: str, headers: list[str], rows: list[list]) -> dict:
    return {"kind": "table", "title": title, "headers": headers, "rows": rows}


def gallery(title: str, items: list[dict]) -> dict:
    return {"kind": "gallery", "title": title, "thumbs": items}


def thumb(row: dict, read_photo: ThumbnailReader, lines: list[str]) -> dict:
    """A gallery item: the row's photo (None where it cannot be read) and its caption lines."""
    image = read_photo(row)
    return {"id": row["id"], "lines": lines, "src": data_uri(image) if image is not None else None}


def overlay_src(photo: Image.Image | None, mask: np.ndarray) -> str:
    """A thumbnail of the photo (or the colours alone) blended with a mask of class ids, at thumbnail size."""
    from PIL import Image

    from mv2batch.tasks.masks import blend

    small = Image.fromarray(mask.astype(np.int32)).resize(thumb_size(mask.shape[1], mask.shape[0]), Image.NEAREST)
    ids = np.asarray(small)
    return data_uri(blend(photo.resize(small.size) if photo is not None else None, ids))


def legend(classes: list[int], labels: list[str], void: int | None = None) -> list[dict]:
    """Swatches for the classes shown, in the overlay's colours (void, 255 in the ground truth, left out)."""
    from mv2batch.tasks.masks import voc_palette

    palette = voc_palette(max(256, max(classes, default=0) + 1))
    return [{"name": labels[c] if c < len(labels) else str(c), "colour": "#%02x%02x%02x" % tuple(palette[c])}
            for c in classes if c != void]


def overlay_thumb(row: dict, read_photo: ThumbnailReader, mask_png: bytes, labels: list[str]) -> dict:
    """A segment row's gallery item: its mask over its photo, with the legend of the classes present."""
    from mv2batch.tasks.masks import decode_png

    mask = decode_png(mask_png)
    photo = read_photo(row, size=(mask.shape[1], mask.shape[0]))
    return {"id": row["id"], "lines": [], "legend": legend(list(row["classes"]), labels),
            "src": overlay_src(photo, mask)}


def thumb_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, THUMB_EDGE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def svg(figure: Figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path"}):  # text drawn as paths: no font to fetch or to lack
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or DOCTYPE inside the HTML


def bar_chart(names: list[str], values: list[float], unit: str, limit: float | None = None) -> str:
    """Horizontal bars, the first name on top; limit: the axis' end (1 for accuracies), else matplotlib's."""
    figure, axes = new_figure(height=0.25 * max(4, len(names)) + 0.6)
    positions = np.arange(len(names))
    axes.barh(positions, values, color=BAR_COLOUR)
    axes.set_yticks(positions, names)
    axes.invert_yaxis()
    axes.set_xlabel(unit)
    if limit is not None:
        axes.set_xlim(0, limit)
    return svg(figure)


def bar_chart_pair(left: tuple[str, list[str], list[float]], right: tuple[str, list[str], list[float]], unit: str,
                   limit: float | None = None) -> str:
    """Two bar charts side by side in one figure, each (title, names, values): the worst and the best."""
    rows = max(len(left[1]), len(right[1]))
    figure, (first, second) = new_figure(height=0.25 * max(4, rows) + 0.9, width=11, columns=2)
    for axes, (title, names, values) in ((first, left), (second, right)):
        positions = np.arange(len(names))
        axes.barh(positions, values, color=BAR_COLOUR)
        axes.set_yticks(positions, names)
        axes.set_ylim(rows - 0.5, -0.5)  # the first name on top, both panels on one scale of rows
        axes.set_xlabel(unit)
        axes.set_title(title, fontsize=10)
        if limit is not None:
            axes.set_xlim(0, limit)
    figure.subplots_adjust(wspace=0.6)
    return svg(figure)


def histogram(values: list[float]) -> str:
    figure, axes = new_figure(height=2.6)
    axes.hist(values, bins=20, range=(0, 1), color=BAR_COLOUR)
    axes.set_xlabel("top-1 probability")
    axes.set_ylabel("images")
    return svg(figure)


def heat_map(matrix: np.ndarray, names: list[str], xlabel: str, ylabel: str) -> str:
    """A square matrix of shares (0..1) with every row and column named, a colour bar beside it."""
    size = max(4.0, 0.28 * len(names) + 1.5)
    figure, axes = new_figure(height=size, width=size + 1.2)
    image = axes.imshow(matrix, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, names, fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return svg(figure)


def new_figure(height: float, width: float = 7, columns: int = 1) -> tuple[Figure, Any]:
    # The second: an Axes, or an array of them for columns > 1 (matplotlib's subplots leaves it untyped).
    # A Figure of its own, not pyplot: no backend is chosen or changed in the caller's process.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots(1, columns)
