"""Post-processing on the device: logits to what a row stores (softmax top-k, or upsampled argmax masks)."""

from __future__ import annotations

from typing import Any

# Upsampled logits are materialised for at most this many float32 values at a time (128 MB): a
# 6000x4000 photo with 21 classes would otherwise need 2 GB for the full-resolution logits alone.
UPSAMPLE_CHUNK_VALUES = 32 * 1024 * 1024


def softmax_topk(logits: Any, k: int) -> tuple[Any, Any]:
    """Top-k class ids (int32) and softmax probabilities (float32) per row, on the CPU."""
    import torch

    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    scores, ids = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1, sorted=True)
    return ids.to(torch.int32).cpu(), scores.cpu()


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
        best_class[better] = index if step == 1 else index[better]
        del up, value, better
    return best_class


def class_histogram(mask: Any, num_classes: int) -> tuple[list[int], list[int]]:
    """The classes present in a mask and their pixel counts, computed on the mask's device."""
    import torch

    counts = torch.bincount(mask.reshape(-1), minlength=num_classes).cpu()
    present = torch.nonzero(counts).reshape(-1)
    return present.to(torch.int32).tolist(), counts[present].tolist()


def confusion_cells(mask: Any, target: Any, num_classes: int) -> dict[int, int]:
    """Pixels per (ground truth, prediction) pair, as {gt * num_classes + pred: count}; 255 and others ignored."""
    import torch

    gt = torch.as_tensor(target, device=mask.device).to(torch.int64)
    valid = gt < num_classes
    cells = torch.bincount(gt[valid] * num_classes + mask[valid].to(torch.int64), minlength=num_classes**2).cpu()
    present = torch.nonzero(cells).reshape(-1)
    return dict(zip(present.tolist(), cells[present].tolist()))
