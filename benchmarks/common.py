"""Shared benchmark machinery: inputs, checkpoints, one child process per measurement (own clock, peak RSS), tables."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "imagenet-photos"
CACHE = Path(tempfile.gettempdir()) / "mv2batch-bench"
IDLE_FRACTION = 0.9  # the machine counts as idle when at least this share of its CPU time is idle


# ---- inputs ------------------------------------------------------------------------------------------------


def source_photos(folder: Path) -> list[Path]:
    """The photos under folder, in mv2batch's order (sorted relative paths)."""
    from mv2batch.inputs.sources import list_images

    found, _ = list_images(folder)
    if not found:
        sys.exit(f"no images under {folder}")
    return [folder / name for name in found]


def image_folder(source: Path, n: int) -> Path:
    """A flat folder of exactly n images, cycling the source photos (hard links: no copies, same bytes)."""
    photos = source_photos(source)
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    folder = CACHE / f"images-{digest}-{n}"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        target = folder / f"{i:06d}_{photo.name}"
        if not target.exists():
            _link(photo, target)
    return folder


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system: a symbolic link reads the same bytes
        target.symlink_to(source.resolve())


def checkpoint(model: str | None, task: str, photos: Path, width: float = 1.0) -> tuple[str, str]:
    """The checkpoint to measure and how it was obtained; without --model, a calibrated random one built once."""
    if model:
        return model, f"checkpoint {model}"
    size, labels = ("full", 1000) if task == "classify" else ("full", 21)
    folder = CACHE / (f"random-{task}-{size}-{labels}" + (f"-w{width:g}" if width != 1.0 else ""))
    if not (folder / "model.safetensors").is_file():
        from PIL import Image

        from mv2batch.testing import make_checkpoint

        print(f"building a calibrated random MobileViTV2-{width:g} {task} checkpoint in {folder} ...", flush=True)
        calibration = [Image.open(p).convert("RGB") for p in source_photos(photos)[::50][:12]]
        make_checkpoint(folder, calibration, size=size, num_labels=labels, task=task, width=width)
    return str(folder), (f"random calibrated full-size checkpoint (mv2batch.testing.make_checkpoint, "
                         f"task={task}, num_labels={labels}, width {width:g}): no --model given")


class TreeRss:
    """Peak resident memory of this process and its descendants (loader workers), sampled in a thread."""

    def __init__(self, interval_s: float = 0.05):
        self.peak_kb, self.interval_s, self.running = 0, interval_s, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import os

        me = os.getpid()
        while self.running:
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(pid) for pid in _tree(me)))
            time.sleep(self.interval_s)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak_kb / 1024


def _tree(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pending += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return found


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0



# ---- the child side ----------------------------------------------------------------------------------------


class Clock:
    """Time stamps of a child, counted from the moment its parent spawned it."""

    def __init__(self, spawned: float):
        self.spawned = spawned
        self.ready_s: float | None = None
        self.marks: list[tuple[float, int]] = []

    def now(self) -> float:
        return time.time() - self.spawned

    def ready(self) -> None:
        """The model (or loader) is built: what follows is work on images."""
        self.ready_s = self.now()

    def mark(self, done: int) -> None:
        """done images have been completely processed."""
        self.marks.append((self.now(), done))


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM). ru_maxrss would report a forked parent's peak after exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_main(measurements: dict[str, Callable[[dict, Clock], dict]]) -> None:
    """Entry point of a child: run one named measurement, write its result as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec)
    clock = Clock(spec["spawned"])
    extra = measurements[args.child](spec, clock)
    result = {"ready_s": clock.ready_s, "marks": clock.marks, "peak_rss_mb": peak_rss_mb(), **extra}
    Path(spec["result"]).write_text(json.dumps(result))


def is_child() -> bool:
    return "--child" in sys.argv


# ---- the parent side ---------------------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine, in clock ticks."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_for_idle(limit_s: float) -> bool:
    """Wait until other processes leave the CPUs alone (the machine is shared); False if they never did."""
    deadline = time.time() + limit_s
    while True:
        busy0, total0 = _cpu_jiffies()
        time.sleep(2)
        busy1, total1 = _cpu_jiffies()
        if (busy1 - busy0) <= (1 - IDLE_FRACTION) * max(1, total1 - total0):
            return True
        if time.time() >= deadline:
            return False


@dataclass
class Result:
    """One measurement: the child's own numbers plus what the parent saw from outside."""

    name: str
    dtype: str
    data: dict
    wall_s: float
    cpu_s: float  # the child and its workers
    others_cpu_share: float  # the share of the machine other processes used meanwhile
    notes: list[str] = field(default_factory=list)
    rate: float | None = None  # set for a mean of several runs (see mean_of)

    @property
    def images(self) -> int:
        return self.data.get("images", 0)

    @property
    def steady(self) -> float:
        if self.rate is not None:
            return self.rate
        return steady_rate(self.data.get("marks", []), self.images, self.wall_s)


