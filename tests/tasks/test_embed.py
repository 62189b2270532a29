"""mv2batch embed and classify --embeddings: transformers' MobileViTV2Model pooler_output, sha256, resume."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CAMERA_PHOTOS,
    classify,
    classify_on_ray,
    cli,
    imagenet_photo_paths,
    kill_during_a_shard,
    noisy_photos,
    read_rows,
    skimage_photos,
    write_odd_images,
)

from mv2batch.config import RunConfig
from mv2batch.errors import ConfigError, OutputError


def embed(input_path: Path, out: Path, model: Path, **options):
    return classify(input_path, out, model, task="embed", **options)


def _transformers_embeddings(model: Path, paths: list[Path], batch_size: int) -> np.ndarray:
    """transformers' own: load_image, the checkpoint's processor, MobileViTV2Model(...).pooler_output, in the
    same batches."""
    import torch
    from transformers import MobileViTImageProcessorPil, MobileViTV2Model
    from transformers.image_utils import load_image

    from mv2batch.inputs.listing import register_plugins

    register_plugins()  # HEIF opens in Pillow as it does for mv2batch
    processor = MobileViTImageProcessorPil.from_pretrained(str(model))
    backbone = MobileViTV2Model.from_pretrained(str(model)).eval()
    found = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(str(path)) for path in paths[start : start + batch_size]]
        with torch.inference_mode():
            found.append(backbone(processor(images, return_tensors="pt")["pixel_values"]).pooler_output.numpy())
    return np.concatenate(found)


def _embeddings(rows: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(row["embedding"], dtype=np.float32) for row in rows])


def _real_and_odd_folder(folder: Path, imagenet: int = 6, camera: bool = True) -> list[str]:
    names = write_odd_images(folder)
    for name, photo in skimage_photos().items():
        photo.save(folder / f"skimage_{name}.png")
        names.append(f"skimage_{name}.png")
    for path in imagenet_photo_paths(imagenet) + (sorted(p for p in CAMERA_PHOTOS.iterdir()
                                                         if p.suffix.lower() != ".md") if camera else []):
        shutil.copy(path, folder / path.name)
        names.append(path.name)
    return sorted(names)


def test_embeddings_equal_transformers_pooler_output_on_real_odd_and_camera_photos(tiny_model, tmp_path):
    folder = tmp_path / "images"
    names = _real_and_odd_folder(folder)
    embed(folder, tmp_path / "out", tiny_model, batch_size=4)
    rows = read_rows(tmp_path / "out")
    assert [row["id"] for row in rows] == names
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows if row["error"]]
    found = _embeddings(rows)
    expected = _transformers_embeddings(tiny_model, [folder / name for name in names], batch_size=4)
    assert found.shape == expected.shape
    # The tiny checkpoint's pooled values are small (about 1e-2): the absolute bound is checked relative too.
    scale = np.abs(expected).max()
    assert scale > 1e-3 and np.std(expected, axis=0).mean() > scale / 100  # input-dependent, not vacuous
    np.testing.assert_allclose(found, expected, atol=1e-5, rtol=0)
    assert np.abs(found - expected).max() <= 1e-5 * scale


@pytest.mark.slow
def test_a_width_1_0_checkpoint_gives_512_floats_equal_to_transformers(full_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    folder.mkdir()
    paths = imagenet_photo_paths(8)
    for path in paths:
        shutil.copy(path, folder / path.name)
    embed(folder, tmp_path / "out", full_model, batch_size=8)
    field = pq.read_schema(next((tmp_path / "out" / "predictions").glob("*.parquet"))).field("embedding")
    assert field.type == pa.list_(pa.float32(), 512)
    expected = _transformers_embeddings(full_model, sorted(folder.iterdir()), batch_size=8)
    np.testing.assert_allclose(_embeddings(read_rows(tmp_path / "out")), expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in imagenet_photo_paths(10):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def embedded(tiny_model, photos, tmp_path_factory) -> Path:
    """OUT of the photos embedded at batch 4, for the tests that only read it."""
    out = tmp_path_factory.mktemp("embedded") / "out"
    embed(photos, out, tiny_model, batch_size=4)
    return out


@pytest.fixture(scope="module")
def classified(tiny_model, photos, tmp_path_factory) -> Path:
    """OUT of the photos classified at batch 4 (no embeddings), for the tests that only read it."""
    out = tmp_path_factory.mktemp("classified") / "out"
    classify(photos, out, tiny_model, batch_size=4)
    return out


@pytest.fixture(scope="module")
def in_shards(tiny_model, photos, tmp_path_factory):
    """in_shards(task): OUT of the photos run in shards of 4, batches of 2 ("embed", or "classify" with
    --embeddings), made when first asked for."""
    root, made = tmp_path_factory.mktemp("in-shards"), {}

    def run(task: str) -> Path:
        if task not in made:
            options = {"embeddings": True} if task == "classify" else {}
            classify(photos, root / task, tiny_model, task=task, batch_size=2, shard_size=4, **options)
            made[task] = root / task
        return made[task]

    return run


def test_classify_embeddings_are_embeds_and_its_topk_is_classifys(tiny_model, photos, embedded, classified,
                                                                   tmp_path):
    classify(photos, tmp_path / "both", tiny_model, batch_size=4, embeddings=True)
    embeds, plain, both = read_rows(embedded), read_rows(classified), read_rows(tmp_path / "both")
    np.testing.assert_array_equal(_embeddings(both), _embeddings(embeds))
    assert [row["topk_ids"] for row in both] == [row["topk_ids"] for row in plain]
    assert [row["topk_scores"] for row in both] == [row["topk_scores"] for row in plain]
    assert "embedding" not in plain[0]


def test_fp16_is_fp32_rounded_once_and_normalize_gives_unit_vectors(tiny_model, photos, embedded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    embed(photos, tmp_path / "fp16", tiny_model, batch_size=4, embedding_dtype="fp16")
    embed(photos, tmp_path / "unit", tiny_model, batch_size=4, normalize=True)
    fp32 = _embeddings(read_rows(embedded))
    table = pq.read_table(tmp_path / "fp16" / "predictions")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), fp32.shape[1])
    fp16 = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(fp32.shape)
    np.testing.assert_array_equal(fp16, fp32.astype(np.float16))
    unit = _embeddings(read_rows(tmp_path / "unit"))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, fp32 / np.linalg.norm(fp32, axis=1, keepdims=True), atol=1e-6)


def test_sha256_of_the_file_bytes_and_error_rows_without_embeddings(tiny_model, photos, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "zz_same_bytes.jpg")
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    embed(folder, tmp_path / "out", tiny_model, batch_size=4)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    for name, row in rows.items():
        if name != "zz_broken.jpg":
            assert row["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert rows["zz_same_bytes.jpg"]["sha256"] == rows[first.name]["sha256"]
    assert rows["zz_broken.jpg"]["status"] == "error"
    assert rows["zz_broken.jpg"]["embedding"] is None and rows["zz_broken.jpg"]["sha256"] is None
    page = (tmp_path / "out" / "report" / "index.html").read_text()  # the header and the error rows
    assert "zz_broken.jpg" in page and "mv2batch embed report" in page


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mv2batch", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_segmentation_checkpoints_backbone_with_its_head_said_in_one_line(tiny_segmenter, photos, tmp_path):
    done = _cli("embed", "folder", str(photos), "-o", str(tmp_path / "out"), "--model", str(tiny_segmenter),
                "--device", "cpu", "--workers", "0", "--batch-size", "5")
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "left out" in line]
    assert len(notes) == 1 and "segmentation_head" in notes[0], done.stderr
    assert "UNEXPECTED" not in done.stderr and "LOAD REPORT" not in done.stderr
    expected = _transformers_embeddings(tiny_segmenter, sorted(photos.iterdir()), batch_size=5)
    np.testing.assert_allclose(_embeddings(read_rows(tmp_path / "out")), expected, atol=1e-5, rtol=0)


def test_embedding_options_elsewhere_are_one_line(tiny_model, photos, tmp_path):
    with pytest.raises(ConfigError, match="--embeddings applies to classify"):
        RunConfig(task="segment", source="folder", input=str(photos), out=tmp_path / "o", embeddings=True)
    done = _cli("classify", "folder", str(photos), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                "--normalize")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "mv2batch: error: --normalize and --embedding-dtype apply to embed and classify --embeddings"]


def test_adding_embeddings_to_a_classify_run_is_refused_naming_the_field(tiny_model, photos, classified, tmp_path):
    out = shutil.copytree(classified, tmp_path / "out")
    with pytest.raises(OutputError, match="embeddings"):
        classify(photos, out, tiny_model, batch_size=4, embeddings=True, resume=True)


@pytest.mark.slow
def test_sigkill_mid_embed_then_rerun_gives_the_uninterrupted_embeddings(tiny_model, tmp_path):
    folder = noisy_photos(tmp_path / "images", 20)
    embed(folder, tmp_path / "reference", tiny_model, shard_size=3, batch_size=1)
    args = ["-m", "mv2batch", "embed", "folder", str(folder), "-o", str(tmp_path / "out"), "--model",
            str(tiny_model), "--device", "cpu", "--workers", "0", "--quiet", "--shard-size", "3", "--batch-size", "1"]
    process = subprocess.Popen([sys.executable, *args])
    assert kill_during_a_shard(process, tmp_path / "out", after_markers=2), "the kill must land mid-shard"
    assert 2 <= len(list((tmp_path / "out" / "shards").glob("*.json"))) < 7
    embed(folder, tmp_path / "out", tiny_model, shard_size=3, batch_size=1)  # the rerun: in-process is the same
    rows, expected = read_rows(tmp_path / "out"), read_rows(tmp_path / "reference")
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    np.testing.assert_array_equal(_embeddings(rows), _embeddings(expected))


def test_dedup_groups_byte_and_pixel_identical_copies_of_real_photos_and_nothing_else(tiny_model, photos, tmp_path):
    """Identical bytes (sha256) and identical pixels (a JPEG decoded and saved as PNG: the same embedding) group
    with their originals; distinct photos do not. Random weights give no invariance to anything else, so no
    resized or re-encoded copy is tried here."""
    import pyarrow.parquet as pq
    from PIL import Image

    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    first, second = sorted(folder.iterdir())[:2]
    shutil.copy(first, folder / "copy_of_first.jpg")
    Image.open(second).convert("RGB").save(folder / "second_as.png")
    embed(folder, tmp_path / "out", tiny_model, batch_size=4)
    done = cli("dedup", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    assert "groups: 2 " in done.stdout and "largest 2" in done.stdout, done.stdout
    assert "nearest-neighbour cosine similarity" in done.stdout
    rows = pq.read_table(tmp_path / "out" / "report" / "duplicates.parquet").to_pylist()
    groups = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(row["id"])
    assert sorted(map(sorted, groups.values())) == sorted([sorted([first.name, "copy_of_first.jpg"]),
                                                           sorted([second.name, "second_as.png"])])
    assert all(row["similarity"] is None or row["similarity"] > 0.9999 for row in rows)
    assert {row["path"] for row in rows} == {str(folder / row["id"]) for row in rows}  # what a user deletes


def test_dedup_of_a_run_without_embeddings_is_one_line(classified):
    done = cli("dedup", str(classified))
    assert done.exit_code != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "embed" in done.stderr


def test_tars_and_a_table_of_image_bytes_give_the_folders_embeddings_and_sha256(tiny_model, photos, embedded,
                                                                                 tmp_path):
    """The same photos as tar members and as a Parquet column of bytes: the same vectors and digests as files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mv2batch.testing import write_tar

    files = sorted(photos.iterdir())
    samples = [(path.stem, {"jpg": path.read_bytes()}) for path in files]
    write_tar(tmp_path / "data-000.tar", samples[:5])
    write_tar(tmp_path / "data-001.tar", samples[5:])
    pq.write_table(pa.table({"key": [key for key, _ in samples], "jpg": [m["jpg"] for _, m in samples]}),
                   tmp_path / "images.parquet")
    embed(str(tmp_path / "data-{000..001}.tar"), tmp_path / "tars", tiny_model, batch_size=4, source="webdataset")
    embed(tmp_path / "images.parquet", tmp_path / "table", tiny_model, batch_size=4, source="dataset",
          id_column="key")
    expected = {Path(row["id"]).stem: row for row in read_rows(embedded)}
    for name in ("tars", "table"):
        rows = {Path(row["id"]).name.split(".")[0]: row for row in read_rows(tmp_path / name)}
        assert rows.keys() == expected.keys(), name
        for key, row in rows.items():
            assert row["sha256"] == expected[key]["sha256"], (name, key)
            np.testing.assert_allclose(row["embedding"], expected[key]["embedding"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_embed_on_the_ray_engine_gives_the_local_embeddings(tiny_model, photos, in_shards, local_ray, tmp_path):
    report = classify_on_ray(photos, tmp_path / "ray", tiny_model, task="embed", shard_size=4, batch_size=2)
    assert report.complete and report.n_images == len(list(photos.iterdir()))
    rows, expected = read_rows(tmp_path / "ray"), read_rows(in_shards("embed"))
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    # A Ray task runs with its own thread count: fp32 convolutions round a little differently (3e-8 seen).
    np.testing.assert_allclose(_embeddings(rows), _embeddings(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_retry_errors_fills_the_embeddings_of_rows_that_failed_and_keeps_the_others(task, tiny_model, photos,
                                                                                    in_shards, tmp_path):
    """A file that could not be decoded once (its bytes zeroed, then put back: the same size, so the same input
    and run) gets from --retry-errors the embedding and sha256 of a run that never failed, in place; every
    other row's vector stays as it was."""
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    broken = sorted(folder.iterdir())[2]
    good = broken.read_bytes()
    broken.write_bytes(bytes(len(good)))  # not an image: an error row
    options = {"task": task, "batch_size": 2, "shard_size": 4} | ({"embeddings": True} if task == "classify" else {})
    first = classify(folder, tmp_path / "out", tiny_model, **options)
    assert first.n_errors == 1
    before = read_rows(tmp_path / "out")
    broken.write_bytes(good)
    retried = classify(folder, tmp_path / "out", tiny_model, retry_errors=True, **options)
    assert retried.n_errors == 0 and retried.ran_now == 1
    reference = in_shards(task)  # the same files, never broken
    rows, expected = read_rows(tmp_path / "out"), read_rows(reference)
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    assert [row["sha256"] for row in rows] == [row["sha256"] for row in expected]
    # The retried row ran in a batch of its own: CPU kernels sum in another order (3e-7 seen), so not bit for bit.
    np.testing.assert_allclose(_embeddings(rows), _embeddings(expected), atol=2e-6, rtol=0)
    unchanged = [i for i, row in enumerate(before) if row["id"] != broken.name]
    np.testing.assert_array_equal(_embeddings([rows[i] for i in unchanged]),
                                  _embeddings([before[i] for i in unchanged]))
    rewritten = tmp_path / "out" / "predictions" / "part-00000.parquet"  # the shard that held the broken file
    assert pq.read_schema(rewritten) == pq.read_schema(reference / "predictions" / "part-00000.parquet")
