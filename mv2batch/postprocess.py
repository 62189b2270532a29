"""Post-processing on the device: logits to what a row stores (softmax top-k, or upsampled argmax masks)."""

from __future__ import annotations

from typing import Any

# Upsampled logits are materialised for at most this many float32 values at a time (128 MB): a
# 6000x4000 photo with 21 classes would otherwise need 2 GB for the full-resolution logits alone.
UPSAMPLE_CHUNK_VALUES = 32 * 1024 * 1024


def softmax_topk(logits: Any, k: int) -> tuple[Any, Any]:
    """Top-k class ids (int32) and softmax probabilities (float32) per row, on the CPU."""
    ids, scores = topk_on_device(logits, k)
    return ids.cpu(), scores.cpu()


def topk_on_device(logits: Any, k: int) -> tuple[Any, Any]:
    """softmax_topk, left on the logits' device (no wait for the device)."""
    import torch

    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    scores, ids = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1, sorted=True)
    return ids.to(torch.int32), scores


def upsample_argmax(logits: Any, height: int, width: int, chunk_values: int = UPSAMPLE_CHUNK_VALUES) -> Any:
    """argmax over classes of bilinear(align_corners=False) upsampled logits (C, h, w) -> (height, width).

    Classes are upsampled a few at a time with a running maximum: each channel is interpolated exactly
    as one full F.interpolate call would, and strict '>' keeps the first class on ties, as argmax does.
    """
    import torch
    import torch.nn.functional as F

    logits = logits.to(torch.float32).unsqueeze(0)
    classes = logits.shape[1]
    step = max(1, min(classes, chunk_values // max(1, height * width)))
    best_value = best_class = None
    for start in range(0, classes, step):
        up = F.interpolate(logits[:, start : start + step], size=(height, width), mode="bilinear",
                           align_corners=False)[0]
        if step == 1:  # large images: no index tensor is needed for a single class
            value, index = up[0], start
        else:
            value, index = up.max(dim=0)
            index = (index + start).to(torch.int16)
        if best_value is None:
            best_value = value
            best_class = torch.full_like(value, start, dtype=torch.int16) if step == 1 else index
            continue
        better = value > best_value
        torch.maximum(best_value, value, out=best_value)
        if step == 1:
            best_class.masked_fill_(better, index)
        else:  # not best_class[better] = index[better]: a boolean index waits for the device
            best_class = torch.where(better, index, best_class)
        del up, value, better
    return best_class


def confusion_cells(mask: Any, target: Any, num_classes: int) -> dict[int, int]:
    """Pixels per (ground truth, prediction) pair, as {gt * num_classes + pred: count}; 255 and others ignored."""
    classes, counts = present_counts(confusion_counts(mask, target, num_classes).cpu())
    return dict(zip(classes, counts))


def class_counts(mask: Any, num_classes: int) -> Any:
    """Pixels per class (int64, num_classes), on the mask's device without waiting for it."""
    import torch

    return _count(mask.reshape(-1).to(torch.int64), num_classes)


def confusion_counts(mask: Any, target: Any, num_classes: int) -> Any:
    """Pixels per gt * num_classes + pred cell (int64, num_classes**2), on the mask's device without waiting
    for it; ground truth of num_classes or more (255: ignore) counts nowhere."""
    import torch

    gt = torch.as_tensor(target)
    # From pinned memory a copy to a GPU is queued like the rest; from pageable memory it would wait for the GPU.
    gt = (gt.pin_memory() if mask.device.type == "cuda" else gt).to(mask.device, non_blocking=True)
    gt = gt.reshape(-1).to(torch.int64)
    cells = gt * num_classes + mask.reshape(-1).to(torch.int64)
    cells = torch.where(gt < num_classes, cells, num_classes**2)  # a bin of its own, dropped below
    return _count(cells, num_classes**2 + 1)[: num_classes**2]


def present_counts(counts: Any) -> tuple[list[int], list[int]]:
    """(indices, counts) of the non-zero entries of a host count vector."""
    import torch

    present = torch.nonzero(counts).reshape(-1)
    return present.to(torch.int32).tolist(), counts[present].tolist()


def _count(indices: Any, bins: int) -> Any:
    # Not torch.bincount: on CUDA it reads the largest index back to the host first, which waits for the device.
    import torch

    ones = torch.ones(1, dtype=torch.int64, device=indices.device).expand(indices.shape[0])
    return torch.zeros(bins, dtype=torch.int64, device=indices.device).index_add_(0, indices, ones)