def mean_of(results: list[Result], name: str) -> Result:
    """One row for several runs of the same measurement: mean rate, wall and start-up; the highest peak RSS."""
    mean = lambda values: sum(values) / len(values)
    data = {**results[0].data, "ready_s": mean([r.data.get("ready_s") or 0 for r in results]),
            "peak_rss_mb": max(r.data["peak_rss_mb"] for r in results), "runs": [r.steady for r in results]}
    return Result(name, results[0].dtype, data, mean([r.wall_s for r in results]), mean([r.cpu_s for r in results]),
                  max(r.others_cpu_share for r in results), [n for r in results for n in r.notes],
                  rate=mean([r.steady for r in results]))


def steady_rate(marks: list, images: int, wall_s: float) -> float:
    """Images per second after the first batch (warm-up, lazy initialisation); the overall rate if too few marks."""
    if len(marks) >= 3:
        (t0, d0), (t1, d1) = marks[0], marks[-1]
        if t1 > t0 and d1 > d0:
            return (d1 - d0) / (t1 - t0)
    return images / wall_s if wall_s else float("nan")


def run_child(script: Path, name: str, label: str, dtype: str, spec: dict, idle_s: float) -> Result:
    """Run one measurement in a fresh interpreter, timing it from spawn to exit."""
    idle = wait_for_idle(idle_s) if idle_s > 0 else True
    with tempfile.TemporaryDirectory(prefix="mv2batch-bench-") as scratch:
        result_file = Path(scratch) / "result.json"
        busy0, total0 = _cpu_jiffies()
        spawned = time.time()
        full = {**spec, "spawned": spawned, "result": str(result_file), "scratch": scratch}
        process = subprocess.Popen([sys.executable, str(script), "--child", name, "--spec", json.dumps(full)],
                                   stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - spawned
        stderr = process.stderr.read()
        process.stderr.close()
        busy1, total1 = _cpu_jiffies()
        if status != 0 or not result_file.is_file():
            sys.exit(f"{label} failed:\n{stderr[-3000:]}")
        data = json.loads(result_file.read_text())
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, (busy1 - busy0) / ticks - cpu) / max(1e-9, (total1 - total0) / ticks)
    result = Result(label, dtype, data, wall, cpu, others)
    if not idle:
        result.notes.append("started while the machine was busy")
    print(f"  {label:<38} {result.steady:7.1f} img/s  wall {wall:6.1f} s  peak RSS {data['peak_rss_mb']:6.0f} MB"
          f"  others {100 * others:3.0f}%", flush=True)
    return result


def common_arguments(parser: argparse.ArgumentParser, default_n: int, default_batch: int,
                     default_model_images: int) -> None:
    """The options every benchmark script shares."""
    parser.add_argument("--images", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (cycled up to -n)")
    parser.add_argument("-n", type=int, default=default_n, help="images per end-to-end run")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a random calibrated full-size one)")
    parser.add_argument("--batch-size", type=int, default=default_batch)
    parser.add_argument("--model-images", type=int, default=default_model_images, help="images per model-alone run")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: mv2batch's choice)")
    parser.add_argument("--wait-idle", type=float, default=300,
                        help="before each run, wait up to this many seconds for other processes to go quiet")
    parser.add_argument("--json", type=Path, help="also write every result here")


# ---- measurements shared by both tasks (run in children) ---------------------------------------------------


