"""Segmentation speed: transformers.pipeline("image-segmentation") vs mv2batch end to end, model alone, input alone.

    python benchmarks/bench_segment.py --images DIR -n 200 [--model PATH]

Without --model: a random calibrated MobileViTV2-1.0 + DeepLabV3 (21 classes, 512 short side). The pipeline
centre-crops to 512x512; mv2batch segments the whole photo (short side 512), so it does more work per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)

SCRIPT = Path(__file__).resolve()
REFERENCE_PHOTOS = 16


# ---- measurements (children) -------------------------------------------------------------------------------


def pipeline_run(spec: dict, clock: common.Clock) -> dict:
    """transformers.pipeline("image-segmentation", batch_size=...) over the same files: a mask per class present."""
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=spec["model"], device="cpu", batch_size=spec["batch_size"])
    paths = [str(p) for p in common.source_photos(Path(spec["images"]))]
    clock.ready()
    outputs = segmenter((p for p in paths), subtask="semantic")  # a generator in, so results stream out
    for done, _ in enumerate(outputs, start=1):
        if done % spec["batch_size"] == 0 or done == len(paths):
            clock.mark(done)
    return {"images": len(paths)}


def reference_masks(spec: dict, clock: common.Clock) -> dict:
    """transformers' model as is, fp32, one photo at a time, on mv2batch's inputs: the masks to agree with."""
    import numpy as np
    import torch

    from mv2batch.loading.decode import decode_image
    from mv2batch.model import checkpoints
    from mv2batch.model.device import PixelStage
    from mv2batch.tasks.postprocess import upsample_argmax

    folder, _, preprocessing = common.task_preprocessing(spec)
    model = checkpoints.load_weights(folder, "segment", spec["model"])
    stage = PixelStage(preprocessing.norm, torch.device("cpu"), torch.float32)
    clock.ready()
    masks = {}
    with torch.inference_mode():
        for path in common.source_photos(Path(spec["images"]))[:REFERENCE_PHOTOS]:
            decoded = decode_image(path.read_bytes())
            pixels = stage(torch.from_numpy(preprocessing.resize_crop(decoded.image))[None])
            logits = model(pixel_values=pixels).logits[0]
            masks[path.name] = upsample_argmax(logits, decoded.height, decoded.width).numpy()
    np.savez_compressed(spec["masks"], **masks)
    return {"images": len(masks)}


MEASUREMENTS = {**common.SHARED_MEASUREMENTS, "pipeline": pipeline_run, "reference": reference_masks}


# ---- agreement ---------------------------------------------------------------------------------------------


def mask_agreement(out: str, reference_file: str) -> tuple[float, int, int]:
    """(share of pixels equal, images whose masks are identical, images compared) against the reference masks."""
    import numpy as np
    import pyarrow.parquet as pq

    from mv2batch.tasks.masks import decode_png

    reference = np.load(reference_file)
    rows = pq.read_table(Path(out) / "predictions", columns=["id", "mask_png"]).to_pylist()
    got = {row["id"]: decode_png(row["mask_png"]) for row in rows if row["id"] in reference.files}
    equal = sum(int((got[name] == reference[name]).sum()) for name in got)
    pixels = sum(reference[name].size for name in got)
    identical = sum(bool((got[name] == reference[name]).all()) for name in got)
    return equal / pixels, identical, len(got)


# ---- the parent --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, default_n=200, default_batch=32, default_model_images=96)
    args = parser.parse_args()
    model, how = common.checkpoint(args.model, "segment", args.images)
    print(f"{common.machine()}\n{how}", flush=True)
    folder = common.image_folder(args.images, args.n)
    # workers None: mv2batch's choice, which depends on the mode (decoding between passes or beside them)
    spec = lambda **extra: {"task": "segment", "model": model, "images": str(folder), "batch_size": args.batch_size,
                            "workers": args.workers, **extra}
    child = lambda name, label, dtype, s: common.run_child(SCRIPT, name, label, dtype, s, args.wait_idle)
    print(f"{args.n} images from {args.images}, batch {args.batch_size}", flush=True)
    pipe = child("pipeline", f"transformers.pipeline (batch {args.batch_size})", "fp32", spec())
    e2e = {}
    for key, label in E2E.items():
        protocol, dtype, speedups = key
        out = str(common.CACHE / f"out-segment-{protocol}-{dtype}-{speedups}")
        e2e[key] = child("mv2batch", f"mv2batch.run, {label}, {PROTOCOLS[protocol]}", dtype,
                         spec(dtype=dtype, out=out, preprocess=protocol, speedups=speedups))
    alone = {}
    for key, label in ALONE.items():
        protocol, dtype, speedups = key
        # Whole photos come in many shapes, some slower per pixel than others, and a random checkpoint's speed
        # depends a little on the pixels (denormal activations): the model alone runs over the first photos of
        # the end-to-end runs, each at its own resized shape, batched as mv2batch.run batches them.
        alone[key] = child("model", f"model alone, {label}, {PROTOCOLS[protocol]}", dtype, spec(
            dtype=dtype, count=args.model_images, preprocess=protocol, speedups=speedups, own_shapes=True))
    loader = child("input", "input alone (decode + preprocess), whole photo, one worker", "fp32",
                   spec(dtype="fp32", workers=1))
    masks = str(common.CACHE / "segment-reference.npz")
    child("reference", "reference masks (transformers fp32)", "fp32", spec(masks=masks))
    report(args, how, folder, pipe, e2e, alone, loader, masks)


PROTOCOLS = {"paper": "whole photo", "hf": "512 crop"}
# (protocol, dtype, RunConfig.speedups) -> label; speedups None is mv2batch's default: exact rewrites for fp32,
# all of them for bf16.
E2E = {("paper", "fp32", None): "default (exact)", ("paper", "fp32", True): "--speedups",
       ("paper", "bf16", None): "default (all)", ("hf", "fp32", None): "default (exact)",
       ("hf", "bf16", None): "default (all)"}
ALONE = {("paper", "fp32", None): "exact rewrites", ("paper", "fp32", True): "all speed-ups",
         ("paper", "bf16", None): "all speed-ups", ("hf", "fp32", None): "exact rewrites",
         ("hf", "bf16", None): "all speed-ups", ("hf", "fp32", False): "transformers as is"}


def mean_input_pixels(folder: Path, protocol: str) -> float:
    """Average pixels per model input: 512x512 for the crop; the whole photo resized to short side 512 otherwise."""
    from PIL import Image

    from mv2batch.loading.preprocess import ResizeCrop

    if protocol == "hf":
        return 512 * 512
    resize = ResizeCrop(shortest_edge=512, crop_height=None, crop_width=None, resample=2)
    sizes = [resize.output_size(*Image.open(p).size) for p in common.source_photos(folder)]
    return sum(w * h for w, h in sizes) / len(sizes)


def report(args, how, folder, pipe, e2e, alone, loader, masks) -> None:
    pixels = {protocol: mean_input_pixels(folder, protocol) for protocol in PROTOCOLS}
    rows = [(pipe, pixels["hf"], None, True)]
    rows += [(r, pixels[key[0]], alone.get(key), True) for key, r in e2e.items()]
    rows += [(r, r.data["pixels_per_image"], None, False) for r in alone.values()]
    rows += [(loader, pixels["paper"], None, False)]
    speed_rows = []
    for result, per_image, of_model, end_to_end in rows:
        share = f"{100 * result.steady / of_model.steady:.0f}%" if of_model else ""
        speed_rows.append([result.name, result.dtype, str(result.images), f"{result.steady * per_image / 1e6:.2f}",
                           *common.speed_columns(result, pipe, end_to_end), share])
    agree_rows = []
    for (protocol, _, _), result in e2e.items():
        if protocol == "paper":
            share, identical, compared = mask_agreement(result.data["out"], masks)
            agree_rows.append([f"{result.name} ({result.dtype})", f"{share:.6f}", f"{identical} / {compared}"])
    print("\n" + common.table(["run", "dtype", "images", "Mpx/s in", *common.SPEED_HEADERS, "of model alone"],
                              speed_rows))
    print("\n" + common.applied(list(e2e.values())))
    print(f"\nMask agreement with transformers' model as is (fp32), first {REFERENCE_PHOTOS} photos, original size:\n")
    print(common.table(["run", "pixels equal", "identical masks"], agree_rows))
    for protocol in PROTOCOLS:
        ratio = e2e[protocol, "fp32", None].steady / pipe.steady
        print(f"{'MET    ' if ratio >= 3 else 'NOT MET'} fp32 segmentation ({PROTOCOLS[protocol]}) >= 3x pipeline "
              f"in images/s, fp32 default: {ratio:.2f} "
              f"(in input pixels/s: {ratio * pixels[protocol] / pixels['hf']:.2f})")
    common.write_json(args.json, {"how": how, "machine": common.machine(), "speed": speed_rows,
                                  "agreement": agree_rows})


if __name__ == "__main__":
    common.child_main(MEASUREMENTS) if common.is_child() else main()
