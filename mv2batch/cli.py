"""The command line: a thin Typer layer that builds a RunConfig, shows progress and turns errors into exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import Dtype, Protocol
from .errors import Mv2batchError

app = typer.Typer(
    help="Run Apple's MobileViTV2 models over folders and datasets; write predictions to Parquet.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
classify_app = typer.Typer(help="Top-k ImageNet labels for every image.", no_args_is_help=True)
app.add_typer(classify_app, name="classify")

STRICT_EXIT = 6
INTERRUPTED_EXIT = 130

Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (created; resumable).")]
Model = Annotated[Optional[str], typer.Option(help="Hub id or local folder (default: apple/mobilevitv2-1.0-imagenet1k-256).")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision: branch, tag or commit.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Model precision (auto = fp32, exact).")]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: from device and cores).")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model.")]
Limit = Annotated[Optional[int], typer.Option(help="Only the first N images.")]
ShardSize = Annotated[Optional[int], typer.Option(help="Images per shard / Parquet part (default: 10000).")]
TopK = Annotated[int, typer.Option("--top-k", help="Labels kept per image.")]
Preprocess = Annotated[Protocol, typer.Option(help="hf: the checkpoint's own preprocessing; paper: Apple's recipe.")]
Resume = Annotated[bool, typer.Option("--resume", help="Require an existing run in OUT and continue it.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace whatever run OUT holds.")]
RetryErrors = Annotated[bool, typer.Option("--retry-errors", help="Run the failed rows of finished shards again.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
Strict = Annotated[bool, typer.Option("--strict", help=f"Exit with {STRICT_EXIT} when any image failed.")]
MaxPixels = Annotated[Optional[int], typer.Option(help="Refuse images larger than this many pixels (default: Pillow's limit).")]


def _run(quiet: bool, strict: bool, **options) -> None:
    from .config import RunConfig
    from .progress import run_with_progress

    options = {k: v for k, v in options.items() if v is not None}
    try:
        config = RunConfig(**options)
        report = run_with_progress(config, quiet)
    except Mv2batchError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted: committed shards are kept; run the same command again to continue", INTERRUPTED_EXIT)
    if strict and report.n_errors:
        _fail(f"{report.n_errors} image(s) failed (--strict): see rows with status = 'error'", STRICT_EXIT)


def _fail(message: str, code: int) -> None:
    typer.echo(f"mv2batch: error: {message}", err=True)
    raise typer.Exit(code)


@classify_app.command("folder")
def classify_folder(
    folder: Annotated[Path, typer.Argument(help="Folder of images, searched recursively.")],
    out: Out, model: Model = None, revision: Revision = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto,
    batch_size: BatchSize = 32, workers: Workers = None, compile: Compile = False, limit: Limit = None,
    shard_size: ShardSize = None, top_k: TopK = 5, preprocess: Preprocess = Protocol.hf, resume: Resume = False,
    overwrite: Overwrite = False, retry_errors: RetryErrors = False, max_pixels: MaxPixels = None,
    quiet: Quiet = False, strict: Strict = False,
) -> None:
    """Classify every image under FOLDER.

    Example: mv2batch classify folder photos/ -o out/ --top-k 5
    """
    _run(quiet, strict, task="classify", source="folder", input=str(folder), out=out, model=model,
         revision=revision, device=device, dtype=dtype, batch_size=batch_size, workers=workers, compile=compile,
         limit=limit, shard_size=shard_size, top_k=top_k, preprocess=preprocess, resume=resume,
         overwrite=overwrite, retry_errors=retry_errors, max_pixels=max_pixels)


@classify_app.command("dataset")
def classify_dataset(
    name: Annotated[str, typer.Argument(help="Hub id, save_to_disk folder, data folder or parquet file.")],
    out: Out,
    split: Annotated[Optional[str], typer.Option(help="Split to read (default: the only one).")] = None,
    streaming: Annotated[bool, typer.Option("--streaming", help="Stream instead of downloading whole.")] = False,
    image_column: Annotated[Optional[str], typer.Option(help="Image column (default: the datasets.Image one).")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Gold label column (default: the ClassLabel one).")] = None,
    model: Model = None, revision: Revision = None, device: Device = "auto", dtype: DtypeOpt = Dtype.auto,
    batch_size: BatchSize = 32, workers: Workers = None, compile: Compile = False, limit: Limit = None,
    shard_size: ShardSize = None, top_k: TopK = 5, preprocess: Preprocess = Protocol.hf, resume: Resume = False,
    overwrite: Overwrite = False, retry_errors: RetryErrors = False, max_pixels: MaxPixels = None,
    quiet: Quiet = False, strict: Strict = False,
) -> None:
    """Classify every image of a Hugging Face dataset.

    Example: mv2batch classify dataset ./my_saved_dataset -o out/ --split test
    """
    _run(quiet, strict, task="classify", source="dataset", input=name, out=out, split=split, streaming=streaming,
         image_column=image_column, label_column=label_column, model=model, revision=revision, device=device,
         dtype=dtype, batch_size=batch_size, workers=workers, compile=compile, limit=limit, shard_size=shard_size,
         top_k=top_k, preprocess=preprocess, resume=resume, overwrite=overwrite, retry_errors=retry_errors,
         max_pixels=max_pixels)


@app.command("report")
def report_command(out: Annotated[Path, typer.Argument(help="A run's output directory.")]) -> None:
    """Print the report of a run, rebuilt from its shard markers (and rewritten in OUT/report/ when complete).

    Example: mv2batch report out/
    """
    from .progress import print_report
    from .report import load_report

    try:
        print_report(load_report(out))
    except Mv2batchError as exc:
        _fail(str(exc), exc.exit_code)


@app.command("models")
def models_command() -> None:
    """List the known MobileViTV2 checkpoints and which are in the local hub cache.

    Example: mv2batch models
    """
    from .progress import print_models

    print_models()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mv2batch")


if __name__ == "__main__":
    sys.exit(main())
