"""The task protocol: what the batch loop, the writer and the report ask of classify, segment and embed; and
`make_task`, the task object for a run's configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, Sequence, TypeVar

from mv2batch.inputs.eval_layouts import has_target_masks, read_real_labels
from mv2batch.tasks.classify import ClassifyTask
from mv2batch.tasks.embed import EmbeddingColumn, EmbedTask, embedding_size
from mv2batch.tasks.segment import MaskFiles, SegmentTask

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from transformers import MobileViTImageProcessorPil

    from mv2batch.config import RunConfig
    from mv2batch.inputs.sources import Record
    from mv2batch.loading.loader import Sample
    from mv2batch.loading.preprocess import Preprocessing, ResizeCrop
    from mv2batch.tasks.metrics import Counters

CountsT = TypeVar("CountsT", bound="Counters")  # a task's own metric partials (tasks.metrics)


class Task(Protocol[CountsT]):
    """One kind of run. The loop calls, in order: `batches` (how the job's indices are batched), `start` on each
    batch (device work started; the returned function reads it back), `row` per sample (its columns),
    `count` per sample (metric partials), then `prepare_columns` in the writer thread (costly encoding) and
    `summarize` for the report."""

    name: ClassVar[str]
    default_protocol: ClassVar[str]
    reorder_rows: ClassVar[bool]  # rows come back out of input order (shape-grouped batches)
    labels: list[str]
    fields: list[pa.Field]  # the task's pyarrow fields, after the common ones

    def preprocessing(self, protocol: str, processor: Callable[[], MobileViTImageProcessorPil], model: str
                      ) -> Preprocessing: ...

    def batches(self, indices: Sequence[int], read: Callable[[int], Record], resize_crop: ResizeCrop,
                size: int) -> list[list[int]]: ...

    def reading(self, photo: Callable) -> None: ...

    def start(self, model: torch.nn.Module, pixels: torch.Tensor, samples: list[Sample]
              ) -> Callable[[], list[dict]]: ...

    def row(self, sample: Sample, output: dict | None) -> dict: ...

    def new_counts(self) -> CountsT: ...

    def count(self, counts: CountsT, sample: Sample, output: dict) -> None: ...

    def counts_from_json(self, data: dict) -> CountsT: ...

    def prepare_columns(self, columns: dict[str, list]) -> None: ...

    def summarize(self, counts: CountsT) -> tuple[dict, list[dict]]: ...


TASKS = {"classify": ClassifyTask, "segment": SegmentTask, "embed": EmbedTask}


def make_task(config: RunConfig, labels: list[str], model_config: dict | None = None) -> Task:
    """The task object (ClassifyTask, SegmentTask or EmbedTask) for a run's configuration and its checkpoint's
    config.json (the embedding's length)."""
    column = EmbeddingColumn(embedding_size(model_config or {}), config.embedding_dtype.value, config.normalize)
    if config.task.value == "embed":
        return EmbedTask(labels, column)
    if config.task.value == "classify":

        real = read_real_labels(config.real_labels, config.storage_options) if config.real_labels else None
        return ClassifyTask(labels, top_k=config.top_k, real=real, embedding=column if config.embeddings else None)
    files = MaskFiles(masks_dir=config.masks_dir, overlays_dir=config.overlays_dir, num_classes=len(labels),
                      max_pixels=config.max_pixels, storage_options=config.storage_options)
    return SegmentTask(labels, files, ground_truth=has_target_masks(config.source.value))
