"""The batch loop: shards -> loader batches -> the placed model -> rows -> the writer, each shard committed when done.

Assembled from parts passed in (the task, the placement, a loader factory, a writer factory, a progress
callback), so that a test builds it from real parts and injects a fault by passing a part of its own.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from mv2batch.loading.gate_trial import GateTrial
from mv2batch.loading.loader import DecodeGate
from mv2batch.model.streams import one_ahead, start_in_streams
from mv2batch.out.rundir import part_name

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mv2batch.inputs.sources import Record
    from mv2batch.loading.loader import Sample
    from mv2batch.loading.shared_batches import Batch
    from mv2batch.model.device import PixelStage
    from mv2batch.model.speedups import Speedups
    from mv2batch.tasks.metrics import Counters as MetricCounts
    from mv2batch.tasks.task import Task

Shards = list[tuple[int, Sequence[int]]]  # (shard number, item indices)


@dataclass(frozen=True)
class ProgressUpdate:
    """Sent to the progress callback when images start to flow and after every batch (or shard, on Ray)."""

    done: int
    total: int | None
    errors: int


ProgressCallback = Callable[[ProgressUpdate], None]


@dataclass
class Counters:
    """What this process ran: rows, error rows, and how many it is to run (None: a stream, unknown)."""

    done: int = 0
    errors: int = 0
    total: int | None = None


@dataclass
class ShardState:
    """Counters of one shard while its batches flow."""

    number: int
    expected_rows: int | None  # None: known once the loader's last batch of the shard comes (sharded sources)
    counts: MetricCounts  # the task's metric partials (tasks.metrics.ClassifyCounts or SegmentCounts)
    rows: int = 0
    errors: int = 0
    started: float | None = None  # when the shard's first batch arrived
    compute_s: float = 0.0
    wait_s: float = 0.0


class LoaderFactory(Protocol):
    """Starts the loader over some shards: their batches in the shards' order (runner.shards.loader_factory)."""

    def __call__(self, read: Callable[[int], Record], gate: DecodeGate | None, shards: Shards) -> Iterator[Batch]: ...


class PartsWriter(Protocol):
    """Where the loop's rows go (out.writer.BackgroundWriter): written per shard, then committed with its marker."""

    def write(self, shard: int, columns: dict[str, list]) -> None: ...

    def commit(self, shard: int, marker: dict) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class PlacedModel(Protocol):
    """What the loop reads of a placed model (runner.placement.Placement)."""

    model: torch.nn.Module  # called as model(pixel_values=...)
    pixel_stage: PixelStage  # uint8 NHWC batch -> the model's input
    speedups: Speedups | None
    streams: ThreadPoolExecutor | None  # parallel CPU streams (model.streams), None: one stream
    queued: bool


# (index, path) -> the encoded photo of a row again (the segmentation overlays re-read it in the writer thread).
PhotoReader = Callable[[int, "str | None"], bytes]


