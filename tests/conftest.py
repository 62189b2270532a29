"""Shared fixtures: real photos, tiny and full-size random checkpoints, generated odd images, run helpers."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGENET_PHOTOS = Path(os.environ.get("MV2BATCH_PHOTOS", REPO.parent / "shared" / "data" / "imagenet-photos"))
CAMERA_PHOTOS = REPO.parent / "shared" / "data" / "camera-photos"  # 8 phone and camera photos, two HEIF
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def skimage_photos() -> dict[str, Image.Image]:
    """scikit-image's sample photos as RGB PIL images, by name."""
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in SKIMAGE_PHOTOS}


def imagenet_photo_paths(count: int) -> list[Path]:
    """Some of the shared ImageNet photos, spread across classes (empty when the folder is absent)."""
    paths = sorted(IMAGENET_PHOTOS.glob("n*/*.*"))
    return paths[:: max(1, len(paths) // count)][:count] if paths else []


def real_photos(count: int, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """count real photos: the shared ImageNet ones where present (CI has them), else scikit-image's, cycled.

    size: only photos of that size (scikit-image's are resized to it when the shared ones are absent).
    """
    shared = [Image.open(p).convert("RGB") for p in imagenet_photo_paths(200 if size else count)]
    if size:
        shared = [p for p in shared if p.size == size]
    if len(shared) >= count:
        return shared[:count]
    return [_varied_crop(i, size) for i in range(count)]


def _varied_crop(i: int, size: tuple[int, int] | None) -> Image.Image:
    """The i-th of many different crops of scikit-image's photos (so that predictions vary)."""
    photos = list(skimage_photos().values())
    photo = photos[i % len(photos)]
    scale = 0.5 + 0.1 * ((i // len(photos)) % 5)
    width, height = int(photo.width * scale), int(photo.height * scale)
    left = (i * 37) % (photo.width - width + 1)
    top = (i * 53) % (photo.height - height + 1)
    crop = photo.crop((left, top, left + width, top + height))
    return crop.resize(size) if size else crop


@pytest.fixture(scope="session")
def calibration_photos() -> list[Image.Image]:
    """Real photos the random checkpoints are calibrated on."""
    photos = list(skimage_photos().values())
    photos += [Image.open(p).convert("RGB") for p in imagenet_photo_paths(12)]
    return photos


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, calibration_photos) -> Path:
    """A tiny MobileViTV2 classifier (10 classes, 64x64 input) with decisive, input-dependent outputs."""
    from mv2batch.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-model"), calibration_photos, size="tiny", num_labels=10)


@pytest.fixture(scope="session")
def imagenet_model(tmp_path_factory, calibration_photos) -> Path:
    """A tiny 1000-class checkpoint, so that ImageNet evaluation accepts it."""
    from mv2batch.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("imagenet-model"), calibration_photos, num_labels=1000)


@pytest.fixture(scope="session")
def full_model(tmp_path_factory, calibration_photos) -> Path:
    """A MobileViTV2-1.0 classifier of the real size (1000 classes, 288 / 256), random but calibrated."""
    from mv2batch.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("full-model"), calibration_photos, size="full", num_labels=1000)


def save_with_orientation(image: Image.Image, path: Path, orientation: int) -> None:
    """Save a JPEG whose EXIF orientation tag is set (the pixels stay as stored)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=92)


def write_odd_images(folder: Path) -> list[str]:
    """Images of every odd mode, size and EXIF orientation; returns their file names (= ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    photo = skimage_photos()["chelsea"]
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, photo.size[::-1], dtype=np.uint8)))
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    palette.info["transparency"] = 3
    gray16 = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 200).astype(np.uint16))
    images = {
        "mode_L.png": photo.convert("L"),
        "mode_LA.png": photo.convert("LA"),
        "mode_P_transparent.png": palette,
        "mode_RGBA.png": rgba,
        "mode_CMYK.jpg": photo.convert("CMYK"),
        "mode_I16.png": gray16,
        "mode_1.bmp": photo.convert("1"),
        "tiny_1x1.png": Image.new("RGB", (1, 1), (200, 30, 40)),
        "strip_1x300.png": Image.fromarray(rng.integers(0, 256, (300, 1, 3), dtype=np.uint8)),
        "wide_500x40.webp": photo.resize((500, 40)),
        "Upper_Case.JPG": skimage_photos()["coffee"],
        "anim.gif": palette.convert("RGB").convert("P"),
        "photo.tiff": skimage_photos()["astronaut"].resize((300, 200)),
    }
    for name, image in images.items():
        image.save(folder / name)
    for orientation in range(1, 9):
        save_with_orientation(photo.crop((0, 0, 300, 180)), folder / f"exif_{orientation}.jpg", orientation)
    return sorted(images) + [f"exif_{o}.jpg" for o in range(1, 9)]


