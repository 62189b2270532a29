"""Post-processing on the device: logits to what a row stores (softmax top-k for classification)."""

from __future__ import annotations

from typing import Any


def softmax_topk(logits: Any, k: int) -> tuple[Any, Any]:
    """Top-k class ids (int32) and softmax probabilities (float32) per row, on the CPU."""
    import torch

    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    scores, ids = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1, sorted=True)
    return ids.to(torch.int32).cpu(), scores.cpu()
