"""Reading a batch's objects at once: mv2batch's input alone (list, GET, decode, resize, crop in the loader's
workers) from local files and from a store with a round trip per GET, one GET at a time against 16 at once.

    python benchmarks/bench_fetch.py [-n 400] [--round-trip-ms 30] [--workers 2] [--repeat 2]

The store is fsspec's local filesystem behind a protocol of its own whose reads sleep one round trip (a real
bucket's GET: 20-50 ms from a VM in its region); moto on loopback has almost none. On 2 CPU cores the model
(about 20 images/s at width 1.0) would hide most of it; on a GPU box (5,000-9,000 images/s) a worker reading
one object at a time cannot keep up: this measures the input alone, the ceiling a run cannot pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)


def register_distant(round_trip_s: float) -> None:
    """`distant:///path`: local files, each whole read one round trip late (forked workers inherit it)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class DistantFiles(LocalFileSystem):
        protocol = "distant"

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            return super()._strip_protocol(path[len("distant://"):] if path.startswith("distant://") else path)

        def cat_file(self, path, start=None, end=None, **kwargs):
            time.sleep(round_trip_s)
            return super().cat_file(path, start, end, **kwargs)

    fsspec.register_implementation("distant", DistantFiles, clobber=True)


def input_alone(folder: str, spec: dict, fetches: int, workers: int) -> float:
    """Images per second through mv2batch's loader, listing excluded (it is the same either way)."""
    from mv2batch.inputs.sources import FolderSource
    from mv2batch.loading.loader import ImageDataset, make_loader

    _, task, preprocessing = common.task_preprocessing(spec)
    source = FolderSource.open(folder)
    host_pixels, _ = preprocessing.stages(flip_on_host=True)
    dataset = ImageDataset(source.read, host_pixels, fetches=fetches)
    batches = task.batches(range(len(source)), source.read, preprocessing.resize_crop, spec["batch_size"])
    started, done = time.perf_counter(), 0
    for batch in make_loader(dataset, iter(batches), workers, False):
        done += len(batch.samples)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400)
    parser.add_argument("--round-trip-ms", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    register_distant(args.round_trip_ms / 1000)
    model, how = common.checkpoint(None, "classify", common.DEFAULT_PHOTOS)
    folder = common.image_folder(common.DEFAULT_PHOTOS, args.n)
    spec = {"task": "classify", "model": model, "images": str(folder), "batch_size": 32, "dtype": "fp32"}
    print(common.machine(), f"| {args.n} ImageNet photos, {args.workers} loader workers, batch 32 | "
          f"round trip {args.round_trip_ms:g} ms | {how}", flush=True)
    cases = [("local files", str(folder), 16), ("store, 1 GET at a time", f"distant://{folder}", 1),
             ("store, 16 GETs at once", f"distant://{folder}", 16)]
    rates: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(args.repeat):  # in turns: the machine's noise falls on every case alike
        for label, where, fetches in cases:
            rates[label].append(input_alone(where, spec, fetches, args.workers))
    local = max(rates["local files"])
    rows = [[label, f"{max(found):.1f}", f"{max(found) / local:.2f}x"] for label, found in rates.items()]
    print(common.table(["input alone", "images/s (best)", "of local files"], rows))
    one, many = max(rates["store, 1 GET at a time"]), max(rates["store, 16 GETs at once"])
    ceiling = (f"; ceiling of one at a time: {args.workers / (args.round_trip_ms / 1000):.0f} images/s "
               f"({args.workers} workers / round trip)" if args.round_trip_ms > 0 else "")
    print(f"16 GETs at once: {many / one:.2f}x one at a time{ceiling}")


if __name__ == "__main__":
    main()
