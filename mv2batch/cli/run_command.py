"""Running a command: its values to a RunConfig, run with progress; a user's mistake as one line and an exit code."""

from __future__ import annotations

from typing import Any

import typer

from mv2batch.cli.options import STRICT_EXIT
from mv2batch.errors import Mv2batchError

INTERRUPTED_EXIT = 130


def run_command(task: str, source: str, input: str | list[str], options: dict[str, Any]) -> None:
    """Build the RunConfig from a command's input and options (None: the library's default) and run it."""
    from mv2batch.cli.progress import run_with_progress
    from mv2batch.config import RunConfig
    from mv2batch.storage import parse_options

    given = {k: v for k, v in options.items() if v is not None and k not in ("quiet", "strict")}
    quiet, strict = options.get("quiet", False), options.get("strict", False)
    try:
        given["storage_options"] = parse_options(options.get("storage_options"))
        names = [str(name) for name in input] if isinstance(input, (list, tuple)) else str(input)
        config = RunConfig(task=task, source=source, input=names, **given)
        report = run_with_progress(config, quiet)
    except Mv2batchError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted: committed shards are kept; run the same command again to continue", INTERRUPTED_EXIT)
    if strict and report.n_errors:
        fail(f"{report.n_errors} image(s) failed (--strict): see rows with status = 'error'", STRICT_EXIT)


def fail(message: str, code: int) -> None:
    typer.echo(f"mv2batch: error: {message}", err=True)
    raise typer.Exit(code)