def run_config(input_path: Path, out: Path, model: Path, **options):
    """A RunConfig for a folder, on the CPU, workers in-process unless told otherwise."""
    from mv2batch.config import RunConfig

    options.setdefault("workers", 0)
    options.setdefault("device", "cpu")
    options.setdefault("source", "folder")
    options.setdefault("task", "classify")
    return RunConfig(input=str(input_path), out=out, model=str(model), **options)


def classify(input_path: Path, out: Path, model: Path, parts=None, progress=None, **options):
    """mv2batch.run for a folder, on the CPU, workers in-process unless told otherwise.

    parts (engines.local.LocalParts): steps of the local engine replaced by the test's own.
    """
    import mv2batch
    from mv2batch.engines import local

    config = run_config(input_path, out, model, **options)
    return local.run(config, progress, parts) if parts is not None else mv2batch.run(config, progress)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray of 2 CPUs for every Ray test of the session: starting one, and its workers' imports of torch,
    took 15-60 s on 2 cores each time. The engine joins the Ray that is running (engines.ray._ray), and its idle
    workers, torch imported, take the next test's tasks. Shut down after the last test that asks for it
    (pytest_runtest_teardown), so that no other test shares the cores with Ray's daemons."""
    ray = pytest.importorskip("ray")  # .ci/run installs the [ray] extra, so this runs there
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_runtest_teardown(item, nextitem):
    """The session's Ray stops once no test after this one asks for local_ray."""
    if "local_ray" not in getattr(item, "fixturenames", ()):
        return
    later = item.session.items[item.session.items.index(item) + 1:]
    if not any("local_ray" in getattr(test, "fixturenames", ()) for test in later):
        import ray

        ray.shutdown()


def classify_on_ray(input_path: Path, out: Path, model: Path, **options):
    """classify with the Ray engine, on the session's local Ray (the test asks for the local_ray fixture)."""
    import ray

    assert ray.is_initialized(), "a Ray test asks for the local_ray fixture"
    return classify(input_path, out, model, engine="ray", **options)


def placed_with(change):
    """LocalParts whose placement is the real one passed through change(placement) -> placement."""
    from mv2batch.engines.local import LocalParts
    from mv2batch.runner.placement import place

    return LocalParts(place=lambda job, local_rank=None: change(place(job, local_rank)))


def built_loop(config, progress=None):
    """The job, and its batch loop built from the real parts (described, placed, OUT opened) with every planned
    shard to run: a test then changes one part of the loop and calls loop.process(shards, read)."""
    from mv2batch.runner.job import describe_job, open_out
    from mv2batch.runner.placement import place
    from mv2batch.runner.shard_plan import Group, Rank
    from mv2batch.runner.shards import build_loop

    job = describe_job(config)
    placed = place(job)
    rundir = open_out(job, Rank(), Group(Rank()), placed.batch_size)
    plan = job.plan()
    shards = [(number, plan.shard(number)) for number in range(plan.n_shards)]
    return job, build_loop(job, placed, rundir, progress=progress), shards


def read_rows(out: Path) -> list[dict]:
    """Every prediction row of a run, sorted by id, read back from the Parquet it wrote."""
    table = pq.read_table(out / "predictions")
    return sorted(table.to_pylist(), key=lambda row: row["id"])


