"""The run's description: what run.json records, the fingerprint fields, the Parquet key-value metadata."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mv2batch.config import RunConfig, omitted_at_default, output_fields
from mv2batch.inputs.sources import is_sharded
from mv2batch.loading.preprocess import Preprocessing
from mv2batch.model.speedups import speedups_mode
from mv2batch.out.rundir import fingerprint_of
from mv2batch.runner.shard_plan import DEFAULT_SHARD_SIZE, ShardPlan

if TYPE_CHECKING:
    import torch

    from mv2batch.inputs.sources import Source
    from mv2batch.model.checkpoints import ResolvedModel


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("mv2batch", "torch", "transformers", "pillow", "pyarrow", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def shard_size(config: RunConfig) -> int:
    """--shard-size, or the task's default."""
    return config.shard_size or DEFAULT_SHARD_SIZE[config.task.value]


def _n_items(config: RunConfig, source: Source) -> int | None:
    if source.streamed or is_sharded(source):
        return None  # unknown until read
    return min(len(source), config.limit) if config.limit else len(source)


def _file_digest(path: Path | str | None, options: dict | None) -> str | None:
    import hashlib

    from mv2batch import storage

    if path is None or not storage.is_file(path, options):
        return None
    return hashlib.sha256(storage.read_bytes(path, options)).hexdigest()[:16]


def _folder(path: Path | str | None) -> str | None:
    return str(path.expanduser().resolve()) if isinstance(path, Path) else path


def _plain(value: Any) -> Any:  # a config field's value, any type
    """A config value as JSON writes it: enums by value, paths as text."""
    return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value


def fingerprint_fields(config: RunConfig, source: Source, resolved: ResolvedModel, preprocessing: Preprocessing,
                       dtype: torch.dtype) -> dict[str, Any]:  # JSON values
    """Every RunConfig field declared as changing outputs (config.output_fields), by the value it resolves to:
    the input by its content, the model by its resolved id and revision, defaults by what they chose."""
    resolved_values = {
        "input": lambda: source.fingerprint(), "model": lambda: resolved.model_id,
        "revision": lambda: resolved.revision, "preprocess": preprocessing.describe,
        "dtype": lambda: str(dtype).replace("torch.", ""), "speedups": lambda: speedups_mode(config.speedups, dtype),
        "shard_size": lambda: None if is_sharded(source) else shard_size(config),
        "labels_file": lambda: _file_digest(config.labels_file, config.storage_options),
        "real_labels": lambda: _file_digest(config.real_labels, config.storage_options),
        "masks_dir": lambda: _folder(config.masks_dir),
        "overlays_dir": lambda: _folder(config.overlays_dir),
    }
    left_out = omitted_at_default(config)
    return {name: resolved_values[name]() if name in resolved_values else _plain(getattr(config, name))
            for name in output_fields() if name not in left_out}


def describe_run(config: RunConfig, source: Source, resolved: ResolvedModel, preprocessing: Preprocessing,
                 dtype: torch.dtype, labels: list[str]) -> dict:
    """run.json's content; `fingerprint` hashes the fields that change outputs."""
    n_items = _n_items(config, source)
    fields = fingerprint_fields(config, source, resolved, preprocessing, dtype)
    plan = ShardPlan(n_items, shard_size(config)).describe() if n_items is not None else {
        "n_items": None, "shard_size": shard_size(config), "n_shards": None}
    if is_sharded(source):  # one shard per input shard; their lengths are known once read
        plan = {"n_items": None, "shard_size": None, "n_shards": len(source.shards), "per_input_shard": True}
    return {
        "task": config.task.value,
        "fingerprint": fingerprint_of(fields),
        "fingerprint_fields": fields,
        "input": {"kind": config.source.value, "name": config.input, "description": source.description,
                  "split": getattr(source, "split", None), "shards": getattr(source, "shards", None),
                  "skipped_files": getattr(source, "skipped_files", 0),
                  "skipped": getattr(source, "skipped", {})},
        "model": {"id": resolved.model_id, "revision": resolved.revision, "origin": resolved.origin,
                  "labels": labels},
        "preprocessing": preprocessing.describe(),
        "options": {"batch_size": config.batch_size, "device": config.device, "dtype": config.dtype.value,
                    "workers": config.workers, "labels_file": config.labels_file, "real_labels": config.real_labels,
                    "compile": config.compile, "top_k": config.top_k, "max_pixels": config.max_pixels,
                    "masks_dir": config.masks_dir, "overlays_dir": config.overlays_dir,
                    "max_image_bytes": config.max_image_bytes, "url_timeout": config.url_timeout},
        "plan": plan,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parquet_metadata(run_info: dict) -> dict:
    """The run's identity, repeated in every Parquet part's key-value metadata."""
    return {"mv2batch.model": run_info["model"]["id"], "mv2batch.revision": run_info["model"]["revision"],
            "mv2batch.preprocessing": run_info["preprocessing"], "mv2batch.versions": run_info["versions"],
            "mv2batch.task": run_info["task"], "mv2batch.fingerprint": run_info["fingerprint"]}