def mv2batch_run(spec: dict, clock: Clock) -> dict:
    """mv2batch.run end to end (decode, model, post-process, Parquet), as a user would call it; what it applied is
    observed through the local engine's parts (the real steps, wrapped)."""
    from mv2batch.config import RunConfig
    from mv2batch.engines import local
    from mv2batch.runner.batch_loop import ProgressUpdate

    out = Path(spec["out"])
    config = RunConfig(task=spec["task"], source="folder", input=spec["images"], out=out, model=spec["model"],
                       device=spec.get("device", "cpu"), dtype=spec["dtype"], batch_size=spec["batch_size"],
                       workers=spec["workers"], preprocess=spec.get("preprocess"), overwrite=True,
                       speedups=spec.get("speedups"), compile=spec.get("compile", False),
                       embeddings=spec.get("embeddings", False))
    applied: dict = {}

    def progress(update: ProgressUpdate) -> None:
        if update.done == 0 and clock.ready_s is None:
            clock.ready()  # the model is placed and the loader is starting
        elif update.done:
            clock.mark(update.done)

    report = local.run(config, progress, _observing_parts(applied, spec.get("gate")))
    return {"images": report.ran_now, "errors": report.n_errors, "out": str(out), **applied}


def _observing_parts(seen: dict, gate: bool | None = None) -> Any:
    """The local engine's real steps, each recording into seen what it chose: the speed-ups applied (None:
    none), the pixels' layout, the loader's workers and whether they may decode between passes. gate True /
    False: where they may, they always / never do (no trial: gate_trial's two modes measured on their own)."""
    from dataclasses import replace

    from mv2batch.engines.local import LocalParts
    from mv2batch.loading.gate_trial import GateTrial
    from mv2batch.loading.resources import choose_loader_settings
    from mv2batch.runner.placement import place

    def placed(*args: Any) -> Any:
        placement = place(*args)
        speedups = placement.speedups
        seen.update(speedups=speedups.describe() if speedups else None,
                    channels_last_pixels=placement.pixel_stage.channels_last)
        return placement

    def planned(*args: Any) -> Any:
        plan = choose_loader_settings(*args)
        if gate is not None:
            plan = replace(plan, gate_trial=GateTrial(chosen=gate))
        seen.update(workers=plan.workers, decode_between_passes=plan.gate)
        return plan

    return LocalParts(place=placed, choose_loader_settings=planned)


def task_preprocessing(spec: dict) -> tuple[Path, Any, Any]:
    """(checkpoint folder, task object, preprocessing) exactly as mv2batch.run chooses them by default."""
    from mv2batch.model import checkpoints
    from mv2batch.tasks.classify import ClassifyTask
    from mv2batch.tasks.segment import SegmentTask

    folder = checkpoints.resolve_model(spec["model"]).folder
    labels = checkpoints.label_names(checkpoints.read_config(folder))
    task = (ClassifyTask if spec["task"] == "classify" else SegmentTask)(labels)
    protocol = spec.get("preprocess") or task.default_protocol
    processor = lambda: checkpoints.load_processor(folder, spec["model"])  # loaded only if the protocol needs it
    preprocessing = task.preprocessing(protocol, processor, spec["model"])
    return folder, task, preprocessing


def ready_pixels(spec: dict, preprocessing: Any, count: int) -> Any:
    """Up to count real photos of the commonest resized shape, decoded and resized as the workers do (uint8 NHWC)."""
    import numpy as np
    import torch

    from mv2batch.loading.decode import decode_image

    photos = source_photos(Path(spec["images"]))[: count * 8]
    arrays = [preprocessing.resize_crop(decode_image(p.read_bytes()).image) for p in photos]
    shapes = [a.shape for a in arrays]
    commonest = max(set(shapes), key=shapes.count)
    return torch.from_numpy(np.stack([a for a in arrays if a.shape == commonest][:count]))


def spec_device(spec: dict) -> Any:
    import torch

    return torch.device(spec.get("device", "cpu"))


@dataclass
class Placed:
    """A model placed as mv2batch.run places it: the module, its dtype, the speed-ups applied, its streams."""

    module: Any
    dtype: Any
    speedups: Any = None
    streams: Any = None