ROUNDING = 1e-6  # float32 probabilities of one image computed in batches of another size


def assert_same_rows_across_batches(got: list[dict], expected: list[dict], columns: set[str] | None = None) -> None:
    """Rows equal in every column (or those named), scores within ROUNDING: a run whose batches hold other
    images than another's agrees to float32 rounding, not always to the bit. oneDNN picks its kernels per CPU
    and batch size: an AMD EPYC gives a batch of 4 the bits of a batch of 8, an Intel Xeon with AMX does not
    (transformers' own calls differ the same way there)."""
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        names = columns or set(want)
        assert {k: row[k] for k in names if k != "topk_scores"} == {k: want[k] for k in names if k != "topk_scores"}
        if "topk_scores" in names:
            np.testing.assert_allclose(row["topk_scores"], want["topk_scores"], rtol=0, atol=ROUNDING)


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory, calibration_photos) -> Path:
    """A tiny MobileViTV2 + DeepLabV3 (21 VOC-like classes, input 64) with decisive per-pixel outputs."""
    from mv2batch.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-segmenter"), calibration_photos, size="tiny",
                           num_labels=21, task="segment")


@pytest.fixture(scope="session")
def full_segmenter(tmp_path_factory, calibration_photos) -> Path:
    """MobileViTV2-1.0 + DeepLabV3 of the real size (21 classes, 544 / 512), random but calibrated."""
    from mv2batch.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("full-segmenter"), calibration_photos[:6], size="full",
                           num_labels=21, task="segment")


def segment(input_path: Path, out: Path, model: Path, **options):
    """mv2batch.run segmentation for a folder, on the CPU, workers in-process unless told otherwise."""
    return classify(input_path, out, model, task="segment", **options)


def noisy_photos(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> Path:
    """count noisy copies of the skimage photos, as JPEGs of one size."""
    folder.mkdir(parents=True, exist_ok=True)
    base = list(skimage_photos().values())
    rng = np.random.default_rng(3)
    for i in range(count):
        photo = base[i % len(base)].resize(size)
        noise = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(np.asarray(photo) // 2 + noise).save(folder / f"img_{i:03d}.jpg", quality=90)
    return folder


def kill_during_a_shard(process: subprocess.Popen, out: Path, after_markers: int) -> bool:
    """SIGKILL the run once enough shards are committed and the next one's temporary part exists."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        markers = len(list((out / "shards").glob("*.json"))) if (out / "shards").is_dir() else 0
        temps = list((out / "predictions").glob(".part-*.tmp")) if (out / "predictions").is_dir() else []
        if markers >= after_markers and temps:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.kill()
    return False


# ---- shared by the tests of several folders -------------------------------------------------------


def encoded_photos(count: int) -> list[tuple[str, str, bytes]]:
    """(class folder, key, JPEG bytes) of real photos: the shared ImageNet ones, else scikit-image's crops."""
    paths = imagenet_photo_paths(count)
    if len(paths) >= count:
        return [(p.parent.name, p.stem, p.read_bytes()) for p in paths]
    encoded = []
    for i, photo in enumerate(real_photos(count)):
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        encoded.append(("n01440764", f"photo_{i:03d}", buffer.getvalue()))
    return encoded


def photo_folder(photos: list, folder: Path) -> Path:
    """encoded_photos written as KEY.jpg files in a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for _, key, data in photos:
        (folder / f"{key}.jpg").write_bytes(data)
    return folder


class Hung(BaseException):
    """Raised by the deadline alarm; a BaseException so that no `except Exception/OSError` swallows it."""


@contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) when the block runs longer than seconds."""
    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s: the look-up hangs instead of failing fast")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str):
    """Invoke the CLI in-process; returns click's Result."""
    from typer.testing import CliRunner

    from mv2batch.cli.app import app

    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    """A failed CLI call: non-zero exit, one `mv2batch: error:` line naming the fragments, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("mv2batch: error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def one_line_error(error: type, call, *fragments: str) -> str:
    """call() raises a one-line error of that type whose message names every fragment."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's rendezvous and test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
