"""Metric partials: per-shard counts that merge exactly, whatever the sharding, resumption or process count."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClassifyCounts:
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

    def merge(self, other: "ClassifyCounts") -> "ClassifyCounts":
        """The counts of both, as if computed in one pass."""
        merged = ClassifyCounts()
        for name in ("support", "top1", "top5"):
            mine, theirs, out = getattr(self, name), getattr(other, name), getattr(merged, name)
            for key in set(mine) | set(theirs):
                out[key] = mine.get(key, 0) + theirs.get(key, 0)
        return merged

    def to_json(self) -> dict:
        return {name: {str(k): v for k, v in sorted(getattr(self, name).items())} for name in ("support", "top1", "top5")}

    @classmethod
    def from_json(cls, data: dict) -> "ClassifyCounts":
        return cls(**{name: {int(k): int(v) for k, v in data.get(name, {}).items()} for name in ("support", "top1", "top5")})

    @property
    def n(self) -> int:
        return sum(self.support.values())

    def top1_acc(self) -> float | None:
        return sum(self.top1.values()) / self.n if self.n else None

    def top5_acc(self) -> float | None:
        return sum(self.top5.values()) / self.n if self.n else None