@dataclass
class BatchLoop:
    """Runs shards through the model and the writer; the counters say what it ran."""

    task: Task
    placement: PlacedModel
    make_loader: LoaderFactory
    make_writer: Callable[[], PartsWriter]
    item_id: Callable[[int], str]
    shard_size: int | None  # item index -> shard, where batches do not say (sharded sources: they do)
    marker_fields: dict  # written into every shard marker (fingerprint, rank)
    gate: bool = False  # workers may decode only between passes: a trial decides whether they do
    progress: ProgressCallback | None = None
    counters: Counters = field(default_factory=Counters)
    gate_trial: GateTrial = field(default_factory=GateTrial)

    def process(self, shards: Shards, read: Callable[[int], Record], photo: PhotoReader | None = None) -> None:
        """Run the shards through one loader, committing each shard when its last row is written.

        shards: (number, item indices), or (number, None) where the loader reads whole shards of the source's
        own and says which batch ends each; read: an item's Record by index; photo: a row's photo again
        (default: read again by index).
        """
        if not shards:
            return
        self.task.reading(photo or (lambda index, path: read(index).raw))
        states = {number: ShardState(number, len(indices) if indices is not None else None, self.task.new_counts())
                  for number, indices in shards}
        writer = self.make_writer()
        try:
            for state, columns in self.predict(shards, read, states):
                writer.write(state.number, columns)
                if state.rows == state.expected_rows:
                    writer.commit(state.number, self._marker(state))
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def predict(self, shards: Shards, read: Callable[[int], Record],
                states: dict[int, ShardState]) -> Iterator[tuple[ShardState, dict[str, list]]]:
        """Each batch's rows, errors included, with its shard's state."""
        import torch

        gate = DecodeGate() if self.gate else None
        loader = self.make_loader(read, gate, shards)
        self._report()
        with torch.inference_mode():
            started = self._started_batches(loader, states, gate)
            for state, batch, results in one_ahead(started, self._ahead):
                yield state, self._batch_rows(state, batch, results)
                self._report()

    @property
    def _ahead(self) -> bool:
        """Whether started work goes on in the background: on parallel streams, or queued on a GPU."""
        return self.placement.queued or self.placement.streams is not None

    def _report(self) -> None:
        if self.progress:
            self.progress(ProgressUpdate(self.counters.done, self.counters.total, self.counters.errors))

    def _started_batches(self, loader: Iterator, states: dict[int, ShardState],
                         gate: DecodeGate | None) -> Iterator[tuple]:
        """(shard state, batch, results) for each batch of the loader, the model started on it (and, with a
        gate, done: the workers wait while it runs)."""
        previous = None  # the batch before: (gated, its arrival, its pass's seconds, its samples)
        while True:
            waited = time.perf_counter()
            batch = next(loader, None)
            arrived = time.perf_counter()
            if gate and previous:
                self._record_trial(*previous, rest_s=waited - previous[1] - previous[2])
            if batch is None:
                return
            shard = batch.shard if batch.shard is not None else batch.samples[0].index // self.shard_size
            state = states[shard]
            state.started = state.started or waited
            state.wait_s += arrived - waited
            gated = self.gate_trial.gated()
            with gate.paused(gated) if gate else contextlib.nullcontext():
                results = self._start_batch(state, batch)
            previous = (gated, arrived, time.perf_counter() - arrived, batch.samples)
            yield state, batch, results

    def _record_trial(self, gated: bool, arrived: float, pass_s: float, samples: list, rest_s: float) -> None:
        decode_s = sum(sample.decode_s for sample in samples)
        self.gate_trial.record(gated, len(samples), pass_s, decode_s, rest_s)

    def _start_batch(self, state: ShardState, batch: Batch) -> Callable[[], list[tuple[list[int], list]]]:
        """Start the model on a batch; the result gives (positions, outputs) per part once they are ready.

        The shape groups are cut into the model's micro-batches (where it has them) before the pixel stage, so
        that only one micro-batch at a time is in float (a batch of 32 at 256x256 is 25 MB in float32), and run
        side by side on its parallel streams (a segmentation batch holds many shapes of one or two photos
        each); without streams this computes them now.
        """
        from mv2batch.model.speedups import micro_batch_images

        placed, parts = self.placement, []
        for positions, pixels in batch.groups:  # uint8 NHWC
            size = micro_batch_images(placed.speedups, pixels.shape[1], pixels.shape[2]) or len(positions)
            parts += [(positions[i : i + size], pixels[i : i + size]) for i in range(0, len(positions), size)]

        def infer(part: tuple[list[int], torch.Tensor]) -> Callable[[], list[dict]]:
            positions, pixels = part
            return self.task.start(placed.model, placed.pixel_stage(pixels), [batch.samples[p] for p in positions])

        computed = time.perf_counter()
        started = start_in_streams(placed.streams, infer, parts)
        state.compute_s += time.perf_counter() - computed
        # Each part's outputs are read when asked for: on a GPU that waits for its queued work.
        return lambda: list(zip((positions for positions, _ in parts), (outputs() for outputs in started())))

    def _batch_rows(self, state: ShardState, batch: Batch, results: Callable[[], list]) -> dict[str, list]:
        """Model outputs for the batch's ok images, and one row per sample, errors included, in order."""
        outputs: list[dict | None] = [None] * len(batch.samples)
        computed = time.perf_counter()
        for positions, group_outputs in results():
            for position, output in zip(positions, group_outputs):
                outputs[position] = output
        state.compute_s += time.perf_counter() - computed
        columns: dict[str, list] = {}
        for sample, output in zip(batch.samples, outputs):
            if output is not None:
                self.task.count(state.counts, sample, output)
            for name, value in self._row(state, sample, output).items():
                columns.setdefault(name, []).append(value)
        errors = sum(output is None for output in outputs)
        state.rows, state.errors = state.rows + len(batch.samples), state.errors + errors
        if batch.ends_shard:
            state.expected_rows = state.rows
        self.counters.done += len(batch.samples)
        self.counters.errors += errors
        return columns

    def _row(self, state: ShardState, sample: Sample, output: dict | None) -> dict:
        from mv2batch.out.writer import POSITION

        common = {
            "id": sample.id if sample.id is not None else self.item_id(sample.index), "path": sample.path,
            "shard": state.number,
            "width": sample.width, "height": sample.height, "status": "ok" if output is not None else "error",
            "error": sample.error, "sha256": sample.sha256, POSITION: sample.index,
        }
        return {**common, **self.task.row(sample, output)}

    def _marker(self, state: ShardState) -> dict:
        return {
            "shard": state.number, **self.marker_fields, "part": part_name(state.number),
            "rows": state.rows, "errors": state.errors, "metrics": state.counts.to_json(),
            "timings": {"seconds": time.perf_counter() - state.started, "compute_s": state.compute_s,
                        "wait_input_s": state.wait_s, **(self.gate_trial.describe() if self.gate else {})},
        }
