"""Run configuration: one frozen dataclass, validated once before any work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from PIL import Image

from mv2batch import storage
from mv2batch.errors import ConfigError

# Larger images are error rows (decompression bombs): Pillow's own bound, whatever this Pillow sets it to.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Bytes bound too: an image fetched from a URL or read from a tar member larger than this is an error row, not read
# whole into memory (a 2 GB body, a 1.5 GB member).
DEFAULT_MAX_IMAGE_BYTES = 256_000_000
# An image URL's whole fetch (connecting, headers, body) must end within this many seconds: a server that sends a
# byte every few seconds would pass any per-read timeout.
DEFAULT_URL_TIMEOUT_S = 60.0


class Task(str, Enum):
    classify = "classify"
    segment = "segment"
    embed = "embed"


class SourceKind(str, Enum):
    folder = "folder"
    dataset = "dataset"
    webdataset = "webdataset"  # tar shards, one mv2batch shard per tar
    imagenet = "imagenet"  # evaluation inputs: labelled layouts
    voc = "voc"
    ade20k = "ade20k"


class Protocol(str, Enum):
    hf = "hf"
    paper = "paper"


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class EmbeddingDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"  # half the bytes; the fp32 value rounded once


class Decode(str, Enum):
    exact = "exact"  # transformers' decode: the parity contract
    fast = "fast"  # JPEG decoded at a reduced DCT scale that still covers the resize target


class Engine(str, Enum):
    local = "local"
    ray = "ray"


# Field metadata of a RunConfig field whose value changes what a run writes. run.json's fingerprint is built
# from these fields (runinfo.fingerprint_fields); a resume that changes one of them is refused, naming it.
# Everything else (where to run, how fast, how much to say) may change between a run and its resume.
OUTPUTS = {"changes_outputs": True}
# A field added after runs were made: fingerprinted only when it differs from its default, so that an OUT written
# before it existed (whose run.json lacks it) is the same run as a default run now, and resumes.
ADDED_LATER = {"changes_outputs": True, "omitted_at_default": True}


def _outputs(default: object = None, added_later: bool = False) -> object:
    return field(default=default, metadata=ADDED_LATER if added_later else OUTPUTS)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; the CLI builds it, examples and tests may too."""

    task: Task = field(metadata=OUTPUTS)
    source: SourceKind = field(metadata=OUTPUTS)
    # Fingerprinted by content (the source's listing), not by name. Tar shards: several names (tar files,
    # brace patterns, folders, shard lists) as a tuple.
    input: str | tuple[str, ...] = field(metadata=OUTPUTS)
    out: Path | str  # a URL (s3://, gs://, ...): OUT on an object store
    model: str | None = _outputs()  # None: the task's default checkpoint
    revision: str | None = _outputs()
    device: str = "auto"
    dtype: Dtype = _outputs(Dtype.auto)
    batch_size: int | None = None  # None: policy.default_batch_size (32; more for classification on a GPU)
    workers: int | None = None  # None: chosen from the device and the cores
    compile: bool = _outputs(False)  # inductor's kernels round differently from eager ones
    # mv2batch.model.speedups's rewrites (speed.speedups_mode). None: the exact ones for fp32, whose promise is
    # transformers' own numbers, all for bf16 / fp16; True: all; False: none.
    speedups: bool | None = _outputs()
    limit: int | None = _outputs()
    shard_size: int | None = _outputs()  # None: the task's default
    top_k: int = _outputs(5)
    embeddings: bool = _outputs(False)  # classify --embeddings: the embedding column from the same pass
    embedding_dtype: EmbeddingDtype = _outputs(EmbeddingDtype.fp32)
    normalize: bool = _outputs(False)  # embeddings L2-normalised
    preprocess: Protocol | None = _outputs()  # None: the task's default (classify: hf, segment: paper)
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False
    max_pixels: int = _outputs(DEFAULT_MAX_PIXELS)  # larger images become error rows
    # Larger image URLs' bodies and tar image members become error rows, unread: a bound as --max-pixels is, so
    # it changes which rows error (deterministically) and is fingerprinted.
    max_image_bytes: int = _outputs(DEFAULT_MAX_IMAGE_BYTES, added_later=True)
    # Seconds an image URL's whole fetch may take. Not fingerprinted: it says how long to wait for a network, not
    # what a row is, so a resume (--retry-errors) may give a slow server longer.
    url_timeout: float = DEFAULT_URL_TIMEOUT_S
    decode: Decode = _outputs(Decode.exact)
    split: str | None = _outputs()
    streaming: bool = _outputs(False)
    image_column: str | None = _outputs()
    label_column: str | None = _outputs()
    id_column: str | None = _outputs()  # datasets: ids from this column instead of split/index
    image_ext: tuple[str, ...] | None = _outputs()  # tar shards: the image members' extensions, by preference
    masks_dir: Path | str | None = _outputs()  # paths, or URLs of an object store
    overlays_dir: Path | str | None = _outputs()
    labels_file: Path | str | None = _outputs()  # ImageNet flat layout: LOC_val_solution.csv or filename,label CSV
    real_labels: Path | str | None = _outputs()  # ImageNet-ReaL real.json
    engine: Engine = Engine.local  # local (torchrun / Slurm set the rank) or ray (shards as Ray tasks)
    # fsspec's options for every URL of the run (endpoint, credentials, ...): never written to run.json.
    storage_options: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))
        object.__setattr__(self, "source", SourceKind(self.source))
        object.__setattr__(self, "dtype", Dtype(self.dtype))
        object.__setattr__(self, "engine", Engine(self.engine))
        object.__setattr__(self, "decode", Decode(self.decode))
        object.__setattr__(self, "embedding_dtype", EmbeddingDtype(self.embedding_dtype))
        if self.preprocess is not None:
            object.__setattr__(self, "preprocess", Protocol(self.preprocess))
        for name in ("out", "masks_dir", "overlays_dir", "labels_file", "real_labels"):
            object.__setattr__(self, name, storage.location(getattr(self, name)))
        if not isinstance(self.input, str):
            names = tuple(str(name) for name in self.input)
            object.__setattr__(self, "input", names[0] if len(names) == 1 else names)
        if isinstance(self.image_ext, str):
            object.__setattr__(self, "image_ext", tuple(e.strip() for e in self.image_ext.split(",") if e.strip()))
        self._validate()
        self._validate_inputs()

    def _validate(self) -> None:
        positive = {"--batch-size": self.batch_size, "--top-k": self.top_k, "--max-pixels": self.max_pixels,
                    "--limit": self.limit, "--shard-size": self.shard_size, "--max-image-bytes": self.max_image_bytes}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (got {value})")
        if not self.url_timeout > 0:
            raise ConfigError(f"--url-timeout must be more than 0 seconds (got {self.url_timeout})")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more (got {self.workers})")
        if self.engine is Engine.ray and self.streaming:
            raise ConfigError("--engine ray needs a folder or a non-streaming dataset (shards are planned up front)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: choose one")
        if self.task is not Task.segment and (self.masks_dir or self.overlays_dir):
            raise ConfigError("--masks-dir and --overlays-dir apply to segmentation")
        self._validate_embeddings()
        if (self.labels_file or self.real_labels) and self.source is not SourceKind.imagenet:
            raise ConfigError("--labels and --real-labels apply to `mv2batch eval imagenet-val`")
        if self.source is SourceKind.folder and self.streaming:
            raise ConfigError("--streaming applies to datasets, not folders")
        if not DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"unknown device {self.device!r}: use auto, cpu, cuda, cuda:N or mps")

    def _validate_embeddings(self) -> None:
        if self.embeddings and self.task is not Task.classify:
            raise ConfigError("--embeddings applies to classify (embed writes them by itself)")
        embedding_options = self.normalize or self.embedding_dtype is not EmbeddingDtype.fp32
        if embedding_options and not (self.task is Task.embed or self.embeddings):
            raise ConfigError("--normalize and --embedding-dtype apply to embed and classify --embeddings")

    def _validate_inputs(self) -> None:
        if not isinstance(self.input, str) and self.source is not SourceKind.webdataset:
            raise ConfigError(f"{self.source.value} inputs take one name, not {len(self.input)}")
        if self.source is SourceKind.webdataset:
            given = {"--limit": self.limit, "--shard-size": self.shard_size, "--streaming": self.streaming or None}
            for name, value in given.items():
                if value is not None:
                    raise ConfigError(f"{name} does not apply to tar shards (one shard per tar, each read whole): "
                                      "name fewer tars instead")
        if self.image_ext and self.source not in (SourceKind.webdataset, SourceKind.imagenet):
            raise ConfigError("--image-ext applies to tar shards")
        if self.id_column and self.source not in (SourceKind.dataset, SourceKind.imagenet):
            raise ConfigError("--id-column applies to datasets and tables")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def output_fields() -> list[str]:
    """The RunConfig fields declared as changing what a run writes, in declaration order."""
    return [f.name for f in fields(RunConfig) if f.metadata.get("changes_outputs")]


def omitted_at_default(config: RunConfig) -> set[str]:
    """The fields added later (ADDED_LATER) that are at their default in this config: left out of its fingerprint."""
    return {f.name for f in fields(RunConfig)
            if f.metadata.get("omitted_at_default") and getattr(config, f.name) == f.default}
