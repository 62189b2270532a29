"""Whole camera photos segmented at their original size: end to end, and where the time of one photo goes.

    python benchmarks/bench_segment_photos.py [-n 16] [--photos ../shared/data/camera-photos] [--model DIR]

The camera photos (3-16 MP, two HEIF) cycled to n, `mv2batch segment` (fp32 default, the paper protocol: short
side 512, no crop, masks at the original size). End to end runs in a child of its own (images/s, wall, peak RSS
of the main process and of the process tree with the loader workers). The stages run in another child, one photo
at a time in one thread of work: decode + resize (what a worker does), the model, upsampling + argmax to the
original size, the class pixel counts and the PNG encoding of the mask; they also check that the mask equals
transformers' own post-processing (one F.interpolate of all classes, then argmax) pixel for pixel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

SCRIPT = Path(__file__).resolve()
CAMERA = common.REPO.parent / "shared" / "data" / "camera-photos"
STAGES = ["decode + resize", "model", "upsample + argmax", "class counts", "PNG encoding"]


def end_to_end(spec: dict, clock: common.Clock) -> dict:
    """mv2batch.run over the folder, as a user would call it."""
    import mv2batch
    from mv2batch.config import RunConfig

    rss = common.TreeRss()

    def progress(update) -> None:
        if update.done == 0 and clock.ready_s is None:
            clock.ready()
        elif update.done:
            clock.mark(update.done)

    config = RunConfig(task="segment", source="folder", input=spec["images"], out=Path(spec["out"]),
                       model=spec["model"], device="cpu", dtype="fp32", overwrite=True)
    report = mv2batch.run(config, progress)
    return {"images": report.ran_now, "errors": report.n_errors, "tree_rss_mb": rss.stop()}


def stages(spec: dict, clock: common.Clock) -> dict:
    """Each stage of each photo timed on its own, and the mask checked against transformers' post-processing."""
    import torch
    import torch.nn.functional as F

    from mv2batch.loading.decode import decode_image
    from mv2batch.model import checkpoints
    from mv2batch.model.device import PixelStage
    from mv2batch.tasks.masks import encode_png
    from mv2batch.tasks.postprocess import class_counts, upsample_argmax

    folder, _, preprocessing = common.task_preprocessing(spec)
    model = checkpoints.load_weights(folder, "segment", spec["model"])
    stage = PixelStage(preprocessing.norm, torch.device("cpu"), torch.float32)
    clock.ready()
    rows, identical = [], 0
    with torch.inference_mode():
        for path in map(Path, spec["photos"]):
            times, started = [], time.perf_counter()

            def lap() -> None:
                nonlocal started
                times.append(time.perf_counter() - started)
                started = time.perf_counter()

            decoded = decode_image(path.read_bytes())
            resized = torch.from_numpy(preprocessing.resize_crop(decoded.image).copy())[None]
            lap()
            logits = model(pixel_values=stage(resized)).logits[0]
            lap()
            mask = upsample_argmax(logits, decoded.height, decoded.width)
            lap()
            class_counts(mask, logits.shape[0])
            lap()
            encode_png(mask.numpy())
            lap()
            full = F.interpolate(logits[None], size=(decoded.height, decoded.width), mode="bilinear",
                                 align_corners=False)[0].argmax(dim=0)
            identical += bool(torch.equal(full, mask.long()))
            del full
            rows.append({"photo": path.name, "size": f"{decoded.width}x{decoded.height}", "times": times})
    return {"images": len(rows), "rows": rows, "identical": identical}


MEASUREMENTS = {"e2e": end_to_end, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=CAMERA)
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("--model")
    parser.add_argument("--wait-idle", type=float, default=120)
    parser.add_argument("--rounds", type=int, default=1, help="end-to-end runs (the machine is noisy)")
    parser.add_argument("--no-stages", action="store_true", help="end to end only")
    args = parser.parse_args()
    photos = common.source_photos(args.photos)
    model, how = common.checkpoint(args.model, "segment", common.DEFAULT_PHOTOS)
    folder = common.image_folder(args.photos, args.n)
    print(f"{common.machine()}\n{how}\n{args.n} photos cycled from {args.photos}", flush=True)
    spec = {"task": "segment", "model": model, "images": str(folder), "out": str(common.CACHE / "out-segment-photos"),
            "photos": [str(p) for p in photos]}
    runs = [common.run_child(SCRIPT, "e2e", "mv2batch segment, fp32 default", "fp32", spec, args.wait_idle)
            for _ in range(args.rounds)]
    if not args.no_stages:
        report_stages(common.run_child(SCRIPT, "stages", "stages, one photo at a time", "fp32", spec, args.wait_idle))
    report_end_to_end(runs)


def report_stages(parts: common.Result) -> None:
    rows = parts.data["rows"]
    table = [[r["photo"], r["size"], *[f"{1000 * t:.0f}" for t in r["times"]], f"{1000 * sum(r['times']):.0f}"]
             for r in rows]
    totals = [sum(r["times"][i] for r in rows) for i in range(len(STAGES))]
    table.append(["all", "", *[f"{1000 * t:.0f}" for t in totals], f"{1000 * sum(totals):.0f}"])
    table.append(["share", "", *[f"{100 * t / sum(totals):.0f}%" for t in totals], "100%"])
    print("\n" + common.table(["photo", "size", *[f"{s} ms" for s in STAGES], "sum ms"], table))
    print(f"\nmasks equal to one F.interpolate of all classes + argmax: {parts.data['identical']} / {len(rows)}")


def report_end_to_end(runs: list[common.Result]) -> None:
    for e2e in runs:
        work_s = e2e.wall_s - (e2e.data["ready_s"] or 0)
        print(f"end to end: {e2e.data['images']} photos, {e2e.data['errors']} errors, wall {e2e.wall_s:.1f} s "
              f"(model ready at {e2e.data['ready_s']:.1f} s), {e2e.data['images'] / work_s:.2f} images/s after it; "
              f"peak RSS {e2e.data['peak_rss_mb']:.0f} MB main process, {e2e.data['tree_rss_mb']:.0f} MB with the "
              f"workers")


if __name__ == "__main__":
    common.child_main(MEASUREMENTS) if common.is_child() else main()