def placed_model(spec: dict, folder: Path) -> Placed:
    """The checkpoint rewritten, cast and placed as mv2batch.run does on spec's device (default the CPU);
    spec["channels_last"] overrides the layout chosen, spec["compile"] compiles as --compile does."""
    import torch

    from mv2batch.model import checkpoints
    from mv2batch.model.allocator import keep_freed_memory, limit_kernel_cache
    from mv2batch.model.device import pick_dtype
    from mv2batch.model.speedups import choose_speedups, optimize_for_inference

    device = spec_device(spec)
    dtype, compile = pick_dtype(spec["dtype"], device), spec.get("compile", False)
    module = checkpoints.load_weights(folder, spec["task"], spec["model"])
    chosen = choose_speedups(spec.get("speedups"), device, dtype, compile)  # as mv2batch.run chooses
    if chosen is None:
        return Placed(module.to(device=device, dtype=dtype), dtype)  # transformers' model as its users run it
    if device.type == "cpu":
        keep_freed_memory()  # as mv2batch.run does on the CPU
        limit_kernel_cache()
    optimized = optimize_for_inference(module, device, dtype, channels_last=spec.get("channels_last"),
                                       speedups=chosen, compile=compile)
    module = torch.compile(optimized.module) if compile else optimized.module
    return Placed(module, dtype, optimized.speedups, optimized.streams)


def pixel_stage(spec: dict, placed: Placed, preprocessing: Any) -> Any:
    """The pixel stage feeding the placed model on spec's device, in the layout the model was placed in."""
    from mv2batch.model.device import PixelStage
    from mv2batch.model.speedups import wants_channels_last_input

    return PixelStage(preprocessing.norm, spec_device(spec), placed.dtype, wants_channels_last_input(placed.speedups))


def model_alone(spec: dict, clock: Clock) -> dict:
    """The model on ready tensors (decoded, resized, normalised, cast, in its layout): the compute limit.

    One batch of the commonest shape, repeated; with spec["own_shapes"], the photos themselves, each at its own
    resized shape.
    """
    import torch

    from mv2batch.model.device import float32_math

    if spec.get("own_shapes"):
        return model_alone_over_shapes(spec, clock)
    folder, _, preprocessing = task_preprocessing(spec)
    uint8 = ready_pixels(spec, preprocessing, spec["batch_size"])
    placed = placed_model(spec, folder)
    module, dtype = placed.module, placed.dtype
    pixels = pixel_stage(spec, placed, preprocessing)(uint8)
    clock.ready()
    done = 0
    with torch.inference_mode(), float32_math(spec_device(spec), dtype):  # as mv2batch.run computes (CUDA fp32)
        while done < spec["count"]:
            module(pixel_values=pixels).logits.float()
            done += len(pixels)
            clock.mark(done)
    return {"images": done, "pixels_per_image": uint8.shape[1] * uint8.shape[2]}


def model_alone_over_shapes(spec: dict, clock: Clock) -> dict:
    """The model on the first count photos, each at its own resized shape, batched and run as mv2batch.run does
    (equal shapes next to each other, each shape group cut into the model's micro-batches, run on its streams
    where it has them, the next batch then started before the previous one is collected): the compute limit of
    a whole-photo run."""
    import numpy as np
    import torch

    from mv2batch.loading.decode import decode_image
    from mv2batch.loading.loader import grouped_batches
    from mv2batch.model.device import float32_math
    from mv2batch.model.speedups import micro_batch_images
    from mv2batch.model.streams import one_ahead, start_in_streams

    folder, _, preprocessing = task_preprocessing(spec)
    placed = placed_model(spec, folder)
    module, dtype = placed.module, placed.dtype
    stage = pixel_stage(spec, placed, preprocessing)
    arrays = [np.array(preprocessing.resize_crop(decode_image(p.read_bytes()).image))  # writable, for torch
              for p in source_photos(Path(spec["images"]))[: spec["count"]]]
    batches = []
    for indices in grouped_batches(range(len(arrays)), lambda i: arrays[i].shape, spec["batch_size"]):
        groups: dict[tuple, list] = {}
        for i in indices:
            groups.setdefault(arrays[i].shape, []).append(torch.from_numpy(arrays[i]))
        parts = []
        for tensors in groups.values():
            size = micro_batch_images(placed.speedups, *tensors[0].shape[:2]) or len(tensors)
            parts += [stage(torch.stack(tensors[i : i + size])) for i in range(0, len(tensors), size)]
        batches.append(parts)
    run = lambda pixels: module(pixel_values=pixels).logits.float()
    clock.ready()
    done = 0
    with torch.inference_mode(), float32_math(spec_device(spec), dtype):  # as mv2batch.run computes (CUDA fp32)
        started = ((start_in_streams(placed.streams, run, parts), sum(len(p) for p in parts)) for parts in batches)
        for results, images in one_ahead(started, ahead=placed.streams is not None):
            results()
            done += images
            clock.mark(done)
    return {"images": done, "pixels_per_image": sum(a.shape[0] * a.shape[1] for a in arrays) / len(arrays),
            "shapes": len({a.shape for a in arrays})}


