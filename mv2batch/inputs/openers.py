"""Inputs: the folder, dataset or evaluation layout a configuration names, opened as a Source (a table of openers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mv2batch import storage
from mv2batch.config import RunConfig, SourceKind
from mv2batch.errors import ConfigError, InputError, ModelError

if TYPE_CHECKING:
    from mv2batch.inputs.sources import DatasetSource, FolderSource, Source
    from mv2batch.inputs.tables import StreamingSource
    from mv2batch.inputs.tars import TarShards


def _open_dataset(config: RunConfig) -> DatasetSource | StreamingSource:
    from mv2batch.inputs.tables import DatasetSpec, open_dataset
    from mv2batch.inputs.urls import UrlLimits

    spec = DatasetSpec(config.input, config.split, config.image_column, config.label_column, config.streaming,
                       id_column=config.id_column, storage_options=config.storage_options,
                       urls=UrlLimits(config.url_timeout, config.max_image_bytes))
    return open_dataset(spec)


def _open_webdataset(config: RunConfig, require_label: bool = False) -> TarShards:
    from mv2batch.inputs.tars import TarShards

    names = (config.input,) if isinstance(config.input, str) else config.input
    return TarShards.open(names, config.image_ext, require_label=require_label, options=config.storage_options,
                          max_bytes=config.max_image_bytes)


def _open_imagenet(config: RunConfig) -> Source:
    from mv2batch.inputs.eval_layouts import open_imagenet
    from mv2batch.inputs.tables import is_saved_to_disk
    from mv2batch.inputs.tars import looks_like_shards

    path = storage.location(config.input)
    local = isinstance(path, Path)
    if looks_like_shards(config.input, config.storage_options) and not (local and is_saved_to_disk(path)):
        if config.limit or config.shard_size:
            raise ConfigError("--limit and --shard-size do not apply to tar shards (one shard per tar)")
        return _open_webdataset(config, require_label=True)
    if not local or (path.is_dir() and not is_saved_to_disk(path)):
        return open_imagenet(path, config.labels_file, outputs_of(config), config.storage_options)
    source = _open_dataset(config)
    if source.label_column is None:
        raise InputError(f"{config.input} has no label column: name it with --label-column")
    return source


def outputs_of(config: RunConfig) -> list[Path | str]:
    """Folders (or prefixes) this run writes to: never read as input, should they lie under it (a mask written
    there would become an input of the next run)."""
    return [p for p in (config.out, config.masks_dir, config.overlays_dir) if p is not None]


def _open_folder(config: RunConfig) -> FolderSource:
    from mv2batch.inputs.sources import FolderSource

    return FolderSource.open(config.input, exclude=outputs_of(config), options=config.storage_options)


def _open_voc(config: RunConfig) -> FolderSource:
    from mv2batch.inputs.eval_layouts import open_voc

    return open_voc(storage.location(config.input), config.split, config.storage_options)


def _open_ade20k(config: RunConfig) -> FolderSource:
    from mv2batch.inputs.eval_layouts import open_ade20k

    return open_ade20k(storage.location(config.input), config.split, config.storage_options)


SOURCE_OPENERS = {SourceKind.folder: _open_folder, SourceKind.dataset: _open_dataset,
                  SourceKind.webdataset: _open_webdataset,
                  SourceKind.imagenet: _open_imagenet, SourceKind.voc: _open_voc, SourceKind.ade20k: _open_ade20k}


def open_source(config: RunConfig) -> Source:
    """The folder, dataset or evaluation layout named by the config."""
    return SOURCE_OPENERS[config.source](config)


def check_classes(config: RunConfig, labels: list[str], model_name: str) -> None:
    """Evaluation layouts need a model with their number of classes."""
    from mv2batch.inputs.eval_layouts import EVAL_CLASSES

    expected = EVAL_CLASSES.get(config.source.value)
    if expected is not None and len(labels) != expected:
        raise ModelError(f"{model_name} has {len(labels)} classes; evaluating on {config.source.value} needs "
                         f"a checkpoint with {expected}")
