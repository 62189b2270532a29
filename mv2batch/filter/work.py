"""What the filter's steps hand each other: a shard's kept rows, what writing them did, the input layouts'
protocol, and the progress counts (updated from the copying threads)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from mv2batch.storage import Location

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class ShardWork:
    """One shard's kept rows, in the run's order."""

    shard: int
    kept: pa.Table  # the kept rows' predictions
    positions: np.ndarray  # their rows in the shard's part
    first_row: int  # the part's first row among the run's rows (a table's row number = first_row + position)


@dataclass
class Outcome:
    """What writing (part of) a shard did."""

    unavailable: dict[str, str] = field(default_factory=dict)  # id -> why its item could not be read
    items: int = 0  # kept items written now
    present: int = 0  # kept items found in place, written by an earlier attempt
    files: int = 0  # files written now

    def merged(self, other: "Outcome") -> "Outcome":
        return Outcome({**self.unavailable, **other.unavailable}, self.items + other.items,
                       self.present + other.present, self.files + other.files)


class Layout(Protocol):
    """An input kind's way of writing kept items in its own format (folders, tars, tables)."""

    name: str
    parallel: bool  # whether a shard's tasks may run in the thread pool (a streamed table is read in order)

    def locations(self) -> list[tuple[str, Location]]: ...  # where the input lies: DEST must stay outside
    def tasks(self, work: ShardWork) -> list[Callable[[], Outcome]]: ...


@dataclass(frozen=True)
class FilterProgress:
    """A snapshot for a progress bar: rows judged of the run's rows, kept, and kept items in place."""

    rows: int
    judged: int = 0
    kept: int = 0
    placed: int = 0  # written now or found from an earlier attempt


class Tally:
    """FilterProgress counts, updated from any thread; the callback at most every `every_s` (and at the end)."""

    def __init__(self, rows: int, callback: Callable[[FilterProgress], None] | None, every_s: float = 0.1):
        self.lock = threading.Lock()
        self.now = FilterProgress(rows)
        self.callback, self.every_s, self.said = callback, every_s, 0.0

    def add(self, judged: int = 0, kept: int = 0, placed: int = 0) -> None:
        with self.lock:
            self.now = replace(self.now, judged=self.now.judged + judged, kept=self.now.kept + kept,
                               placed=self.now.placed + placed)
            due = time.monotonic() - self.said >= self.every_s
            if due:
                self.said = time.monotonic()
            now = self.now
        if due and self.callback is not None:
            self.callback(now)

    def end(self) -> None:
        if self.callback is not None:
            self.callback(self.now)