def input_limit(spec: dict, clock: Clock) -> dict:
    """mv2batch's loader alone (decode, EXIF, RGB, resize, crop in workers; pinned for a GPU; the pixel stage on
    spec's device): the input limit."""
    import torch

    from mv2batch.inputs.sources import FolderSource
    from mv2batch.loading.loader import ImageDataset, make_loader
    from mv2batch.model.device import PixelStage, pick_dtype

    _, task, preprocessing = task_preprocessing(spec)
    source = FolderSource.open(spec["images"])
    device = spec_device(spec)
    host_pixels, norm = preprocessing.stages(flip_on_host=device.type == "cpu")  # as mv2batch.run splits them
    dataset = ImageDataset(source.read, host_pixels)
    batches = task.batches(range(len(source)), source.read, preprocessing.resize_crop, spec["batch_size"])
    # The layout of the model that pixel stage feeds: channels-last on the CPU (the all set), NCHW elsewhere.
    stage = PixelStage(norm, device, pick_dtype(spec["dtype"], device), device.type == "cpu")
    clock.ready()
    done = 0
    for batch in make_loader(dataset, iter(batches), spec["workers"], device.type == "cuda"):
        for _, pixels in batch.groups:
            stage(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done += len(batch.samples)
        clock.mark(done)
    return {"images": done}


SHARED_MEASUREMENTS = {"mv2batch": mv2batch_run, "model": model_alone, "input": input_limit}


# ---- reporting ---------------------------------------------------------------------------------------------


def machine() -> str:
    """One line about the CPU, memory and software the numbers come from."""
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    cores = len(os.sched_getaffinity(0))
    return (f"{cpu}, {cores} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pipes), readable in a terminal too."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def speed_columns(result: Result, baseline: Result, same_work: bool) -> list[str]:
    """The SPEED_HEADERS columns; the wall-time ratio only where the work is the same as the baseline's."""
    ratio = f"{result.steady / baseline.steady:.2f}x"
    wall_ratio = f"{baseline.wall_s / result.wall_s:.2f}x" if same_work else ""
    flag = " !" if result.others_cpu_share > 0.1 or result.notes else ""
    return [f"{result.steady:.1f}", ratio, f"{result.wall_s:.1f}", wall_ratio, f"{result.data.get('ready_s') or 0:.1f}",
            f"{result.data['peak_rss_mb']:.0f}", f"{100 * result.others_cpu_share:.0f}%{flag}"]


SPEED_HEADERS = ["images/s", "x pipeline", "wall s", "wall x", "ready s", "peak RSS MB", "others' CPU"]


def applied(results: list[Result]) -> str:
    """What mv2batch.run really applied in each end-to-end run (the runner decides; this reports it)."""
    lines = []
    for result in results:
        speedups = result.data.get("speedups")
        what = ", ".join(f"{k}={v}" for k, v in speedups.items()) if speedups else "none"
        lines.append(f"- {result.name} ({result.dtype}): {what}; channels-last pixels: "
                     f"{result.data.get('channels_last_pixels')}; loader workers: {result.data.get('workers')}, "
                     f"decoding between passes: {result.data.get('decode_between_passes')}")
    return "Speed-ups the runner applied:\n" + "\n".join(lines)


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=1, default=str))
