"""Embeddings: MobileViTV2Model's pooled output as a Parquet column, for `embed` and `classify --embeddings`.

The column holds transformers' `MobileViTV2Model(...).pooler_output` (the mean of the last feature map, 512
floats at width 1.0): the vector the classification head reads, so `classify --embeddings` gives both from one
pass. `--normalize` L2-normalises it and `--embedding-dtype fp16` halves it, both on the device in float32
first, so an fp16 value is the fp32 one rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import numpy as np
import pyarrow as pa

from mv2batch.loading.loader import consecutive_batches
from mv2batch.loading.preprocess import Preprocessing, ResizeCrop, fixed_size_preprocessing
from mv2batch.model.device import to_host_later
from mv2batch.tasks.metrics import ClassifyCounts

if TYPE_CHECKING:
    import torch
    from transformers import MobileViTImageProcessorPil

    from mv2batch.inputs.sources import Record
    from mv2batch.loading.loader import Sample

ARROW_TYPES = {"fp32": pa.float32(), "fp16": pa.float16()}
NUMPY_TYPES = {"fp32": np.float32, "fp16": np.float16}


def embedding_size(model_config: dict) -> int:
    """The pooled vector's length: layer 5's channels, transformers' make_divisible(512 * width, 8), done here
    so that describing a job imports no transformers (tests check it against the model's output)."""
    value, divisor = 512 * float(model_config.get("width_multiplier", 1.0)), 8
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class EmbeddingColumn:
    """The `embedding` column: fixed_size_list<float32 | float16>[size], optionally L2-normalised."""

    size: int
    dtype: str = "fp32"  # "fp32" or "fp16"
    normalize: bool = False

    def field(self) -> pa.Field:
        return pa.field("embedding", pa.list_(ARROW_TYPES[self.dtype], self.size))

    def on_device(self, pooled: torch.Tensor) -> torch.Tensor:
        """(batch, size) pooled outputs as the column stores them, still on their device."""
        import torch

        values = pooled.to(torch.float32)
        if self.normalize:
            values = torch.nn.functional.normalize(values, dim=-1)
        return values.to(torch.float16) if self.dtype == "fp16" else values

    def to_arrow(self, rows: list[np.ndarray | None]) -> pa.Array:
        """Host rows (numpy vectors, None on error rows) as one fixed-size-list array, without Python floats;
        an error row is null (over a slot of zeros: a fixed-size list keeps `size` values for every row)."""
        dense = np.zeros((len(rows), self.size), NUMPY_TYPES[self.dtype])
        missing = [row is None for row in rows]
        for position, row in enumerate(rows):
            if row is not None:
                dense[position] = row
        values = pa.array(dense.reshape(-1), type=ARROW_TYPES[self.dtype])
        return pa.FixedSizeListArray.from_arrays(values, self.size, mask=pa.array(missing) if any(missing) else None)


class FixedSizeImages:
    """What classification and embeddings share: images cropped to one size, batched in input order, nothing
    re-read after the pass."""

    reorder_rows: ClassVar[bool] = False

    def preprocessing(self, protocol: str, processor: Callable[[], MobileViTImageProcessorPil], model: str
                      ) -> Preprocessing:
        return fixed_size_preprocessing(protocol, processor, model)

    def batches(self, indices: Sequence[int], read: Callable[[int], Record], resize_crop: ResizeCrop,
                size: int) -> list[list[int]]:
        return consecutive_batches(indices, size)

    def reading(self, photo: Callable) -> None:
        """Nothing to re-read."""


class EmbedTask(FixedSizeImages):
    """One embedding per image, in input order; the classification protocols and batching."""

    name: ClassVar[str] = "embed"
    default_protocol: ClassVar[str] = "hf"

    def __init__(self, labels: list[str], column: EmbeddingColumn | None = None):
        self.labels = labels
        self.column = column or EmbeddingColumn(512)
        self.fields = [pa.field("label", pa.int32()), self.column.field()]

    def start(self, model: torch.nn.Module, pixels: torch.Tensor, samples: list[Sample]) -> Callable[[], list[dict]]:
        ready = to_host_later([self.column.on_device(model(pixel_values=pixels).pooler_output)])
        return lambda: [{"embedding": vector} for vector in ready()[0].numpy()]

    def row(self, sample: Sample, output: dict | None) -> dict:
        return {"label": sample.label, "embedding": output["embedding"] if output else None}

    def new_counts(self) -> ClassifyCounts:
        return ClassifyCounts()

    def count(self, counts: ClassifyCounts, sample: Sample, output: dict) -> None:
        """Embeddings have no metric."""

    counts_from_json = staticmethod(ClassifyCounts.from_json)

    def prepare_columns(self, columns: dict[str, list]) -> None:
        columns["embedding"] = self.column.to_arrow(columns["embedding"])

    def summarize(self, counts: ClassifyCounts) -> tuple[dict, list[dict]]:
        return {}, []
