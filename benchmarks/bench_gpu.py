"""GPU figures: MobileViTV2 widths 0.5 / 1.0 / 2.0 on one CUDA device, mv2batch vs transformers.pipeline vs the model.

    python benchmarks/bench_gpu.py --images DIR -n 10000 --widths 0.5,1.0,2.0 --json gpu.json

Per width (random calibrated checkpoints of that width, as the CPU benchmarks use): the model alone on ready
tensors on the GPU (the compute limit) per dtype at a batch that fills the device, mv2batch.run end to end per
dtype, transformers.pipeline("image-classification", batch_size=32) on the same photos, and the agreement of
mv2batch's top 5 with transformers' own fp32 model on the same GPU. Then, for width 1.0: a batch-size sweep,
channels-last and cudnn.benchmark on and off, the loader alone (the input limit) at two worker counts,
segmentation end to end against pipeline("image-segmentation"), and torch.compile.

Unlike the CPU benchmarks this runs in one process (GPU time, not the CPU-side RSS, is what is measured here) and
prints each result as it comes, appending it to --json: a run cut short by a time limit still reports what it
measured. --budget-s stops starting new measurements once that much time has passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (the benchmarks folder is not a package)
from bench_classify import agreement, read_topk  # noqa: E402

STARTED = time.time()
RESULTS: list[dict] = []


# ---- measurements ------------------------------------------------------------------------------------------


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_alone(folder: str, device: Any, dtype_name: str, batch: int, seconds: float, speedups: bool | None = None,
                channels_last: bool | None = None, compile: bool = False, cudnn_benchmark: bool = False,
                photos: Path | None = None) -> dict:
    """Images/s of the model on one ready batch on the device (real photos, repeated), forward passes queued
    back to back and the device synchronised at the end: the compute limit."""
    import torch

    from mv2batch.model.device import float32_math

    spec = {"model": folder, "task": "classify", "images": str(photos), "device": str(device), "dtype": dtype_name,
            "speedups": speedups, "channels_last": channels_last, "compile": compile}
    torch.backends.cudnn.benchmark = cudnn_benchmark
    _, _, preprocessing = common.task_preprocessing(spec)
    uint8 = common.ready_pixels(spec, preprocessing, 64)
    uint8 = uint8.repeat((batch + len(uint8) - 1) // len(uint8), 1, 1, 1)[:batch]
    placed = time.perf_counter()
    placed_model = common.placed_model(spec, Path(folder))
    module, dtype = placed_model.module, placed_model.dtype
    stage = common.pixel_stage(spec, placed_model, preprocessing)
    pixels = stage(uint8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), float32_math(device, dtype):  # fp32 in IEEE float32, as mv2batch.run computes it
        for _ in range(3):  # compiles (with --compile), autotunes (cudnn.benchmark), warms the allocator
            _ = module(pixel_values=pixels).logits
        sync(device)
        first_s = time.perf_counter() - placed
        once = time.perf_counter()
        _ = module(pixel_values=pixels).logits
        sync(device)
        iterations = max(3, int(seconds / max(1e-4, time.perf_counter() - once)))
        timed = time.perf_counter()
        for _ in range(iterations):
            _ = module(pixel_values=pixels).logits
        sync(device)
        elapsed = time.perf_counter() - timed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    torch.backends.cudnn.benchmark = False
    return {"images_per_s": batch * iterations / elapsed, "iterations": iterations, "ready_s": first_s,
            "peak_gpu_gib": peak, "channels_last": stage.channels_last}


def _timed(measure: Callable[[dict, common.Clock], dict], spec: dict) -> dict:
    """One of common's measurements, run here: its rate from the first batch on, its wall and start-up time."""
    clock = common.Clock(time.time())
    result = measure(spec, clock)
    wall = clock.now()
    return {**result, "images_per_s": common.steady_rate(clock.marks, result["images"], wall), "wall_s": wall,
            "ready_s": clock.ready_s}


