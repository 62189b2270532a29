"""Camera photos: `--decode exact` against `--decode fast`, end to end (fp32 and bf16) and the input alone, in one
run; what fast changes in the model input (PSNR, mean absolute difference) and in the predictions.

    python benchmarks/bench_decode.py -n 200 [--photos ../shared/data/camera-photos] [--model DIR]

Two sets, each the camera photos cycled to n: the six JPEGs (what fast speeds up) and all eight (with the two
HEIF, which fast decodes as exact does). Runs go in turns in this process; the input alone is decode + EXIF +
the protocol's resize / crop of every photo in one process, no model. Agreement is measured on the random
calibrated checkpoint: a trained model's agreement is the one that matters, and it is higher (random weights
have no invariance to a slightly different input).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

CAMERA = common.REPO.parent / "shared" / "data" / "camera-photos"
BOUND = 3.0  # fast end to end in bf16 at least this many times exact, on the JPEGs


def cycled(photos: list[Path], n: int, name: str) -> Path:
    """A folder of n photos cycling the given ones (hard links)."""
    folder = common.CACHE / f"camera-{name}-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / f"{i:05d}_{photos[i % len(photos)].name}"
        if not target.exists():
            os.link(photos[i % len(photos)], target)
    return folder


def end_to_end(folder: Path, model: str, mode: str, dtype: str) -> tuple[float, Path]:
    import mv2batch
    from mv2batch.config import RunConfig

    out = common.CACHE / f"decode-out-{folder.name}-{mode}-{dtype}"
    config = RunConfig(task="classify", source="folder", input=str(folder), out=out, model=model, device="cpu",
                       dtype=dtype, decode=mode, overwrite=True)
    started = time.perf_counter()
    report = mv2batch.run(config)
    assert report.n_errors == 0, report.n_errors
    return report.ran_now / (time.perf_counter() - started), out


def resize_of(model: str):
    from mv2batch.loading.preprocess import hf_preprocessing
    from mv2batch.model.checkpoints import load_processor

    return hf_preprocessing(load_processor(Path(model), model)).resize_crop


def input_alone(photos: list[Path], resize, mode: str) -> float:
    from mv2batch.loading.decode import decode_image

    started = time.perf_counter()
    for photo in photos:
        resize(decode_image(photo, fast=resize if mode == "fast" else None).image)
    return len(photos) / (time.perf_counter() - started)


def input_difference(photos: list[Path], resize) -> list[tuple[str, float, float]]:
    """(name, mean absolute difference, PSNR dB) of fast's model input (uint8 after resize / crop) against exact."""
    from mv2batch.loading.decode import decode_image

    found = []
    for photo in photos:
        exact = resize(decode_image(photo).image).astype(np.float64)
        fast = resize(decode_image(photo, fast=resize).image).astype(np.float64)
        mse = float(np.mean((exact - fast) ** 2))
        found.append((photo.name, float(np.mean(np.abs(exact - fast))),
                      float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)))
    return found


def agreement(exact_out: Path, fast_out: Path) -> tuple[float, float, float]:
    """Top-1 equal, top-5 sets equal (shares of images), largest top-1 probability difference."""
    import pyarrow.parquet as pq

    rows = [sorted(pq.read_table(out / "predictions").to_pylist(), key=lambda r: r["id"])
            for out in (exact_out, fast_out)]
    pairs = list(zip(*rows))
    top1 = np.mean([a["topk_ids"][0] == b["topk_ids"][0] for a, b in pairs])
    top5 = np.mean([set(a["topk_ids"]) == set(b["topk_ids"]) for a, b in pairs])
    gap = max(abs(a["topk_scores"][0] - b["topk_scores"][0]) for a, b in pairs)
    return float(top1), float(top5), float(gap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=CAMERA)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--model")
    args = parser.parse_args()

    from mv2batch.inputs.sources import list_images

    names, _ = list_images(args.photos)
    photos = [args.photos / name for name in names]
    jpegs = [p for p in photos if p.suffix.lower() in (".jpg", ".jpeg")]
    model, how = common.checkpoint(args.model, "classify", common.DEFAULT_PHOTOS)
    resize = resize_of(model)
    print(f"{common.machine()}\n{how}\nphotos: {len(photos)} ({len(jpegs)} JPEG) from {args.photos}, cycled to "
          f"{args.n}; protocol resize: shortest edge {resize.shortest_edge}, crop {resize.crop_height}", flush=True)
    sets = {"JPEGs": cycled(jpegs, args.n, "jpeg"), "all 8": cycled(photos, args.n, "all")}
    runs = [("JPEGs", dtype, mode) for dtype in ("fp32", "bf16") for mode in ("exact", "fast")]
    runs += [("all 8", "bf16", mode) for mode in ("exact", "fast")]
    rates, outs = {}, {}
    for key in runs:
        rates[key], outs[key] = end_to_end(sets[key[0]], model, key[2], key[1])
        print(f"  {key[0]} {key[1]} {key[2]}: {rates[key]:.2f} img/s", flush=True)
    alone = {(name, mode): input_alone(sorted(sets[name].iterdir())[:40], resize, mode)
             for name in sets for mode in ("exact", "fast")}
    rows = []
    for name, dtype, mode in runs:
        exact = rates[(name, dtype, "exact")]
        rate = rates[(name, dtype, mode)]
        rows.append([name, dtype, mode, f"{rate:.2f}", f"{rate / exact:.2f}x", f"{alone[(name, mode)]:.2f}"])
    print(common.table(["photos", "dtype", "decode", "end to end img/s", "of exact", "input alone img/s (1 process)"],
                       rows))
    differences = input_difference(photos, resize)
    print(common.table(["photo", "mean abs diff (0-255)", "PSNR dB"],
                       [[n, f"{d:.3f}", f"{p:.1f}"] for n, d, p in differences]))
    for dtype in ("fp32", "bf16"):
        top1, top5, gap = agreement(outs[("JPEGs", dtype, "exact")], outs[("JPEGs", dtype, "fast")])
        print(f"fast against exact, {dtype}, JPEGs: top-1 equal {top1:.1%}, top-5 sets equal {top5:.1%}, largest "
              f"top-1 probability difference {gap:.4f} (random calibrated checkpoint)")
    speedup = rates[("JPEGs", "bf16", "fast")] / rates[("JPEGs", "bf16", "exact")]
    verdict = "MET" if speedup >= BOUND else "NOT MET"
    print(f"fast / exact end to end, bf16, JPEGs: {speedup:.2f}x (bound {BOUND:.0f}x): {verdict}")


if __name__ == "__main__":
    main()
