"""Whether decoding between forward passes pays on this machine: measured in the run's first batches.

On 2 cores of an AMD EPYC the exact fp32 set reached 90-94 % of the model alone with the workers decoding only
between passes (loader.DecodeGate), 86 % with a worker beside the model's team; on 2 cores of an Intel Xeon
the same gate left it at 78 %. Which mode is faster depends on the CPU, on the model's speed against the
decoder's and on the photos, so the batch loop runs both for a few batches and keeps the faster.

Throughput over a few batches would not tell: the loader keeps workers x PREFETCH batches ready, and a gated
block drains that stock without waiting, so it looks free for dozens of batches. What each mode costs is
measured directly instead: the passes (slower with workers beside them), the decoding (the worker stage's
wall time, done serially between passes when gated) and the rest of each batch's cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WARMUP_BATCHES = 2  # the first batches carry start-up: workers importing, each new shape's first pass
BLOCK_BATCHES = 3  # batches in a row in one mode
ROUNDS = 2  # on / off blocks each: alternating keeps a slow minute of a shared machine from deciding


@dataclass
class ModeTimes:
    """Sums over one mode's trial batches, in seconds."""

    images: int = 0
    passes_s: float = 0.0  # the forward passes and post-processing
    decode_s: float = 0.0  # the worker stage of each image (wall time in its worker)
    rest_s: float = 0.0  # the cycle less its pass and its wait for input: rows, writing, bookkeeping

    def add(self, images: int, pass_s: float, decode_s: float, rest_s: float) -> None:
        self.images += images
        self.passes_s += pass_s
        self.decode_s += decode_s
        self.rest_s += rest_s


@dataclass
class GateTrial:
    """Alternates the gate on and off in blocks of batches, then keeps the mode predicted to run more images/s.

    The batch loop asks `gated()` before each pass and reports the batch with `record`. With every image's
    pass p, decoding d (in the mode's own conditions) and rest r, over w workers:
    gated, decoding waits for the pass and takes every worker: p + r + d / w per image;
    beside, it overlaps the pass: max(p + r, d / w).
    `chosen` is None until it has decided; GateTrial(chosen=...) is a fixed choice.
    """

    workers: int = 1
    warmup: int = WARMUP_BATCHES
    block: int = BLOCK_BATCHES
    rounds: int = ROUNDS
    chosen: bool | None = None
    rates: dict = field(default_factory=dict)  # mode -> predicted images/s, once decided
    _batches: int = 0
    _times: dict = field(default_factory=lambda: {True: ModeTimes(), False: ModeTimes()})

    def gated(self) -> bool:
        """Whether the next pass closes the gate."""
        if self.chosen is not None:
            return self.chosen
        if self._batches < self.warmup:
            return True
        return (self._batches - self.warmup) // self.block % 2 == 0

    def record(self, gated: bool, images: int, pass_s: float, decode_s: float, rest_s: float) -> None:
        """One batch run in mode gated: its images, its pass, its images' decoding, the rest of its cycle."""
        if self.chosen is None and self._batches >= self.warmup:
            self._times[gated].add(images, pass_s, decode_s, rest_s)
        self._batches += 1
        if self.chosen is None and self._batches >= self.warmup + 2 * self.block * self.rounds:
            self.rates = self._predicted_rates()
            self.chosen = self.rates[True] >= self.rates[False]

    def _predicted_rates(self) -> dict[bool, float]:
        on, off = self._times[True], self._times[False]
        rest = (on.rest_s + off.rest_s) / max(1, on.images + off.images)
        per_image = {
            True: on.passes_s / max(1, on.images) + rest + on.decode_s / max(1, on.images) / self.workers,
            False: max(off.passes_s / max(1, off.images) + rest, off.decode_s / max(1, off.images) / self.workers),
        }
        return {mode: 1.0 / max(seconds, 1e-9) for mode, seconds in per_image.items()}

    def describe(self) -> dict:
        """For the shard markers: what was decided, on which figures."""
        return {"decode_between_passes": self.chosen,
                "trial_images_per_s": {("gated" if mode else "beside"): round(rate, 2)
                                       for mode, rate in self.rates.items()}}
