"""The command line: one thin Typer function per command; each builds a RunConfig, shows progress and turns
errors into exit codes. The options are defined once, in options; run_options gives each run command its list."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mv2batch.cli import options as o
from mv2batch.cli.embed import dedup_command, embed_app
from mv2batch.cli.filter import filter_command
from mv2batch.cli.options import STRICT_EXIT
from mv2batch.cli.run_command import INTERRUPTED_EXIT, fail, run_command
from mv2batch.cli.run_options import CLASSIFY, DATASET, EMBEDDINGS, EVAL_SPLIT, IMAGENET, MASKS, TARS, run_options
from mv2batch.errors import Mv2batchError

app = typer.Typer(
    help="Run Apple's MobileViTV2 models over folders and datasets; write predictions to Parquet.",
    epilog="Example: mv2batch classify folder photos/ -o out/",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
classify_app = typer.Typer(help="Top-k ImageNet labels for every image.", no_args_is_help=True,
                           epilog="Example: mv2batch classify folder photos/ -o out/ --top-k 5")
segment_app = typer.Typer(help="Per-pixel class masks at each image's original size.", no_args_is_help=True,
                          epilog="Example: mv2batch segment folder photos/ -o out/")
eval_app = typer.Typer(help="Accuracy and mIoU against ground truth, exact and per class.", no_args_is_help=True,
                       epilog="Example: mv2batch eval imagenet-val /data/imagenet/val -o out/")
app.add_typer(classify_app, name="classify")
app.add_typer(segment_app, name="segment")
export_app = typer.Typer(help="A finished run's outputs in other tools' formats.", no_args_is_help=True,
                         epilog="Example: mv2batch export coco out/ -o results.json")
app.add_typer(eval_app, name="eval")
app.add_typer(export_app, name="export")

app.add_typer(embed_app, name="embed")
app.command("dedup", epilog="Example: mv2batch dedup out/ --threshold 0.95")(dedup_command)
app.command("filter", epilog='Example: mv2batch filter out/ -o kept/ --where "topk_scores[1] >= 0.8" --unique')(
    filter_command)
__all__ = ["INTERRUPTED_EXIT", "STRICT_EXIT", "app", "main"]


@classify_app.command("folder", epilog="Example: mv2batch classify folder photos/ -o out/ --top-k 5")
@run_options(head=CLASSIFY)
def classify_folder(input: o.FolderArg, **options: Any) -> None:
    """Classify every image under DIR."""
    run_command("classify", "folder", input, options)


@classify_app.command("dataset", epilog="Example: mv2batch classify dataset ./my_saved_dataset -o out/ --split test")
@run_options(inputs=DATASET, head=CLASSIFY)
def classify_dataset(input: o.DatasetArg, **options: Any) -> None:
    """Classify every image of a Hugging Face dataset."""
    run_command("classify", "dataset", input, options)


@classify_app.command("webdataset",
                      epilog="Example: mv2batch classify webdataset 'shards/data-{00000..00099}.tar' -o out/")
@run_options(inputs=TARS, head=CLASSIFY, per_tar=True)
def classify_webdataset(input: o.ShardsArg, **options: Any) -> None:
    """Classify every sample of WebDataset tar shards, streamed (one output shard per tar; labels from cls)."""
    run_command("classify", "webdataset", input, options)


@segment_app.command("folder", epilog="Example: mv2batch segment folder photos/ -o out/ --masks-dir masks/")
@run_options(outputs=MASKS)
def segment_folder(input: o.FolderArg, **options: Any) -> None:
    """Segment every image under DIR (masks at the original size)."""
    run_command("segment", "folder", input, options)


@segment_app.command("dataset",
                     epilog="Example: mv2batch segment dataset ./my_saved_dataset -o out/ --split validation")
@run_options(inputs=DATASET, outputs=MASKS)
def segment_dataset(input: o.DatasetArg, **options: Any) -> None:
    """Segment every image of a Hugging Face dataset."""
    run_command("segment", "dataset", input, options)


@segment_app.command("webdataset", epilog="Example: mv2batch segment webdataset shards/ -o out/ --masks-dir masks/")
@run_options(inputs=TARS, outputs=MASKS, per_tar=True)
def segment_webdataset(input: o.ShardsArg, **options: Any) -> None:
    """Segment every sample of WebDataset tar shards, streamed (one output shard per tar)."""
    run_command("segment", "webdataset", input, options)


@eval_app.command("imagenet-val",
                  epilog="Example: mv2batch eval imagenet-val /data/imagenet/val -o out/ --preprocess paper")
@run_options(inputs=IMAGENET, head=EMBEDDINGS)
def eval_imagenet(input: o.ImagenetArg, **options: Any) -> None:
    """ImageNet-1k top-1 / top-5, per class (and ReaL top-1 with --real-labels)."""
    run_command("classify", "imagenet", input, options)


@eval_app.command("voc", epilog="Example: mv2batch eval voc /data/VOCdevkit -o out/")
@run_options(inputs=EVAL_SPLIT)
def eval_voc(input: o.VocArg, **options: Any) -> None:
    """PASCAL VOC 2012 mIoU, per class (ignore index 255)."""
    run_command("segment", "voc", input, options)


@eval_app.command("ade20k",
                  epilog="Example: mv2batch eval ade20k /data/ADEChallengeData2016 -o out/ --model my/ade20k-model")
@run_options(inputs=EVAL_SPLIT)
def eval_ade20k(input: o.AdeArg, **options: Any) -> None:
    """ADE20k mIoU over 150 classes (label 0 ignored)."""
    run_command("segment", "ade20k", input, options)


@app.command("report", epilog="Example: mv2batch report out/")
def report_command(out: Annotated[str, typer.Argument(help="A run's output directory (or URL).")],
                   storage_options: o.StorageOptions = None) -> None:
    """Print the report of a run, rebuilt from its shard markers (and rewritten in OUT/report/ when complete)."""
    from mv2batch.cli.progress import print_report
    from mv2batch.report.tables import load_report
    from mv2batch.storage import parse_options

    try:
        print_report(load_report(out, parse_options(storage_options)))
    except Mv2batchError as exc:
        fail(str(exc), exc.exit_code)


@export_app.command("coco", epilog="Example: mv2batch export coco out/ -o results.json")
def export_coco_command(out: Annotated[str, typer.Argument(help="A segment run's output directory (or URL).")],
                        results: Annotated[str, typer.Option("--output", "-o",
                                                             help="The results file to write (or URL).")],
                        storage_options: o.StorageOptions = None, allow_incomplete: o.AllowIncomplete = False) -> None:
    """Masks as COCO results (RLE per class present per image), with the images and categories beside them."""
    from mv2batch.report.coco import export_coco
    from mv2batch.storage import parse_options

    try:
        done = export_coco(out, results, parse_options(storage_options), allow_incomplete=allow_incomplete)
    except Mv2batchError as exc:
        fail(str(exc), exc.exit_code)
    unfinished = "" if done.complete else f" (run incomplete: {done.shards_done} of {done.shards_total or '?'} shards)"
    typer.echo(f"{done.annotations} masks of {done.images} images -> {done.results} (images and categories: "
               f"{done.images_file}); {done.skipped_errors} error rows left out{unfinished}")


@app.command("models", epilog="Example: mv2batch models")
def models_command() -> None:
    """List the known MobileViTV2 checkpoints and which are in the local hub cache."""
    from mv2batch.cli.progress import print_models

    print_models()


def main() -> None:
    """Console-script entry point."""
    import logging

    from mv2batch.cli.progress import log_handler

    logger = logging.getLogger("mv2batch")
    logger.setLevel(logging.INFO)  # notes too (embed's dropped head); --quiet: warnings only
    logger.addHandler(log_handler())
    logger.propagate = False
    app(prog_name="mv2batch")


if __name__ == "__main__":
    sys.exit(main())
