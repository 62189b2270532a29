"""The backbone's pooled vector and, with a classification head, its logits from one pass (embed and
classify --embeddings)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pooled_model(classification: torch.nn.Module | None = None, backbone: torch.nn.Module | None = None
                 ) -> torch.nn.Module:
    """A module whose output has the backbone's `pooler_output` and, with a classification model, its `logits`
    from the same pass: `classifier(mobilevitv2(x).pooler_output)`, which is exactly
    MobileViTV2ForImageClassification's forward (no dropout there). It keeps the `mobilevitv2` attribute the
    speed-ups look for."""
    return _pooled_class()(classification.mobilevitv2 if classification is not None else backbone,
                           classification.classifier if classification is not None else None)


@functools.cache
def _pooled_class() -> type:
    import torch
    from transformers.utils import ModelOutput

    @dataclass
    class PooledOutput(ModelOutput):
        logits: torch.Tensor | None = None
        pooler_output: torch.Tensor | None = None

    class PooledModel(torch.nn.Module):
        def __init__(self, backbone: torch.nn.Module, classifier: torch.nn.Module | None):
            super().__init__()
            self.mobilevitv2, self.classifier = backbone, classifier

        def forward(self, pixel_values: torch.Tensor | None = None) -> PooledOutput:
            pooled = self.mobilevitv2(pixel_values).pooler_output
            logits = self.classifier(pooled) if self.classifier is not None else None
            return PooledOutput(logits=logits, pooler_output=pooled)

    return PooledModel
