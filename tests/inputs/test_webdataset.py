"""WebDataset tar shards: streamed in workers, one output shard per tar, the folder's rows, every bad input a row."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (
    assert_one_line_error,
    assert_same_rows_across_batches,
    classify,
    cli,
    encoded_photos,
    free_port,
    photo_folder,
    read_rows,
    segment,
)
from PIL import Image

from mv2batch.config import RunConfig
from mv2batch.errors import ConfigError, InputError
from mv2batch.inputs.tars import TarShards, expand_braces, split_key
from mv2batch.testing import write_tar

PER_TAR = 4


def _as_tars(photos: list, folder: Path, label: int = 3, pattern: str = "part-{:03d}.tar") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for start in range(0, len(photos), PER_TAR):
        samples = [(key, {"jpg": data, "cls": str(label).encode()}) for _, key, data in photos[start : start + PER_TAR]]
        tars.append(write_tar(folder / pattern.format(start // PER_TAR), samples))
    return tars


def _run(shards, out: Path, model: Path, **options):
    import mv2batch

    options.setdefault("workers", 0)
    config = RunConfig(task=options.pop("task", "classify"), source="webdataset", input=shards, out=out,
                       model=str(model), device="cpu", **options)
    return mv2batch.run(config)


@pytest.fixture(scope="module")
def photos():
    return encoded_photos(12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos, tiny_model):
    """The photos as three tars and as a folder, and the folder's rows."""
    root = tmp_path_factory.mktemp("webdataset")
    tars = _as_tars(photos, root / "tars")
    folder = photo_folder(photos, root / "folder")
    classify(folder, root / "folder-out", tiny_model)
    return tars, {Path(row["id"]).stem: row for row in read_rows(root / "folder-out")}


