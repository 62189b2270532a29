"""The run commands' option lists, each group declared once: `run_options` appends them to a command's signature.

A run command declares only its input argument and takes the rest as **options; `run_options(...)` sets its
`__signature__` (which Typer reads) to the argument, then the shared groups in their --help order, with the
command's own groups in their slots. A new input kind or task names its groups and writes no option list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from mv2batch.cli import options as o
from mv2batch.config import Decode, Dtype, EmbeddingDtype, Engine

Command = TypeVar("Command", bound=Callable[..., Any])
Group = tuple[inspect.Parameter, ...]
REQUIRED = inspect.Parameter.empty


def group(**declared: tuple[Any, Any]) -> Group:
    """Keyword-only parameters, in the order given, from name=(Annotated option alias, default) pairs."""
    return tuple(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=alias, default=default)
                 for name, (alias, default) in declared.items())


# Every run command's options, in --help order (their panels: the rich_help_panel of each alias).
LIMIT = group(limit=(o.Limit, None))
DECODING = group(max_pixels=(o.MaxPixels, None), max_image_bytes=(o.MaxImageBytes, None),
                 decode=(o.DecodeOption, Decode.exact))
MODEL = group(model=(o.Model, None), revision=(o.Revision, None), dtype=(o.DtypeOption, Dtype.auto),
              preprocess=(o.Preprocess, None))
SPEED = group(device=(o.Device, "auto"), batch_size=(o.BatchSize, None), workers=(o.Workers, None),
              compile=(o.Compile, False), speedups=(o.Speedups, None), engine=(o.EngineOption, Engine.local))
OUT = group(out=(o.Out, REQUIRED), storage_options=(o.StorageOptions, None))
SHARD_SIZE = group(shard_size=(o.ShardSize, None))
RESUME = group(resume=(o.Resume, False), overwrite=(o.Overwrite, False), retry_errors=(o.RetryErrors, False))
REPORTING = group(quiet=(o.Quiet, False), strict=(o.Strict, False))

# The options of an input kind.
DATASET = group(split=(o.Split, None), streaming=(o.Streaming, False), image_column=(o.ImageColumn, None),
                label_column=(o.LabelColumn, None), id_column=(o.IdColumn, None), url_timeout=(o.UrlTimeout, None))
TARS = group(image_ext=(o.ImageExt, None))
IMAGENET = group(labels_file=(o.LabelsFile, None), real_labels=(o.RealLabels, None)) + TARS + DATASET
EVAL_SPLIT = group(split=(o.EvalSplit, None))

# The options of a task.
EMBEDDING = group(embedding_dtype=(o.EmbeddingDtypeOption, EmbeddingDtype.fp32), normalize=(o.Normalize, False))
EMBEDDINGS = group(embeddings=(o.Embeddings, False)) + EMBEDDING
CLASSIFY = group(top_k=(o.TopK, 5)) + EMBEDDINGS
MASKS = group(masks_dir=(o.MasksDir, None), overlays_dir=(o.OverlaysDir, None))


def run_options(*, inputs: Group = (), head: Group = (), outputs: Group = (),
                per_tar: bool = False) -> Callable[[Command], Command]:
    """Give a run command the shared options, and its own in their slots: `inputs` first, `head` (the
    classification head's) after the model options, `outputs` after the resume ones. per_tar: one output shard
    per input tar, so no --limit and no --shard-size."""
    def decorate(command: Command) -> Command:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        sized = () if per_tar else LIMIT
        shards = () if per_tar else SHARD_SIZE
        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*own, *inputs, *sized, *DECODING, *MODEL, *head, *SPEED, *OUT, *shards, *RESUME, *outputs, *REPORTING],
            return_annotation=None)
        return command
    return decorate
