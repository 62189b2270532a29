"""Metric partials: per-shard counts that merge exactly, whatever the sharding, resumption or process count."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


class Counters:
    """Dict-of-counts fields that merge by addition and round-trip through a marker's JSON."""

    def merge(self, other: "Counters") -> "Counters":
        """The counts of both, as if computed in one pass."""
        merged = type(self)()
        for name in self._names():
            mine, theirs, out = getattr(self, name), getattr(other, name), getattr(merged, name)
            for key in set(mine) | set(theirs):
                out[key] = mine.get(key, 0) + theirs.get(key, 0)
        return merged

    def to_json(self) -> dict:
        return {name: {str(k): v for k, v in sorted(getattr(self, name).items())} for name in self._names()}

    @classmethod
    def from_json(cls, data: dict) -> "Counters":
        return cls(**{name: {int(k): int(v) for k, v in data.get(name, {}).items()} for name in cls._names()})

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class ClassifyCounts(Counters):
    """Per-class support and top-1 / top-5 hits for the rows whose gold label is known."""

    support: dict[int, int] = field(default_factory=dict)
    top1: dict[int, int] = field(default_factory=dict)
    top5: dict[int, int] = field(default_factory=dict)
    real_support: dict[int, int] = field(default_factory=dict)  # ImageNet-ReaL: images with a non-empty set
    real_top1: dict[int, int] = field(default_factory=dict)

    def add(self, label: int, topk_ids: list[int], real: frozenset[int] | None = None) -> None:
        """Count one labelled prediction (and its ReaL verdict, where the image has a non-empty ReaL set)."""
        _bump(self.support, label)
        if topk_ids and topk_ids[0] == label:
            _bump(self.top1, label)
        if label in topk_ids[:5]:
            _bump(self.top5, label)
        if real:
            _bump(self.real_support, label)
            if topk_ids and topk_ids[0] in real:
                _bump(self.real_top1, label)

    @property
    def n(self) -> int:
        return sum(self.support.values())

    def top1_acc(self) -> float | None:
        return sum(self.top1.values()) / self.n if self.n else None

    def top5_acc(self) -> float | None:
        return sum(self.top5.values()) / self.n if self.n else None

    def real_acc(self) -> float | None:
        total = sum(self.real_support.values())
        return sum(self.real_top1.values()) / total if total else None


def _bump(counts: dict[int, int], key: int, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by


@dataclass
class SegmentCounts(Counters):
    """How many images each predicted class appears in, and how many pixels it covers."""

    images: dict[int, int] = field(default_factory=dict)
    pixels: dict[int, int] = field(default_factory=dict)
    confusion: dict[int, int] = field(default_factory=dict)  # gt * num_classes + pred -> pixels (eval only)

    def add(self, classes: list[int], pixel_counts: list[int], confusion: dict[int, int] | None = None) -> None:
        """Count one mask, and its confusion with the ground truth where there is one."""
        for class_id, count in zip(classes, pixel_counts):
            _bump(self.images, class_id)
            _bump(self.pixels, class_id, int(count))
        for cell, count in (confusion or {}).items():
            _bump(self.confusion, cell, count)

    def confusion_matrix(self, num_classes: int) -> "np.ndarray":
        """The dense (ground truth x prediction) matrix of pixel counts."""
        matrix = np.zeros(num_classes * num_classes, dtype=np.int64)
        for cell, count in self.confusion.items():
            matrix[cell] = count
        return matrix.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: "np.ndarray") -> tuple[dict, list[dict]]:
    """mIoU (classes with a non-zero union), pixel accuracy, mean class accuracy, and per-class IoU / accuracy."""
    hits = np.diag(confusion).astype(np.float64)
    gt_pixels, pred_pixels = confusion.sum(axis=1), confusion.sum(axis=0)
    union = gt_pixels + pred_pixels - hits
    iou = np.divide(hits, union, out=np.full_like(hits, np.nan), where=union > 0)
    acc = np.divide(hits, gt_pixels, out=np.full_like(hits, np.nan), where=gt_pixels > 0)
    summary = {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else None,
        "pixel_acc": float(hits.sum() / gt_pixels.sum()) if gt_pixels.sum() else None,
        "mean_acc": float(np.nanmean(acc)) if np.any(gt_pixels > 0) else None,
    }
    per_class = [{"class_id": c, "iou": None if np.isnan(iou[c]) else float(iou[c]),
                  "acc": None if np.isnan(acc[c]) else float(acc[c]),
                  "gt_pixels": int(gt_pixels[c]), "pred_pixels": int(pred_pixels[c])} for c in range(len(hits))]
    return summary, per_class
