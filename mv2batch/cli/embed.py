"""The embedding commands: `embed folder | dataset | webdataset` and `dedup OUT`, one Typer function each."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mv2batch.cli import options as o
from mv2batch.cli.run_command import fail, run_command
from mv2batch.cli.run_options import DATASET, EMBEDDING, TARS, run_options
from mv2batch.errors import Mv2batchError

embed_app = typer.Typer(
    help="Embeddings (MobileViTV2Model's pooled output) for every image, by default the ImageNet checkpoint's "
         "backbone.", no_args_is_help=True, epilog="Example: mv2batch embed folder photos/ -o out/ --normalize")


@embed_app.command("folder", epilog="Example: mv2batch embed folder photos/ -o out/ --normalize")
@run_options(outputs=EMBEDDING)
def embed_folder(input: o.FolderArg, **options: Any) -> None:
    """Embed every image under DIR."""
    run_command("embed", "folder", input, options)


@embed_app.command("dataset", epilog="Example: mv2batch embed dataset ./my_saved_dataset -o out/ --split test")
@run_options(inputs=DATASET, outputs=EMBEDDING)
def embed_dataset(input: o.DatasetArg, **options: Any) -> None:
    """Embed every image of a Hugging Face dataset or a table of image bytes."""
    run_command("embed", "dataset", input, options)


@embed_app.command("webdataset", epilog="Example: mv2batch embed webdataset 'shards/data-{00000..00099}.tar' -o out/")
@run_options(inputs=TARS, outputs=EMBEDDING, per_tar=True)
def embed_webdataset(input: o.ShardsArg, **options: Any) -> None:
    """Embed every sample of WebDataset tar shards, streamed (one output shard per tar)."""
    run_command("embed", "webdataset", input, options)


def dedup_command(
    out: Annotated[str, typer.Argument(help="A finished embed or classify --embeddings run (directory or URL).")],
    threshold: Annotated[float | None, typer.Option(
        help="Cosine similarity from which two images are near-duplicates (see the printed distribution).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours looked at per image.")] = None,
    storage_options: o.StorageOptions = None,
) -> None:
    """Group near-duplicates (and byte-identical files) of a run into OUT/report/duplicates.parquet."""
    from mv2batch.dedup.duplicates import find_duplicates, format_summary
    from mv2batch.storage import parse_options

    given = {name: value for name, value in (("threshold", threshold), ("k", k)) if value is not None}
    try:
        result = find_duplicates(out, storage_options=parse_options(storage_options), say=typer.echo, **given)
    except Mv2batchError as exc:
        fail(str(exc), exc.exit_code)
    for line in format_summary(result):
        typer.echo(line)
