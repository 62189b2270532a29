"""Terminal output for the CLI (rich): the progress bar, the summary table, the models table."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import logging

    from mv2batch.config import RunConfig
    from mv2batch.report.tables import Report
    from mv2batch.runner.batch_loop import ProgressUpdate

KNOWN_MODELS = [
    *(f"apple/mobilevitv2-{w}-imagenet1k-256" for w in ("0.5", "0.75", "1.0", "1.25", "1.5", "1.75", "2.0")),
    "apple/mobilevitv2-1.0-voc-deeplabv3",
]


# Seconds between two progress lines where stderr is not a terminal (a Slurm or CI log); MV2BATCH_LOG_INTERVAL
# sets another.
LOG_INTERVAL_S = 5.0


def run_with_progress(config: RunConfig, quiet: bool, console: Console | None = None) -> Report:
    """Run the job and print the summary, unless quiet: a live bar (images/s, ETA) on a terminal, else a progress
    line every LOG_INTERVAL_S seconds."""
    from mv2batch.engines import run

    if quiet:
        silence_libraries()
        return run(config)
    console = console or Console(stderr=True)
    shown = _Bar(console, config.task.value) if console.is_terminal else LogLines(console, config.task.value)
    try:
        report = run(config, shown.update)
    finally:
        shown.stop()
    print_report(report, console)
    return report


QUIET_ENVIRONMENT = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def log_handler() -> logging.Handler:
    """The CLI's handler of mv2batch's log: one line each on stderr, beside the bar and the error lines."""
    import logging

    class OneLine(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            kind = "warning" if record.levelno >= logging.WARNING else "note"
            return f"mv2batch: {kind}: {record.getMessage()}"

    handler = logging.StreamHandler()
    handler.setFormatter(OneLine())
    return handler


def silence_libraries() -> None:
    """--quiet: no progress bars or info lines from datasets or huggingface_hub either (their own switches; the
    environment for what is imported later, the functions for what is loaded already), warnings only."""
    import logging
    import os
    import sys

    os.environ.update(QUIET_ENVIRONMENT)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for name in ("datasets", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("mv2batch").setLevel(logging.WARNING)


class _Bar:
    """rich's live progress bar; the clock starts with the first update, when images start to flow."""

    def __init__(self, console: Console, name: str):
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} img/s"), TextColumn("errors {task.fields[errors]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.bar, self.name = Progress(*columns, console=console, transient=False), name
        self.started: float | None = None

    def update(self, event: ProgressUpdate) -> None:
        if self.started is None:
            self.started = time.perf_counter()
            self.task = self.bar.add_task(self.name, total=event.total, rate="-", errors=0)
            self.bar.start()
        rate = event.done / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, completed=event.done, total=event.total, rate=f"{rate:.1f}", errors=event.errors)

    def stop(self) -> None:
        self.bar.stop()


class LogLines:
    """Plain progress lines for a log: done / total, images/s, errors, ETA, at most one per interval (and a last
    one at the end), each on its own line so that a log keeps them all."""

    def __init__(self, console: Console, name: str, interval: float | None = None):
        self.console, self.name = console, name
        self.interval = interval if interval is not None else float(os.environ.get("MV2BATCH_LOG_INTERVAL",
                                                                                    LOG_INTERVAL_S))
        self.started: float | None = None
        self.printed = 0.0
        self.last: ProgressUpdate | None = None

    def update(self, event: ProgressUpdate) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = self.printed = now
        self.last = event
        if now - self.printed >= self.interval:
            self._print(now)

    def stop(self) -> None:
        if self.last is not None and self.last.done:
            self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        event, elapsed = self.last, max(now - self.started, 1e-9)
        rate = event.done / elapsed
        total = f"/{event.total}" if event.total is not None else ""
        eta = ""
        if event.total and rate > 0:
            eta = f", ETA {_duration((event.total - event.done) / rate)}"
        self.console.print(f"mv2batch: {self.name} {event.done}{total} images, {rate:.1f} img/s, "
                           f"{event.errors} errors, {_duration(elapsed)} elapsed{eta}", highlight=False,
                           soft_wrap=True)
        self.printed = now


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(float(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_report(report: Report, console: Console | None = None) -> None:
    """The short summary table: images, errors, images/s, metrics, where the output is."""
    console = console or Console()
    table = Table(title=f"mv2batch {report.task}", show_header=False)
    rows = [("input", report.dataset), ("model", report.model), ("images", report.n_images),
            ("errors", report.n_errors), ("images/s", f"{report.images_per_s:.1f}" if report.images_per_s else "-")]
    if report.ran_now:
        rows.append(("this run", f"{report.ran_now} images in {report.elapsed_s:.1f} s (start-up included)"))
    rows += [(name, _fmt(value)) for name, value in report.metrics.items()]
    incomplete = "" if report.complete else " (incomplete)"
    rows.append(("shards", f"{report.shards_done}/{report.shards_total}{incomplete}"))
    rows.append(("output", str(report.out)))
    for name, value in rows:
        table.add_row(name, Text(str(value)))  # a path or label is never rich markup
    console.print(table)
    if report.per_class and "top1_acc" in report.per_class[0]:
        worst = sorted(report.per_class, key=lambda r: (r["top1_acc"], r["class_id"]))
        _print_classes("worst classes (top-1)", worst, ("class_id", "class_name", "support", "top1_acc", "top5_acc"),
                       console)
    elif report.per_class and "iou" in report.per_class[0]:
        scored = [r for r in report.per_class if r["iou"] is not None]
        _print_classes("worst classes (IoU)", sorted(scored, key=lambda r: (r["iou"], r["class_id"])),
                       ("class_id", "class_name", "iou", "acc", "gt_pixels", "pred_pixels"), console)
    elif report.per_class:
        _print_classes("classes found most often", report.per_class,
                       ("class_id", "class_name", "images", "pred_pixels"), console)


def _print_classes(title: str, rows: list[dict], columns: tuple[str, ...], console: Console, count: int = 10) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows[:count]:
        table.add_row(*(Text(_fmt(row[c])) for c in columns))  # class names as they are, not markup
    console.print(table)


def cached_models() -> dict[str, list[str]]:
    """Hub ids of MobileViTV2 checkpoints in the local cache, with their cached revisions."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except (CacheNotFound, OSError, ValueError):  # no cache yet (or not a readable folder)
        return {}
    return {repo.repo_id: sorted(r.commit_hash[:10] for r in repo.revisions)
            for repo in info.repos if repo.repo_type == "model" and "mobilevitv2" in repo.repo_id.lower()}


def print_models() -> None:
    """Known checkpoints, and every MobileViTV2 checkpoint in the cache."""
    cached = cached_models()
    table = Table(title="MobileViTV2 checkpoints")
    for column in ("model", "task", "cached revisions"):
        table.add_column(column)
    for name in sorted(set(KNOWN_MODELS) | set(cached)):
        task = "segment" if "deeplab" in name else "classify"
        table.add_row(Text(name), task, ", ".join(cached.get(name, [])) or "-")
    Console().print(table)