def test_tars_give_the_folders_scores_with_tar_keys_paths_and_cls_labels(reference, photos, tiny_model, tmp_path):
    tars, expected = reference
    report = _run([str(t) for t in tars], tmp_path / "out", tiny_model, workers=2)
    rows = read_rows(tmp_path / "out")
    assert report.n_images == 12 and report.n_errors == 0 and report.complete
    assert len(rows) == len(expected)
    for row in rows:
        tar, key = row["id"].split("/")
        want = expected[key]
        # a tar's batches end with the tar: other batch sizes than the folder's (conftest.ROUNDING says why)
        assert_same_rows_across_batches([row], [want], {"topk_ids", "topk_scores"})
        assert (row["width"], row["height"], row["label"]) == (want["width"], want["height"], 3)
        assert row["path"] == f"{tars[int(tar[-3:])]}#{key}.jpg"
        assert row["shard"] == int(tar[-3:])
    parts = sorted(p.name for p in (tmp_path / "out" / "predictions").glob("*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # one per tar
    for number, tar in enumerate(tars):  # each part holds its tar's samples, in tar order
        part = pq.read_table(tmp_path / "out" / "predictions" / parts[number]).to_pylist()
        keys = [key for _, key, _ in photos[number * PER_TAR : (number + 1) * PER_TAR]]
        assert [r["id"] for r in part] == [f"{tar.stem}/{key}" for key in keys]


def test_a_pattern_a_folder_and_a_shard_list_name_the_same_run(reference, tiny_model, tmp_path):
    tars, _ = reference
    listed = tmp_path / "shards.txt"
    listed.write_text("# three tars\n" + "\n".join(os.path.relpath(t, tmp_path) for t in tars) + "\n")
    pattern = str(tars[0].parent / "part-{000..002}.tar")
    opened = [TarShards.open([name]) for name in (pattern, str(tars[0].parent), str(listed))]
    assert all(o.shards == [str(t) for t in tars] for o in opened)
    assert len({o.fingerprint() for o in opened}) == 1
    first = _run(pattern, tmp_path / "out", tiny_model)
    again = _run(str(listed), tmp_path / "out", tiny_model)  # the same input by another name: nothing to redo
    assert first.ran_now == 12 and again.ran_now == 0 and again.complete


def test_brace_patterns_and_keys_expand_as_webdataset_does():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/{8..10}.tar") == ["x/8.tar", "x/9.tar", "x/10.tar", "y/8.tar", "y/9.tar", "y/10.tar"]
    assert split_key("dir/n0144_10.JPEG") == ("dir/n0144_10", "JPEG")
    assert split_key("img.seg.png") == ("img", "seg.png")
    assert split_key("README") is None


def test_eval_imagenet_val_on_tars_equals_the_class_folder_layout(imagenet_model, tmp_path):
    """ImageNet's WebDataset layout (imagenet-val-{000000..000009}.tar, .jpg + .cls) against val/<wnid>/."""
    import mv2batch
    from mv2batch.inputs.eval_layouts import imagenet_wnids

    photos = encoded_photos(20)
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    val = tmp_path / "val"
    for wnid, key, data in photos:
        (val / wnid).mkdir(parents=True, exist_ok=True)
        (val / wnid / f"{key}.JPEG").write_bytes(data)
    shards = tmp_path / "wds"
    shards.mkdir()
    for number in range(10):
        pair = photos[2 * number:][:2]
        samples = [(key, {"jpg": data, "cls": str(index[wnid]).encode()}) for wnid, key, data in pair]
        write_tar(shards / f"imagenet-val-{number:06d}.tar", samples)

    def evaluate(name: str, out: str):
        config = RunConfig(task="classify", source="imagenet", input=name, out=tmp_path / out,
                           model=str(imagenet_model), device="cpu", workers=0)
        return mv2batch.run(config)

    folder = evaluate(str(val), "folder")
    tars = evaluate(str(shards / "imagenet-val-{000000..000009}.tar"), "tars")
    assert tars.n_images == folder.n_images == 20 and tars.n_errors == 0
    assert tars.metrics == folder.metrics and tars.metrics["top1"] is not None
    assert tars.per_class == folder.per_class and len(tars.per_class) > 1


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(photos, tiny_model, tmp_path):
    from conftest import kill_during_a_shard

    tars = _as_tars(photos + photos[:6], tmp_path / "tars", pattern="t-{:02d}.tar")  # 18 photos, 5 tars
    expected = tmp_path / "expected"
    _run([str(t) for t in tars], expected, tiny_model, batch_size=1)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mv2batch", "classify", "webdataset", *map(str, tars), "-o", str(out),
            "--model", str(tiny_model), "--device", "cpu", "--workers", "0", "--batch-size", "1", "--quiet"]
    killed = kill_during_a_shard(subprocess.Popen(args), out, after_markers=1)
    assert killed, "the kill must land while a tar's part is being written"
    assert 1 <= len(list((out / "shards").glob("*.json"))) < 5
    _run([str(t) for t in tars], out, tiny_model, batch_size=1)  # the rerun: in-process is the same
    assert read_rows(out) == read_rows(expected)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(reference, tiny_model, tmp_path):
    tars, _ = reference
    _run([str(t) for t in tars], tmp_path / "one", tiny_model)
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "mv2batch", "classify", "webdataset", *map(str, tars), "-o", str(out),
               "--model", str(tiny_model), "--device", "cpu", "--workers", "0", "--quiet"]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_same_rows(read_rows(out), read_rows(tmp_path / "one"))
    ranks = {json.loads(m.read_text())["shard"]: json.loads(m.read_text())["rank"] for m in (out / "shards").glob("*")}
    assert ranks == {0: 0, 1: 1, 2: 0}


def _assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    """The same ids, shards, sizes and top-k; scores to float rounding (one thread against two sums apart)."""
    assert [r["id"] for r in rows] == [r["id"] for r in expected]
    for row, want in zip(rows, expected):
        assert (row["shard"], row["width"], row["height"], row["topk_ids"]) == (
            want["shard"], want["width"], want["height"], want["topk_ids"])
        np.testing.assert_allclose(row["topk_scores"], want["topk_scores"], atol=1e-6)


