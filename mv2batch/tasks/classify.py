"""Classification: softmax top-k per image (and, with --embeddings, the pooled vector from the same pass)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import pyarrow as pa

from mv2batch.model.device import to_host_later
from mv2batch.tasks.embed import EmbeddingColumn, FixedSizeImages
from mv2batch.tasks.metrics import ClassifyCounts
from mv2batch.tasks.postprocess import topk_on_device

if TYPE_CHECKING:
    import torch

    from mv2batch.loading.loader import Sample


class ClassifyTask(FixedSizeImages):
    """Softmax top-k per image; rows in input order; top-1 / top-5 where gold labels are known."""

    name: ClassVar[str] = "classify"
    default_protocol: ClassVar[str] = "hf"
    fields = [
        pa.field("topk_ids", pa.list_(pa.int32())),
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("label", pa.int32()),
    ]

    def __init__(self, labels: list[str], top_k: int = 5, real: dict[str, frozenset[int]] | None = None,
                 embedding: EmbeddingColumn | None = None):
        self.labels, self.top_k, self.real = labels, top_k, real
        self.embedding = embedding  # classify --embeddings: the pooled vector the head reads, same pass
        if embedding is not None:
            self.fields = [*ClassifyTask.fields, embedding.field()]

    def start(self, model: torch.nn.Module, pixels: torch.Tensor, samples: list[Sample]) -> Callable[[], list[dict]]:
        """Queue the model and the top-k on the device; the result waits for them and gives one dict per image."""
        output = model(pixel_values=pixels)
        embedded = [self.embedding.on_device(output.pooler_output)] if self.embedding is not None else []
        ready = to_host_later([*topk_on_device(output.logits, self.top_k), *embedded])

        def outputs() -> list[dict]:
            ids, scores, *vectors = ready()
            rows = [{"topk_ids": i, "topk_scores": s, "topk_labels": [self._label(c) for c in i]}
                    for i, s in zip(ids.tolist(), scores.tolist())]
            for row, vector in zip(rows, vectors[0].numpy() if vectors else []):
                row["embedding"] = vector
            return rows

        return outputs

    def _label(self, class_id: int) -> str:
        return self.labels[class_id] if class_id < len(self.labels) else str(class_id)

    def row(self, sample: Sample, output: dict | None) -> dict:
        values = output or {"topk_ids": None, "topk_scores": None, "topk_labels": None, "embedding": None}
        row = {**values, "label": sample.label}
        if self.embedding is None:
            row.pop("embedding", None)
        return row

    def new_counts(self) -> ClassifyCounts:
        return ClassifyCounts()

    def count(self, counts: ClassifyCounts, sample: Sample, output: dict) -> None:
        if sample.label is None:
            return
        real = self.real.get(Path(sample.path).stem) if self.real is not None and sample.path else None
        counts.add(sample.label, output["topk_ids"], real)

    counts_from_json = staticmethod(ClassifyCounts.from_json)

    def prepare_columns(self, columns: dict[str, list]) -> None:
        """In the writer thread: the embeddings as one Arrow array (no Python floats)."""
        if self.embedding is not None:
            columns["embedding"] = self.embedding.to_arrow(columns["embedding"])

    def summarize(self, counts: ClassifyCounts) -> tuple[dict, list[dict]]:
        """Summary metrics and per-class rows (top-1 / top-5, where gold labels were known)."""
        if not counts.n:
            return {}, []
        per_class = [
            {"class_id": c, "class_name": self._label(c), "support": n,
             "top1_acc": counts.top1.get(c, 0) / n, "top5_acc": counts.top5.get(c, 0) / n}
            for c, n in sorted(counts.support.items())
        ]
        metrics = {"top1": counts.top1_acc(), "top5": counts.top5_acc()}
        if counts.real_support:
            metrics["real_top1"] = counts.real_acc()
        return metrics, per_class
