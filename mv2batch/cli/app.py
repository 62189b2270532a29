"""The command line: one thin Typer function per command; each builds a RunConfig, shows progress and turns
errors into exit codes. The options are defined once, in cli_options."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mv2batch.cli import options as o
from mv2batch.cli.embed import dedup_command, embed_app
from mv2batch.cli.options import STRICT_EXIT
from mv2batch.cli.run_command import INTERRUPTED_EXIT
from mv2batch.cli.run_command import fail as _fail
from mv2batch.cli.run_command import run_command as _run
from mv2batch.config import Decode, Dtype, EmbeddingDtype, Engine
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
__all__ = ["app", "main", "STRICT_EXIT", "INTERRUPTED_EXIT"]


@classify_app.command("folder", epilog="Example: mv2batch classify folder photos/ -o out/ --top-k 5")
def classify_folder(
    input: o.FolderArg, *,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    top_k: o.TopK = 5,
    embeddings: o.Embeddings = False, embedding_dtype: o.EmbeddingDtypeOption = EmbeddingDtype.fp32,
    normalize: o.Normalize = False,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """Classify every image under DIR."""
    _run("classify", "folder", locals())


@classify_app.command("dataset", epilog="Example: mv2batch classify dataset ./my_saved_dataset -o out/ --split test")
def classify_dataset(
    input: o.DatasetArg, *,
    split: o.Split = None, streaming: o.Streaming = False, image_column: o.ImageColumn = None,
    label_column: o.LabelColumn = None, id_column: o.IdColumn = None,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    top_k: o.TopK = 5,
    embeddings: o.Embeddings = False, embedding_dtype: o.EmbeddingDtypeOption = EmbeddingDtype.fp32,
    normalize: o.Normalize = False,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """Classify every image of a Hugging Face dataset."""
    _run("classify", "dataset", locals())

@classify_app.command("webdataset",
                      epilog="Example: mv2batch classify webdataset 'shards/data-{00000..00099}.tar' -o out/")
def classify_webdataset(
    input: o.ShardsArg, *,
    image_ext: o.ImageExt = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    top_k: o.TopK = 5,
    embeddings: o.Embeddings = False, embedding_dtype: o.EmbeddingDtypeOption = EmbeddingDtype.fp32,
    normalize: o.Normalize = False,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, resume: o.Resume = False, overwrite: o.Overwrite = False, retry_errors: o.RetryErrors = False,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """Classify every sample of WebDataset tar shards, streamed (one output shard per tar; labels from cls)."""
    _run("classify", "webdataset", locals())


@segment_app.command("folder", epilog="Example: mv2batch segment folder photos/ -o out/ --masks-dir masks/")
def segment_folder(
    input: o.FolderArg, *,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    masks_dir: o.MasksDir = None, overlays_dir: o.OverlaysDir = None,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """Segment every image under DIR (masks at the original size)."""
    _run("segment", "folder", locals())


@segment_app.command("dataset",
                     epilog="Example: mv2batch segment dataset ./my_saved_dataset -o out/ --split validation")
def segment_dataset(
    input: o.DatasetArg, *,
    split: o.Split = None, streaming: o.Streaming = False, image_column: o.ImageColumn = None,
    label_column: o.LabelColumn = None, id_column: o.IdColumn = None,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    masks_dir: o.MasksDir = None, overlays_dir: o.OverlaysDir = None,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """Segment every image of a Hugging Face dataset."""
    _run("segment", "dataset", locals())

@segment_app.command("webdataset", epilog="Example: mv2batch segment webdataset shards/ -o out/ --masks-dir masks/")
def segment_webdataset(
    input: o.ShardsArg, *,
    image_ext: o.ImageExt = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, resume: o.Resume = False, overwrite: o.Overwrite = False, retry_errors: o.RetryErrors = False,
    masks_dir: o.MasksDir = None, overlays_dir: o.OverlaysDir = None,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """Segment every sample of WebDataset tar shards, streamed (one output shard per tar)."""
    _run("segment", "webdataset", locals())


@eval_app.command("imagenet-val",
                  epilog="Example: mv2batch eval imagenet-val /data/imagenet/val -o out/ --preprocess paper")
def eval_imagenet(
    input: o.ImagenetArg, *,
    labels_file: o.LabelsFile = None, real_labels: o.RealLabels = None, image_ext: o.ImageExt = None,
    split: o.Split = None, streaming: o.Streaming = False, image_column: o.ImageColumn = None,
    label_column: o.LabelColumn = None, id_column: o.IdColumn = None,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    embeddings: o.Embeddings = False, embedding_dtype: o.EmbeddingDtypeOption = EmbeddingDtype.fp32,
    normalize: o.Normalize = False,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """ImageNet-1k top-1 / top-5, per class (and ReaL top-1 with --real-labels)."""
    _run("classify", "imagenet", locals())


@eval_app.command("voc", epilog="Example: mv2batch eval voc /data/VOCdevkit -o out/")
def eval_voc(
    input: o.VocArg, *,
    split: o.EvalSplit = None,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """PASCAL VOC 2012 mIoU, per class (ignore index 255)."""
    _run("segment", "voc", locals())


@eval_app.command("ade20k",
                  epilog="Example: mv2batch eval ade20k /data/ADEChallengeData2016 -o out/ --model my/ade20k-model")
def eval_ade20k(
    input: o.AdeArg, *,
    split: o.EvalSplit = None,
    limit: o.Limit = None, max_pixels: o.MaxPixels = None, decode: o.DecodeOption = Decode.exact,
    model: o.Model = None, revision: o.Revision = None, dtype: o.DtypeOption = Dtype.auto,
    preprocess: o.Preprocess = None,
    device: o.Device = "auto", batch_size: o.BatchSize = None, workers: o.Workers = None,
    compile: o.Compile = False, speedups: o.Speedups = None, engine: o.EngineOption = Engine.local,
    out: o.Out, storage_options: o.StorageOptions = None, shard_size: o.ShardSize = None, resume: o.Resume = False, overwrite: o.Overwrite = False,
    retry_errors: o.RetryErrors = False,
    quiet: o.Quiet = False, strict: o.Strict = False,
) -> None:
    """ADE20k mIoU over 150 classes (label 0 ignored)."""
    _run("segment", "ade20k", locals())


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
        _fail(str(exc), exc.exit_code)


@export_app.command("coco", epilog="Example: mv2batch export coco out/ -o results.json")
def export_coco_command(out: Annotated[str, typer.Argument(help="A segment run's output directory (or URL).")],
                        results: Annotated[str, typer.Option("--output", "-o",
                                                             help="The results file to write (or URL).")],
                        storage_options: o.StorageOptions = None) -> None:
    """Masks as COCO results (RLE per class present per image), with the images and categories beside them."""
    from mv2batch.report.coco import export_coco
    from mv2batch.storage import parse_options

    try:
        done = export_coco(out, results, parse_options(storage_options))
    except Mv2batchError as exc:
        _fail(str(exc), exc.exit_code)
    typer.echo(f"{done.annotations} masks of {done.images} images -> {done.results} (images and categories: "
               f"{done.images_file}); {done.skipped_errors} error rows left out")


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