def _bad_shards(photos: list, folder: Path) -> dict[str, Path]:
    """One tar of each kind of damage, and a good one."""
    folder.mkdir()
    good = [(key, {"jpg": data, "cls": b"1"}) for _, key, data in photos[:3]]
    made = {"good": write_tar(folder / "good.tar", good)}
    made["corrupt"] = write_tar(folder / "corrupt.tar", [good[0], ("broken", {"jpg": b"\xff\xd8 not a jpeg"})])
    made["no_image"] = write_tar(folder / "no_image.tar", [good[1], ("meta", {"json": b"{}", "cls": b"4"})])
    made["bad_cls"] = write_tar(folder / "bad_cls.tar", [("odd", {"jpg": photos[0][2], "cls": b"cat"})])
    whole = write_tar(folder / "whole.tar", good).read_bytes()
    (folder / "whole.tar").unlink()
    first_sample = 512 + _padded(len(good[0][1]["jpg"])) + 1024  # its jpg, then its one-byte cls
    (folder / "cut_mid.tar").write_bytes(whole[: first_sample + 512 + 300])  # inside the second sample's jpg
    (folder / "cut_between.tar").write_bytes(whole[:first_sample])  # after the first sample, no end marker
    (folder / "not_a_tar.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    made.update({n: folder / f"{n}.tar" for n in ("cut_mid", "cut_between", "not_a_tar")})
    return made


def _padded(size: int) -> int:
    return -(-size // 512) * 512


def test_every_bad_tar_input_is_an_error_row_and_the_other_shards_are_unaffected(photos, tiny_model, tmp_path):
    shards = _bad_shards(photos, tmp_path / "tars")
    report = _run([str(p) for p in shards.values()], tmp_path / "out", tiny_model)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    keys = [key for _, key, _ in photos[:3]]
    assert all(rows[f"good/{k}"]["status"] == "ok" for k in keys)
    assert rows[f"corrupt/{keys[0]}"]["status"] == "ok"
    assert "cannot identify image" in rows["corrupt/broken"]["error"]
    assert "no image member" in rows["no_image/meta"]["error"] and "meta.json" in rows["no_image/meta"]["error"]
    assert "not a class id" in rows["bad_cls/odd"]["error"]
    cut_mid = sorted((row for row in rows.values() if row["id"].startswith("cut_mid/")), key=lambda r: r["status"])
    assert [r["status"] for r in cut_mid] == ["error", "ok"]  # the sample before the cut is a row
    assert cut_mid[0]["id"] == f"cut_mid/{keys[1]}" and "cut short" in cut_mid[0]["error"]
    assert "byte" in cut_mid[0]["error"] and "cut_mid.tar" in cut_mid[0]["error"]
    cut_between = sorted((row for row in rows.values() if row["id"].startswith("cut_between/")),
                         key=lambda r: r["status"])
    assert [r["status"] for r in cut_between] == ["error", "ok"]  # the sample before the cut is a row
    assert "end-of-archive" in cut_between[0]["error"]
    assert rows["not_a_tar/@0"]["status"] == "error" and "not a tar" in rows["not_a_tar/@0"]["error"]
    assert report.n_images == len(rows) == 3 + 2 + 2 + 1 + 2 + 2 + 1
    assert report.n_errors == sum(row["status"] == "error" for row in rows.values()) == 6
    assert report.complete


def test_a_missing_shard_is_one_line_before_any_work(photos, tmp_path):
    tar = _as_tars(photos[:2], tmp_path / "tars")[0]
    result = cli("classify", "webdataset", str(tar), str(tmp_path / "tars" / "gone-{0..1}.tar"), "-o",
                 str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == InputError.exit_code
    assert_one_line_error(result, "2 of 3 shard(s) not found", "gone-0.tar")
    assert not (tmp_path / "out").exists()


def test_options_that_cut_tars_are_refused_and_duplicate_tar_names_too(photos, tmp_path):
    for option in ({"limit": 3}, {"shard_size": 2}):
        with pytest.raises(ConfigError, match="does not apply to tar shards"):
            RunConfig(task="classify", source="webdataset", input="a.tar", out=tmp_path / "o", **option)
    one = _as_tars(photos[:2], tmp_path / "a")[0]
    two = _as_tars(photos[:2], tmp_path / "b")[0]
    with pytest.raises(InputError, match="two shards are named"):
        TarShards.open([str(one), str(two)])


def test_resume_skips_done_tars_and_retry_errors_runs_only_the_tars_with_errors(photos, tiny_model, tmp_path):
    shards = _bad_shards(photos, tmp_path / "tars")
    names = [str(shards["good"]), str(shards["corrupt"])]
    _run(names, tmp_path / "out", tiny_model)
    parts = tmp_path / "out" / "predictions"
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert _run(names, tmp_path / "out", tiny_model, resume=True).ran_now == 0
    retried = _run(names, tmp_path / "out", tiny_model, retry_errors=True)
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert retried.ran_now == 2  # the corrupt tar, whole
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00001.parquet"] != before["part-00001.parquet"]
    assert retried.n_images == 5 and retried.n_errors == 1


def test_segment_tars_give_the_folders_masks_and_overlays(photos, tiny_segmenter, tmp_path):
    tars = _as_tars(photos[:6], tmp_path / "tars")
    folder = photo_folder(photos[:6], tmp_path / "folder")
    segment(folder, tmp_path / "folder-out", tiny_segmenter)
    _run([str(t) for t in tars], tmp_path / "out", tiny_segmenter, task="segment", workers=2,
         masks_dir=tmp_path / "masks", overlays_dir=tmp_path / "overlays")
    expected = {Path(row["id"]).stem: row for row in read_rows(tmp_path / "folder-out")}
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 6
    for row in rows:
        assert row["mask_png"] == expected[row["id"].split("/")[1]]["mask_png"]
    masks = sorted(p.relative_to(tmp_path / "masks").as_posix() for p in (tmp_path / "masks").rglob("*.png"))
    overlays = sorted((tmp_path / "overlays").rglob("*.jpg"))
    assert len(masks) == len(overlays) == 6
    with Image.open(overlays[0]) as overlay:
        assert overlay.size == (rows[0]["width"], rows[0]["height"])


def test_reading_tars_writes_nothing_outside_out(reference, tiny_model, tmp_path, monkeypatch):
    tars, _ = reference
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = {p: p.stat().st_size for p in tars[0].parent.parent.rglob("*")}
    _run([str(t) for t in tars], tmp_path / "out", tiny_model, workers=2)
    assert {p: p.stat().st_size for p in tars[0].parent.parent.rglob("*")} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_image_ext_chooses_the_member_and_gzipped_tars_are_read(photos, tiny_model, tmp_path):
    import tarfile

    (tmp_path / "tars").mkdir()
    png = io.BytesIO()
    Image.open(io.BytesIO(photos[1][2])).save(png, format="PNG")
    tar = write_tar(tmp_path / "tars" / "both.tar", [("pair", {"jpg": photos[0][2], "png": png.getvalue()})])
    with tarfile.open(tmp_path / "tars" / "zipped.tar.gz", "w:gz") as zipped, tarfile.open(tar) as plain:
        for member in plain.getmembers():
            zipped.addfile(member, plain.extractfile(member))
    default = _run([str(tar)], tmp_path / "default", tiny_model)
    chosen = _run([str(tar), str(tmp_path / "tars" / "zipped.tar.gz")], tmp_path / "png", tiny_model,
                  image_ext=("png",))
    assert default.n_errors == chosen.n_errors == 0
    assert read_rows(tmp_path / "default")[0]["path"].endswith("#pair.jpg")
    rows = read_rows(tmp_path / "png")
    assert [row["id"] for row in rows] == ["both/pair", "zipped/pair"]
    assert all(row["path"].endswith("#pair.png") for row in rows)
    assert rows[0]["topk_scores"] == rows[1]["topk_scores"]
    assert (rows[0]["width"], rows[0]["height"]) == Image.open(io.BytesIO(photos[1][2])).size


@pytest.mark.slow
def test_the_ray_engine_runs_one_task_per_tar_with_the_single_process_output(reference, tiny_model, local_ray,
                                                                            tmp_path):
    import mv2batch

    tars, _ = reference
    _run([str(t) for t in tars], tmp_path / "one", tiny_model)
    updates = []
    config = RunConfig(task="classify", source="webdataset", input=[str(t) for t in tars], out=tmp_path / "ray",
                       model=str(tiny_model), device="cpu", workers=0, engine="ray")
    report = mv2batch.run(config, updates.append)
    assert report.complete and report.ran_now == 12
    _assert_same_rows(read_rows(tmp_path / "ray"), read_rows(tmp_path / "one"))
    assert [u.done for u in updates] == [0, 4, 8, 12] and {u.total for u in updates} == {None}