def end_to_end(folder: str, task: str, images: Path, device: Any, dtype_name: str, batch: int | None,
               workers: int | None) -> dict:
    """mv2batch.run over the folder, as a user runs it (common.mv2batch_run)."""
    out = common.CACHE / f"gpu-out-{task}"
    shutil.rmtree(out, ignore_errors=True)
    return _timed(common.mv2batch_run, {"task": task, "images": str(images), "out": str(out), "model": folder,
                                        "device": str(device), "dtype": dtype_name, "batch_size": batch,
                                        "workers": workers})


def loader_alone(folder: str, images: Path, device: Any, batch: int, workers: int) -> dict:
    """mv2batch's loader and the pixel stage on the device (common.input_limit): the input limit."""
    return _timed(common.input_limit, {"task": "classify", "images": str(images), "model": folder,
                                       "device": str(device), "dtype": "fp32", "batch_size": batch,
                                       "workers": workers})


def pipeline_run(folder: str, task: str, images: Path, device: Any, batch: int, count: int) -> dict:
    """transformers.pipeline(task, batch_size=batch) on the device over the first count photos, as its users run it."""
    from transformers import pipeline

    name = "image-classification" if task == "classify" else "image-segmentation"
    started = time.time()
    runner = pipeline(name, model=folder, device=device, batch_size=batch)
    paths = [str(p) for p in common.source_photos(images)[:count]]
    ready = time.time() - started
    extra = {"top_k": 5} if task == "classify" else {"subtask": "semantic"}
    topk, marks = {}, []
    label2id = runner.model.config.label2id
    for done, (path, predictions) in enumerate(zip(paths, runner((p for p in paths), **extra)), start=1):
        if task == "classify":
            topk[Path(path).name] = ([label2id[p["label"]] for p in predictions], [p["score"] for p in predictions])
        if done % batch == 0 or done == len(paths):
            marks.append((time.time() - started, done))
    wall = time.time() - started
    return {"images_per_s": common.steady_rate(marks, len(paths), wall), "images": len(paths), "wall_s": wall,
            "ready_s": ready, "processor": type(runner.image_processor).__name__, "topk": topk}


def transformers_topk(folder: str, images: Path, device: Any, count: int, batch: int = 32, ieee: bool = True) -> dict:
    """transformers' own fp32 model on the device, fed by its PIL processor (mv2batch's promise), top 5 per photo.

    ieee: in IEEE float32, as mv2batch computes fp32; else with PyTorch's defaults (TF32 cuDNN convolutions).
    """
    import contextlib

    import torch
    from PIL import Image

    from mv2batch.model import checkpoints
    from mv2batch.model.device import float32_math
    from mv2batch.tasks.postprocess import softmax_topk

    processor = checkpoints.load_processor(Path(folder), folder)
    model = checkpoints.load_weights(Path(folder), "classify", folder).to(device)
    paths = common.source_photos(images)[:count]
    topk = {}
    with torch.inference_mode(), (float32_math(device, torch.float32) if ieee else contextlib.nullcontext()):
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            photos = [Image.open(p).convert("RGB") for p in chunk]
            pixels = processor(images=photos, return_tensors="pt")["pixel_values"].to(device)
            ids, scores = softmax_topk(model(pixel_values=pixels).logits, 5)
            for path, i, s in zip(chunk, ids.tolist(), scores.tolist()):
                topk[path.name] = (i, s)
    return topk


# ---- bookkeeping -------------------------------------------------------------------------------------------


