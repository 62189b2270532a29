"""`mv2batch filter OUT -o DEST`: one Typer function over the library's filter_run, with progress and a summary."""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Callable

import typer

from mv2batch.cli import options as o
from mv2batch.cli.run_command import INTERRUPTED_EXIT, fail
from mv2batch.errors import Mv2batchError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from mv2batch.filter.work import FilterProgress


class Link(str, Enum):
    copy = "copy"
    hard = "hard"
    symlink = "symlink"


def filter_command(
    out: Annotated[str, typer.Argument(help="A finished run of any task (directory or URL).")],
    dest: Annotated[str, typer.Option("--output", "-o", metavar="DEST",
                                      help="A new folder or object-store URL for the kept items.")],
    where: Annotated[str | None, typer.Option(
        help="SQL boolean over the run's predictions as DuckDB reads them, e.g. \"topk_scores[1] >= 0.8\" "
             "(default: status = 'ok'; error rows only where it names status or error).", metavar="SQL")] = None,
    unique: Annotated[bool, typer.Option(
        "--unique", help="Keep only the first item of each group of `mv2batch dedup OUT`.")] = False,
    link: Annotated[Link, typer.Option(
        "--link", help="copy, or hard / symbolic links (a local folder input and a local DEST).")] = Link.copy,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace whatever DEST holds.")] = False,
    threads: Annotated[int | None, typer.Option(
        help="Files written at once (default: 16 with an object store, else 4).")] = None,
    storage_options: o.StorageOptions = None,
    quiet: o.Quiet = False,
) -> None:
    """Write a run's kept items (by a SQL predicate, one per duplicate group) in the input's own format to DEST,
    byte for byte, with their predictions in DEST/_mv2batch/predictions.parquet."""
    from mv2batch.filter.pipeline import filter_run, format_summary
    from mv2batch.storage import parse_options

    shown = _Progress(quiet)
    try:
        result = filter_run(out, dest, where=where, unique=unique, link=link.value, overwrite=overwrite,
                            storage_options=parse_options(storage_options), threads=threads, progress=shown.update)
    except Mv2batchError as exc:
        shown.stop()
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        shown.stop()
        fail("interrupted: the items in place are kept; run the same command again to finish", INTERRUPTED_EXIT)
    shown.stop()
    if not quiet:
        for line in format_summary(result):
            typer.echo(line)


class _Progress:
    """A bar on a terminal; a line every MV2BATCH_LOG_INTERVAL seconds (5) in a log; nothing with --quiet."""

    def __init__(self, quiet: bool):
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.interval = float(os.environ.get("MV2BATCH_LOG_INTERVAL", "5"))
        self.said = time.monotonic()
        self.update: Callable[[FilterProgress], None] = (lambda snapshot: None) if quiet else self._show

    def _show(self, snapshot: FilterProgress) -> None:
        if sys.stderr.isatty():
            self._bar(snapshot)
        elif time.monotonic() - self.said >= self.interval:
            self.said = time.monotonic()
            typer.echo(f"filter: {snapshot.judged:,} / {snapshot.rows:,} rows judged, {snapshot.kept:,} kept, "
                       f"{snapshot.placed:,} in place", err=True)

    def _bar(self, snapshot: FilterProgress) -> None:
        from rich.progress import Progress

        if self.bar is None:
            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("filter", total=snapshot.rows)
        self.bar.update(self.task, completed=snapshot.judged,
                        description=f"filter: {snapshot.kept:,} kept, {snapshot.placed:,} in place")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
