"""Post-processing on the device: logits to what a row stores (softmax top-k, or upsampled argmax masks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# Upsampled logits are materialised all at once up to this many float32 values (128 MB); above it (a
# 6000x4000 photo with 21 classes would need 2 GB) one class at a time.
UPSAMPLE_CHUNK_VALUES = 32 * 1024 * 1024
# Sub-steps per input cell at which candidate_classes bounds each class (a power of two: exact weights).
CANDIDATE_STEPS = 4


def softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class ids (int32) and softmax probabilities (float32) per row, on the CPU."""
    ids, scores = topk_on_device(logits, k)
    return ids.cpu(), scores.cpu()


def topk_on_device(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_topk, left on the logits' device (no wait for the device)."""
    import torch

    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    scores, ids = torch.topk(probs, k=min(k, probs.shape[-1]), dim=-1, sorted=True)
    return ids.to(torch.int32), scores


def upsample_argmax(logits: torch.Tensor, height: int, width: int, chunk_values: int = UPSAMPLE_CHUNK_VALUES
                    ) -> torch.Tensor:
    """argmax over classes of bilinear(align_corners=False) upsampled logits (C, h, w) -> (height, width), int16.

    Each channel is interpolated exactly as one full F.interpolate call would, and ties keep the first class,
    as argmax does. Small images take one call; large ones one class at a time into reused buffers.
    """
    import torch
    import torch.nn.functional as F

    logits = logits.to(torch.float32).unsqueeze(0)
    if logits.shape[1] * height * width <= chunk_values:
        up = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
        return up.max(dim=0).indices.to(torch.int16)
    return _running_argmax(logits, height, width)


def _running_argmax(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # A 12 MP photo with 21 classes: 1 GB of upsampled logits at once, and max(dim=0) over a few channels at a
    # time was 2.5 s on 2 cores. Here each class that can win somewhere costs one interpolation into the same
    # buffer and four passes over 1-byte or 4-byte arrays (docs/benchmarks.md, "Whole camera photos").
    import torch

    device = logits.device
    # On a GPU the pruning would read from the device and stall the queue; its class loop is cheap there anyway.
    classes = candidate_classes(logits) if device.type == "cpu" else list(range(logits.shape[1]))
    shape = (height, width)
    best_value = torch.empty((1, 1, *shape), dtype=torch.float32, device=device)
    _upsample_into(logits[:, classes[0] : classes[0] + 1], best_value)
    best_value = best_value[0, 0]
    small = logits.shape[1] <= 256  # class ids fit a byte: the cheap update below
    best_class = torch.full(shape, classes[0], dtype=torch.uint8 if small else torch.int16, device=device)
    value = torch.empty((1, 1, *shape), dtype=torch.float32, device=device) if len(classes) > 1 else None
    better = torch.empty(shape, dtype=torch.bool, device=device) if len(classes) > 1 else None
    candidate = torch.empty(shape, dtype=torch.uint8, device=device) if small and len(classes) > 1 else None
    for index in classes[1:]:
        _upsample_into(logits[:, index : index + 1], value)
        torch.gt(value[0, 0], best_value, out=better)  # strict: on ties the earlier class stays, as in argmax
        torch.maximum(best_value, value[0, 0], out=best_value)
        if small:
            # Classes come in increasing order, so where this one is better it is also the largest id so far:
            # max(best, better * index) is the update, without masked_fill's slow scatter (35 ms per 16 MP).
            torch.mul(better.view(torch.uint8), index, out=candidate)
            torch.maximum(best_class, candidate, out=best_class)
        else:
            best_class.masked_fill_(better, index)
    return best_class.to(torch.int16)


def candidate_classes(logits: torch.Tensor, steps: int = CANDIDATE_STEPS) -> list[int]:
    """The classes of logits (1, C, h, w) that can be the argmax of their bilinear upsampling at some pixel.

    Between four neighbouring input pixels the upsampled logits are bilinear in the two interpolation weights,
    so over any sub-rectangle of weights each class reaches its maximum and its minimum at the sub-rectangle's
    corners. The logits are evaluated on a grid of steps x steps sub-rectangles per input cell (weights j/steps);
    a class whose maximum over a sub-rectangle is below the largest minimum of any class there loses at every
    pixel inside it. Dropped: classes that lose in every sub-rectangle. The margin covers float rounding many
    times over, so a dropped class could never have won and the mask is unchanged. A trained model leaves a few
    classes per photo; random weights nearly all of them.
    """
    import torch
    import torch.nn.functional as F

    height, width = logits.shape[-2:]
    grid = F.interpolate(logits, size=((height - 1) * steps + 1, (width - 1) * steps + 1), mode="bilinear",
                         align_corners=True) if height > 1 and width > 1 else logits
    grid = F.pad(grid, (0, 1, 0, 1), mode="replicate")  # a 1-pixel-wide input still has windows of 2
    window_max = F.max_pool2d(grid, 2, stride=1)
    window_min = -F.max_pool2d(-grid, 2, stride=1)
    floor = window_min.max(dim=1, keepdim=True).values
    margin = 1e-4 * (float(logits.abs().max()) + 1.0)
    possible = (window_max >= floor - margin).flatten(2).any(dim=2)[0]
    return torch.nonzero(possible).reshape(-1).tolist()


def _upsample_into(channel: torch.Tensor, out: torch.Tensor) -> None:
    """F.interpolate(channel, size=out's, mode="bilinear", align_corners=False), written into out (no new 64 MB
    allocation per class: its page faults cost as much as the interpolation)."""
    import torch

    torch._C._nn.upsample_bilinear2d(channel, tuple(out.shape[-2:]), False, None, None, out=out)


def confusion_cells(mask: torch.Tensor, target: np.ndarray, num_classes: int) -> dict[int, int]:
    """Pixels per (ground truth, prediction) pair, as {gt * num_classes + pred: count}; 255 and others ignored."""
    classes, counts = present_counts(confusion_counts(mask, target, num_classes).cpu())
    return dict(zip(classes, counts))


def class_counts(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixels per class (int64, num_classes), on the mask's device without waiting for it."""
    import torch

    if mask.device.type == "cpu":  # bincount of the int16 ids as they are: 5x faster than widening them first
        return torch.bincount(mask.reshape(-1), minlength=num_classes)
    return _count(mask.reshape(-1).to(torch.int64), num_classes)


def confusion_counts(mask: torch.Tensor, target: np.ndarray, num_classes: int) -> torch.Tensor:
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


def present_counts(counts: torch.Tensor) -> tuple[list[int], list[int]]:
    """(indices, counts) of the non-zero entries of a host count vector."""
    import torch

    present = torch.nonzero(counts).reshape(-1)
    return present.to(torch.int32).tolist(), counts[present].tolist()


def _count(indices: torch.Tensor, bins: int) -> torch.Tensor:
    # Not torch.bincount: on CUDA it reads the largest index back to the host first, which waits for the device.
    import torch

    ones = torch.ones(1, dtype=torch.int64, device=indices.device).expand(indices.shape[0])
    return torch.zeros(bins, dtype=torch.int64, device=indices.device).index_add_(0, indices, ones)
