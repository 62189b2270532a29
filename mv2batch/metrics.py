"""Metric partials: per-shard counts that merge exactly, whatever the sharding, resumption or process count."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


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

    def add(self, label: int, topk_ids: list[int]) -> None:
        """Count one labelled prediction."""
        self.support[label] = self.support.get(label, 0) + 1
        if topk_ids and topk_ids[0] == label:
            self.top1[label] = self.top1.get(label, 0) + 1
        if label in topk_ids[:5]:
            self.top5[label] = self.top5.get(label, 0) + 1

    @property
    def n(self) -> int:
        return sum(self.support.values())

    def top1_acc(self) -> float | None:
        return sum(self.top1.values()) / self.n if self.n else None

    def top5_acc(self) -> float | None:
        return sum(self.top5.values()) / self.n if self.n else None


@dataclass
class SegmentCounts(Counters):
    """How many images each predicted class appears in, and how many pixels it covers."""

    images: dict[int, int] = field(default_factory=dict)
    pixels: dict[int, int] = field(default_factory=dict)

    def add(self, classes: list[int], pixel_counts: list[int]) -> None:
        """Count one mask."""
        for class_id, count in zip(classes, pixel_counts):
            self.images[class_id] = self.images.get(class_id, 0) + 1
            self.pixels[class_id] = self.pixels.get(class_id, 0) + int(count)