def record(name: str, args: argparse.Namespace, measure: Callable[[], dict], **labels: Any) -> dict | None:
    """Run one measurement unless the time budget is spent; print and keep its result, or the error it raised."""
    if args.budget_s and time.time() - STARTED > args.budget_s:
        print(f"  skipped (budget spent): {name} {labels}", flush=True)
        return None
    try:
        result = {"name": name, **labels, **measure()}
    except Exception as exc:  # one failed measurement must not cost the others
        traceback.print_exc()
        result = {"name": name, **labels, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        _free_device_memory()
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k not in ("topk", "out")}
    print(f"[{time.time() - STARTED:6.1f} s] {json.dumps(shown)}", flush=True)
    RESULTS.append({k: v for k, v in result.items() if k != "topk"})
    if args.json:
        args.json.write_text(json.dumps({"machine": MACHINE, "results": RESULTS}, indent=1, default=str))
    return result


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_machine(device: Any) -> dict:
    import torch

    about = {"host": common.machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        about.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                     matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return about


MACHINE: dict = {}


# ---- the plan ----------------------------------------------------------------------------------------------


def classify_width(args: argparse.Namespace, device: Any, width: float, images: Path) -> None:
    """The figures the issue asks for, for one width: model alone, end to end, pipeline, agreement."""
    folder, _ = common.checkpoint(None, "classify", args.images, width=width)
    for dtype in args.dtypes:
        record("model alone", args, lambda: model_alone(folder, device, dtype, args.batch_size, args.seconds,
                                                         photos=args.images),
               width=width, dtype=dtype, batch=args.batch_size)
    outs = {}
    for dtype in args.e2e_dtypes:
        result = record("mv2batch.run", args, lambda: end_to_end(folder, "classify", images, device, dtype,
                                                                 args.batch_size, args.workers),
                        width=width, dtype=dtype, batch=args.batch_size, workers=args.workers or "default")
        if result and "out" in result:
            outs[dtype] = read_topk(result["out"])
    piped = record("transformers.pipeline", args, lambda: pipeline_run(folder, "classify", images, device, 32,
                                                                         args.pipeline_n),
                   width=width, dtype="fp32", batch=32)
    record("agreement", args, lambda: _agreements(folder, images, device, args.agreement_n, outs, piped),
           width=width)


def _agreements(folder: str, images: Path, device: Any, count: int, outs: dict, piped: dict | None) -> dict:
    reference = transformers_topk(folder, images, device, count)
    found = {f"mv2batch {dtype} vs transformers fp32 (IEEE)": _agreement(got, reference) for dtype, got in outs.items()}
    default_math = transformers_topk(folder, images, device, count, ieee=False)
    found["transformers fp32, PyTorch's default math (TF32 convolutions on CUDA) vs IEEE"] = _agreement(default_math,
                                                                                                       reference)
    if piped and piped.get("topk"):
        shared = {name: piped["topk"][name] for name in reference if name in piped["topk"]}
        found["pipeline (its default processor and math) vs transformers fp32"] = _agreement(
            shared, {name: reference[name] for name in shared})
    return {"photos": len(reference), "pairs": found}


def _agreement(got: dict, reference: dict) -> dict:
    max_diff, top1, top5 = agreement(got, reference)
    return {"max_abs_prob_diff": max_diff, "top1": top1, "top5": top5}


def width_one_studies(args: argparse.Namespace, device: Any, images: Path) -> None:
    """For width 1.0: what fills the device, which layout and cuDNN setting pays, where the input limit is."""
    folder, _ = common.checkpoint(None, "classify", args.images, width=1.0)
    for batch in args.sweep:
        record("model alone", args, lambda: model_alone(folder, device, "bf16", batch, args.seconds,
                                                         photos=args.images), width=1.0, dtype="bf16", batch=batch)
    for dtype, speedups in (("fp32", None), ("fp32", True), ("bf16", None)):
        for channels_last in (False, True):
            record("model alone", args, lambda: model_alone(folder, device, dtype, args.batch_size, args.seconds,
                                                             speedups=speedups, channels_last=channels_last,
                                                             photos=args.images),
                   width=1.0, dtype=dtype, batch=args.batch_size, speedups=speedups, channels_last=channels_last)
    for dtype in ("fp32", "bf16"):
        record("model alone", args, lambda: model_alone(folder, device, dtype, args.batch_size, args.seconds,
                                                         cudnn_benchmark=True, photos=args.images),
               width=1.0, dtype=dtype, batch=args.batch_size, cudnn_benchmark=True)
    record("model alone", args, lambda: model_alone(folder, device, "fp32", args.batch_size, args.seconds,
                                                     speedups=False, photos=args.images),
           width=1.0, dtype="fp32", batch=args.batch_size, speedups="none (transformers as is)")
    cores = len(os.sched_getaffinity(0))
    for workers in sorted({min(8, cores - 1), max(1, cores - 1)}):
        record("loader alone", args, lambda: loader_alone(folder, images, device, args.batch_size, workers),
               width=1.0, batch=args.batch_size, workers=workers)
    record("mv2batch.run", args, lambda: end_to_end(folder, "classify", images, device, "bf16", args.batch_size,
                                                    max(1, cores - 1)),
           width=1.0, dtype="bf16", batch=args.batch_size, workers=max(1, cores - 1))


def segmentation(args: argparse.Namespace, device: Any) -> None:
    folder, _ = common.checkpoint(None, "segment", args.images, width=1.0)
    photos = common.image_folder(args.images, args.segment_n)
    for dtype in ("fp32", "bf16"):
        record("mv2batch.run segment", args, lambda: end_to_end(folder, "segment", photos, device, dtype, 32, None),
               width=1.0, dtype=dtype, batch=32, protocol="whole photo, short side 512")
    record("transformers.pipeline segment", args,
           lambda: pipeline_run(folder, "segment", photos, device, 8, args.segment_pipeline_n),
           width=1.0, dtype="fp32", batch=8, protocol="512x512 centre crop")


def compiled(args: argparse.Namespace, device: Any) -> None:
    folder, _ = common.checkpoint(None, "classify", args.images, width=1.0)
    for dtype in ("bf16", "fp32"):
        record("model alone", args, lambda: model_alone(folder, device, dtype, args.batch_size, args.seconds,
                                                         compile=True, photos=args.images),
               width=1.0, dtype=dtype, batch=args.batch_size, compile=True)


def batch_sizes(args: argparse.Namespace, device: Any, images: Path) -> None:
    """Width 1.0 end to end at mv2batch's default --batch-size 32 against 256 (which fills the device), and how
    much of mv2batch's fp32 distance to transformers is cuDNN choosing other kernels for other batch sizes."""
    folder, _ = common.checkpoint(None, "classify", args.images, width=1.0)
    outs = {}
    for dtype, _ in [(dtype, round) for round in range(args.rounds) for dtype in ("fp32", "bf16")]:
        for batch in (32, 256, None):  # None: mv2batch's default for this device
            result = record("mv2batch.run", args, lambda: end_to_end(folder, "classify", images, device, dtype,
                                                                     batch, args.workers),
                            width=1.0, dtype=dtype, batch=batch or "default", workers=args.workers or "default")
            if dtype == "fp32" and batch and batch not in outs and result and "out" in result:
                outs[batch] = read_topk(result["out"])
            if result and "out" in result:
                result["batch_chosen"] = json.loads((Path(result["out"]) / "run.json").read_text())["options"][
                    "batch_size"]
                print(f"  batch size in run.json: {result['batch_chosen']}", flush=True)
    record("agreement by batch size", args, lambda: _batch_agreements(folder, images, device, args.agreement_n, outs),
           width=1.0)


def _batch_agreements(folder: str, images: Path, device: Any, count: int, outs: dict) -> dict:
    references = {batch: transformers_topk(folder, images, device, count, batch=batch) for batch in (32, 256)}
    found = {f"mv2batch fp32 batch {mine} vs transformers fp32 batch {theirs}": _agreement(got, reference)
             for theirs, reference in references.items() for mine, got in outs.items()}
    found["transformers fp32 batch 256 vs batch 32"] = _agreement(references[256], references[32])
    return {"photos": count, "pairs": found}


def segment_model_alone(folder: str, photos: Path, device: Any, dtype_name: str, count: int) -> dict:
    """The segmentation model on ready tensors, each photo at its own shape, batched as mv2batch.run batches
    them (common.model_alone_over_shapes), the device synchronised before the clock stops: the compute limit
    of a whole-photo run."""
    spec = {"model": folder, "task": "segment", "images": str(photos), "device": str(device), "dtype": dtype_name,
            "batch_size": 32, "count": count}
    clock = common.Clock(time.time())
    result = common.model_alone_over_shapes(spec, clock)
    sync(device)
    seconds = clock.now() - clock.ready_s
    return {**result, "images_per_s": result["images"] / seconds, "timed_s": seconds}


def segment_limits(args: argparse.Namespace, device: Any) -> None:
    """Whole-photo segmentation: end to end per dtype against the model alone over the same shapes and the
    loader alone, to see which one bounds it."""
    from mv2batch.loading.resources import default_workers

    folder, _ = common.checkpoint(None, "segment", args.images, width=1.0)
    photos = common.image_folder(args.images, args.segment_n)
    for dtype in ("fp32", "bf16"):
        # Twice: the first pass meets each shape for the first time in this process (cuDNN picks and builds its
        # kernels per shape and dtype), the second finds them built.
        for passes in ("first", "second"):
            record("model alone segment", args,
                   lambda: segment_model_alone(folder, photos, device, dtype, args.segment_n),
                   width=1.0, dtype=dtype, batch=32, protocol="whole photo, short side 512", shapes_seen=passes)
        record("mv2batch.run segment", args, lambda: end_to_end(folder, "segment", photos, device, dtype, 32, None),
               width=1.0, dtype=dtype, batch=32, protocol="whole photo, short side 512")
    record("loader alone segment", args,
           lambda: _timed(common.input_limit, {"task": "segment", "images": str(photos), "model": folder,
                                               "device": str(device), "dtype": "fp32", "batch_size": 32,
                                               "workers": default_workers(device.type)}),
           width=1.0, batch=32, protocol="whole photo, short side 512")


def main() -> None:
    from mv2batch.errors import ConfigError
    from mv2batch.model.device import pick_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=common.DEFAULT_PHOTOS, help="photos, cycled up to -n")
    parser.add_argument("-n", type=int, default=10000, help="images per end-to-end classification run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--widths", default="1.0,0.5,2.0")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="model-alone dtypes per width")
    parser.add_argument("--e2e-dtypes", default="fp32,bf16", help="end-to-end dtypes per width")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sweep", default="32,128,512,1024", help="width 1.0 bf16 model-alone batch sizes")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: mv2batch's choice)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per model-alone row")
    parser.add_argument("--pipeline-n", type=int, default=1000)
    parser.add_argument("--agreement-n", type=int, default=256)
    parser.add_argument("--segment-n", type=int, default=600)
    parser.add_argument("--segment-pipeline-n", type=int, default=100)
    parser.add_argument("--parts", default="widths,studies,segment,compile",
                        help="any of widths, studies, segment, compile, batch-sizes, segment-limits")
    parser.add_argument("--rounds", type=int, default=1, help="end-to-end rounds of the batch-sizes part")
    parser.add_argument("--budget-s", type=float, default=0, help="start no measurement after this many seconds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.dtypes, args.e2e_dtypes = args.dtypes.split(","), args.e2e_dtypes.split(",")
    args.sweep = [int(b) for b in args.sweep.split(",") if b]
    try:
        device = pick_device(args.device)
    except ConfigError as exc:
        sys.exit(f"bench_gpu: {exc}")
    MACHINE.update(describe_machine(device))
    print(json.dumps(MACHINE), flush=True)
    images = common.image_folder(args.images, args.n)
    parts = args.parts.split(",")
    if "widths" in parts:
        for width in [float(w) for w in args.widths.split(",")]:
            classify_width(args, device, width, images)
    if "studies" in parts:
        width_one_studies(args, device, images)
    if "segment" in parts:
        segmentation(args, device)
    if "compile" in parts:
        compiled(args, device)
    if "batch-sizes" in parts:
        batch_sizes(args, device, images)
    if "segment-limits" in parts:
        segment_limits(args, device)
    print(summary(), flush=True)


def summary() -> str:
    rows = []
    for r in RESULTS:
        what = ", ".join(f"{k}={r[k]}" for k in ("width", "dtype", "batch", "workers", "speedups", "channels_last",
                                                  "cudnn_benchmark", "compile", "protocol", "shapes_seen") if k in r)
        rate = f"{r['images_per_s']:.0f}" if "images_per_s" in r else r.get("error", "")[:60]
        extra = r.get("pairs") or {k: r[k] for k in ("wall_s", "ready_s", "peak_gpu_gib", "processor") if k in r}
        rows.append([r["name"], what, rate, json.dumps(extra, default=lambda v: round(v, 4))[:160]])
    return common.table(["measurement", "settings", "images/s", "more"], rows)


if __name__ == "__main__":
    main()
