"""Terminal output for the CLI (rich): the progress bar, the summary table, the models table."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

KNOWN_MODELS = [
    *(f"apple/mobilevitv2-{w}-imagenet1k-256" for w in ("0.5", "0.75", "1.0", "1.25", "1.5", "1.75", "2.0")),
    "apple/mobilevitv2-1.0-voc-deeplabv3",
]


def run_with_progress(config: Any, quiet: bool) -> Any:
    """Run the job with a progress bar (images/s, ETA) and print the summary, unless quiet."""
    from .runner import run

    if quiet:
        return run(config)
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} img/s"), TextColumn("errors {task.fields[errors]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=False)
    state: dict[str, Any] = {}

    def update(event: Any) -> None:
        if not state:  # the first event comes when images start to flow: start the clock and the bar then
            state.update(started=time.perf_counter(), task=bar.add_task(config.task.value, total=event.total,
                                                                          rate="-", errors=0))
            bar.start()
        rate = event.done / max(time.perf_counter() - state["started"], 1e-9)
        bar.update(state["task"], completed=event.done, total=event.total, rate=f"{rate:.1f}", errors=event.errors)

    try:
        report = run(config, update)
    finally:
        bar.stop()
    print_report(report, console)
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_report(report: Any, console: Console | None = None) -> None:
    """The short summary table: images, errors, images/s, metrics, where the output is."""
    console = console or Console()
    table = Table(title=f"mv2batch {report.task}", show_header=False)
    rows = [("input", report.dataset), ("model", report.model), ("images", report.n_images),
            ("errors", report.n_errors), ("images/s", f"{report.images_per_s:.1f}" if report.images_per_s else "-")]
    if report.ran_now:
        rows.append(("this run", f"{report.ran_now} images in {report.elapsed_s:.1f} s (start-up included)"))
    rows += [(name, _fmt(value)) for name, value in report.metrics.items()]
    rows.append(("shards", f"{report.shards_done}/{report.shards_total}" + ("" if report.complete else " (incomplete)")))
    rows.append(("output", str(report.out)))
    for name, value in rows:
        table.add_row(name, str(value))
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
        table.add_row(*(_fmt(row[c]) for c in columns))
    console.print(table)


def cached_models() -> dict[str, list[str]]:
    """Hub ids of MobileViTV2 checkpoints in the local cache, with their cached revisions."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet
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
        table.add_row(name, task, ", ".join(cached.get(name, [])) or "-")
    Console().print(table)
