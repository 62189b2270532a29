"""mv2batch filter: a run's kept items in the input's own format (folders, tars, tables; local and on S3), by a SQL
predicate and one per duplicate group, resumable after a crash, refused in one line before anything is written."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from conftest import classify, real_photos
from typer.testing import CliRunner

from mv2batch.dedup.duplicates import find_duplicates
from mv2batch.errors import ConfigError, OutputError
from mv2batch.filter.destination import written_whole
from mv2batch.filter.pipeline import FilterParts, filter_run
from mv2batch.out.files import PART_TEMPS
from mv2batch.testing import write_tar


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under root but the filter's own folder and hidden temporaries, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith("_mv2batch/")
            and not p.name.startswith(".")}


def write_photos(folder: Path) -> Path:
    """Real photos in three folders, two byte-identical copies (each after its original) and a corrupt file."""
    for i, photo in enumerate(real_photos(9)):
        target = folder / "abc"[i // 3] / f"photo_{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        photo.save(target, quality=85)
    shutil.copyfile(folder / "a/photo_0.jpg", folder / "b/copy_of_0.jpg")
    shutil.copyfile(folder / "b/photo_4.jpg", folder / "c/copy_of_4.jpg")
    (folder / "b/broken.jpg").write_bytes(b"\xff\xd8\xff this is not a photo")
    return folder


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_model):
    """A folder classified with embeddings in shards of 4, and deduplicated."""
    root = tmp_path_factory.mktemp("filter-folder")
    photos = write_photos(root / "photos")
    out = root / "out"
    classify(photos, out, tiny_model, embeddings=True, shard_size=4)
    find_duplicates(out)
    return photos, out


def predictions(out: Path) -> list[dict]:
    return pq.read_table(out / "predictions", columns=["id", "path", "status", "sha256", "topk_scores",
                                                       "label"]).to_pylist()


def duplicate_ids(out: Path) -> set[str]:
    table = pq.read_table(out / "report" / "duplicates.parquet").to_pylist()
    return {row["id"] for row in table if row["duplicate_of"] is not None}


def median_score(out: Path) -> str:
    """A top-1 score of the run (exactly, as a float32 becomes a double) that about half the photos reach."""
    scores = sorted(row["topk_scores"][0] for row in predictions(out) if row["status"] == "ok")
    return repr(float(np.float32(scores[len(scores) // 2])))


def test_a_folder_keeps_its_relative_paths_and_bytes_one_per_duplicate_group_without_the_corrupt_file(
        folder_run, tmp_path):
    photos, out = folder_run
    threshold = median_score(out)
    dest = tmp_path / "kept"
    result = filter_run(out, dest, where=f"topk_scores[1] >= {threshold}", unique=True)
    rows = predictions(out)
    duplicates = duplicate_ids(out)
    assert {"b/copy_of_0.jpg", "c/copy_of_4.jpg"} <= duplicates, "byte-identical copies share a group"
    expected = sorted(row["id"] for row in rows if row["status"] == "ok" and row["topk_scores"][0] >= float(threshold)
                      and row["id"] not in duplicates)
    copied = files_under(dest)
    assert sorted(copied) == expected and 0 < len(expected) < len(rows)
    sources = {row["id"]: row["sha256"] for row in rows}
    assert all(sha256(data) == sources[item] == sha256((photos / item).read_bytes()) for item, data in copied.items())
    assert "b/broken.jpg" not in copied and "b/copy_of_0.jpg" not in copied and "c/copy_of_4.jpg" not in copied
    kept_rows = pq.read_table(dest / "_mv2batch" / "predictions.parquet")
    assert kept_rows.column("id").to_pylist() == expected  # in the run's order, which is sorted here
    assert kept_rows.schema.names == pq.read_schema(out / "predictions" / "part-00000.parquet").names
    state = json.loads((dest / "_mv2batch" / "filter.json").read_text())
    run_info = json.loads((out / "run.json").read_text())
    assert state["complete"] and state["identity"]["fingerprint"] == run_info["fingerprint"]
    assert state["identity"]["unique"] and threshold in state["identity"]["where"]
    dropped = result.dropped
    assert result.kept == len(expected) and dropped["error"] == 1 and dropped["unavailable"] == 0
    assert dropped["where"] + dropped["duplicate"] == len(rows) - len(expected) - 1 and dropped["duplicate"] >= 1
    assert state["dropped"] == dropped and result.files_written == len(expected)


def test_error_rows_are_kept_only_where_the_predicate_asks_for_them(folder_run, tmp_path):
    photos, out = folder_run
    result = filter_run(out, tmp_path / "errors", where="status = 'error'")
    assert list(files_under(tmp_path / "errors")) == ["b/broken.jpg"] and result.kept == 1
    assert (tmp_path / "errors" / "b/broken.jpg").read_bytes() == (photos / "b/broken.jpg").read_bytes()
    everything = filter_run(out, tmp_path / "all")
    assert sorted(files_under(tmp_path / "all")) == sorted(r["id"] for r in predictions(out) if r["status"] == "ok")
    assert everything.dropped["error"] == 1 and everything.dropped["where"] == 0


def test_hard_and_symbolic_links_point_at_the_sources(folder_run, tmp_path):
    photos, out = folder_run
    filter_run(out, tmp_path / "hard", where="id LIKE 'a/%'", link="hard")
    filter_run(out, tmp_path / "soft", where="id LIKE 'a/%'", link="symlink")
    names = sorted(files_under(tmp_path / "hard"))
    assert names == ["a/photo_0.jpg", "a/photo_1.jpg", "a/photo_2.jpg"]
    for name in names:
        assert os.stat(tmp_path / "hard" / name).st_ino == os.stat(photos / name).st_ino
        assert os.readlink(tmp_path / "soft" / name) == str((photos / name).resolve())


def test_a_file_name_that_is_not_utf8_is_copied_under_its_own_bytes(tiny_model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    odd = os.fsdecode(b"caf\xe9_\xff.jpg")  # Latin-1 bytes: the run's id writes them as \xHH
    for name, photo in zip([odd, "plain.jpg"], real_photos(2)):
        photo.save(photos / name, quality=85)
    classify(photos, tmp_path / "out", tiny_model)
    ids = [row["id"] for row in predictions(tmp_path / "out")]
    assert "caf\\xe9_\\xff.jpg" in ids
    filter_run(tmp_path / "out", tmp_path / "kept")
    assert sorted(os.listdir(tmp_path / "kept")) == sorted(["_mv2batch", odd, "plain.jpg"])
    assert (tmp_path / "kept" / odd).read_bytes() == (photos / odd).read_bytes()


def crashing_after(files: int):
    """A file writer that writes `files` files of kept items, then leaves half of the next in its temporary file and
    fails, as a process killed mid-copy would (the filter's own files, under _mv2batch/, are written)."""
    count = itertools.count()

    @contextmanager
    def write(destination, final):
        if "_mv2batch" in str(final) or next(count) < files:
            with written_whole(destination, final) as handle:
                yield handle
            return
        temp = destination.files.local_temp(final)
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(b"half a file")
        raise OutputError(f"cannot write {final}: killed")

    return write


def test_a_crash_mid_copy_then_the_same_command_again_completes_without_doubling(folder_run, tmp_path):
    photos, out = folder_run
    clean = filter_run(out, tmp_path / "clean", unique=True)
    assert clean.kept > 3
    dest = tmp_path / "crashed"
    with pytest.raises(OutputError, match="killed"):
        filter_run(out, dest, unique=True, threads=1, parts=FilterParts(write_file=crashing_after(3)))
    partial = files_under(dest)
    assert len(partial) == 3 and all(data == (photos / name).read_bytes() for name, data in partial.items())
    halves = [p.read_bytes() for p in dest.rglob("*.tmp")]  # one per copy in flight when the writer failed:
    assert halves and set(halves) == {b"half a file"}  # the next shard's first may have started beside it
    assert not (dest / "_mv2batch" / "predictions.parquet").exists()
    assert not json.loads((dest / "_mv2batch" / "filter.json").read_text())["complete"]
    again = filter_run(out, dest, unique=True)
    assert files_under(dest) == files_under(tmp_path / "clean")
    assert again.items_present == 3 and again.files_written == clean.files_written - 3
    assert again.kept == clean.kept and again.dropped == clean.dropped
    ids = pq.read_table(dest / "_mv2batch" / "predictions.parquet").column("id").to_pylist()
    assert ids == pq.read_table(tmp_path / "clean" / "_mv2batch" / "predictions.parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == clean.kept
    assert not [p for p in dest.rglob("*.tmp")], "the half-written temporary was written over"
    assert filter_run(out, dest, unique=True).files_written == 0, "a finished filter run again writes nothing"


def cli(*args: str):
    from mv2batch.cli.filter import filter_command

    app = typer.Typer()
    app.command()(filter_command)
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("where, says", [
    ("no_such_column > 1", 'column "no_such_column" not found'),
    ("width", "gives INTEGER"),
    ("1=1); COPY (SELECT 1) TO 'x.csv'; SELECT (1", "not an SQL expression"),
])
def test_a_bad_predicate_is_one_line_naming_the_columns_and_nothing_is_written(folder_run, tmp_path, where, says):
    _, out = folder_run
    result = cli(out, "-o", tmp_path / "dest", "--where", where)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == ConfigError.exit_code and len(lines) == 1, result.stderr
    assert says in lines[0] and "the predictions' columns are: id, path, shard, width" in lines[0]
    assert not (tmp_path / "dest").exists() and not Path("x.csv").exists()


def test_the_cli_prints_kept_and_dropped_by_reason(folder_run, tmp_path):
    _, out = folder_run
    result = cli(out, "-o", tmp_path / "dest", "--where", "id NOT LIKE 'c/%'", "--unique")
    assert result.exit_code == 0, result.output
    assert "filter: kept " in result.stdout and "1 error row," in result.stdout and "by --where" in result.stdout


def test_unique_needs_a_dedup_as_new_as_the_run(folder_run, tmp_path):
    _, out = folder_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    part = copy / "predictions" / "part-00001.parquet"
    duplicates = copy / "report" / "duplicates.parquet"
    os.utime(part, (duplicates.stat().st_mtime + 60,) * 2)  # a shard written again after dedup (--retry-errors)
    with pytest.raises(OutputError, match=r"older than the run's part part-00001.parquet: run `mv2batch dedup"):
        filter_run(copy, tmp_path / "dest", unique=True)
    duplicates.unlink()
    with pytest.raises(OutputError, match=r"no duplicate groups .*: run `mv2batch dedup .*` first"):
        filter_run(copy, tmp_path / "dest", unique=True)
    assert not (tmp_path / "dest").exists()


def test_a_dest_holding_something_else_is_refused_unless_overwrite(folder_run, tmp_path):
    photos, out = folder_run
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        filter_run(out, dest)
    filter_run(out, dest, overwrite=True)
    assert not (dest / "notes.txt").exists() and "a/photo_0.jpg" in files_under(dest)
    with pytest.raises(OutputError, match=r"another filter's output \(where: "):
        filter_run(out, dest, where="label = 3")
    for inside in (photos, photos / "new", out / "kept"):
        with pytest.raises(OutputError, match="overlaps"):
            filter_run(out, inside, overwrite=True)
    assert (photos / "a/photo_0.jpg").exists()


def tar_samples(seed: int, labels: list[int], broken: int | None = None) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of jpg + cls + json (+ txt on some), from real photos; `broken`: that sample's jpg is not one."""
    samples = []
    for i, (label, photo) in enumerate(zip(labels, real_photos(seed + len(labels))[seed:])):
        jpg = io.BytesIO()
        photo.save(jpg, "JPEG", quality=80)
        members = {"jpg": jpg.getvalue() if i != broken else b"broken", "cls": str(label).encode(),
                   "json": json.dumps({"i": i, "seed": seed}).encode()}
        if i % 2:
            members["txt"] = f"caption {i}".encode()
        samples.append((f"s{seed:02d}_{i:03d}", members))
    return samples


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def test_tars_keep_every_member_of_each_kept_sample_in_order_and_skip_a_tar_with_nothing_kept(tiny_model, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "data-000.tar", tar_samples(0, [0, 2, 3, 4, 5], broken=1))
    write_tar(shards / "data-001.tar", tar_samples(5, [1, 3, 5]))
    write_tar(shards / "data-002.tar", tar_samples(8, [6, 7, 8]))
    classify(shards, tmp_path / "out", tiny_model, source="webdataset")
    dest = tmp_path / "kept"
    result = filter_run(tmp_path / "out", dest, where="label % 2 = 0")
    assert sorted(p.name for p in dest.glob("*.tar")) == ["data-000.tar", "data-002.tar"]
    kept_keys = {"s00_000", "s00_003", "s08_000", "s08_002"}  # even labels; s00_001's jpg is broken: an error row
    for name in ("data-000.tar", "data-002.tar"):
        want = [(n, d) for n, d in tar_members(shards / name) if n.split(".")[0] in kept_keys]
        assert tar_members(dest / name) == want and want
    assert result.kept == 4 and result.dropped["error"] == 1 and result.dropped["where"] == 6
    ids = pq.read_table(dest / "_mv2batch" / "predictions.parquet").column("id").to_pylist()
    assert ids == ["data-000/s00_000", "data-000/s00_003", "data-002/s08_000", "data-002/s08_002"]
    # A crash between a tar's commit and its shard's marker: the next run reads which samples the tar holds.
    written = (dest / "data-000.tar").read_bytes()
    (dest / "_mv2batch" / "done" / "00000.json").unlink()
    again = filter_run(tmp_path / "out", dest, where="label % 2 = 0")
    assert again.kept == 4 and again.items_present == 4 and again.files_written == 0
    assert (dest / "data-000.tar").read_bytes() == written


def image_table(count: int) -> pa.Table:
    photos = []
    for photo in real_photos(count):
        jpg = io.BytesIO()
        photo.resize((photo.width // 3, photo.height // 3)).save(jpg, "JPEG", quality=80)
        photos.append(jpg.getvalue())
    return pa.table({"key": [f"k{i}" for i in range(count)], "image": photos,
                     "caption": [f"a photo numbered {i}" for i in range(count)],
                     "label": pa.array([i % 3 for i in range(count)], pa.int64())})


def test_a_parquet_table_keeps_its_own_columns_for_the_kept_rows_in_order_and_resumes_after_a_crash(tiny_model,
                                                                                                    tmp_path):
    import datasets

    source = image_table(9)
    pq.write_table(source, tmp_path / "images.parquet")
    out = tmp_path / "out"
    classify(tmp_path / "images.parquet", out, tiny_model, source="dataset", shard_size=3, id_column="key")
    dest = tmp_path / "kept"
    with pytest.raises(OutputError, match="killed"):
        filter_run(out, dest, where="label <> 1", parts=FilterParts(write_file=crashing_after(1)))
    assert len(list((dest / "data").glob("*.parquet"))) == 1, "the first part, whole; the second never written"
    result = filter_run(out, dest, where="label <> 1")
    parts = sorted((dest / "data").glob("*.parquet"))
    assert [p.name for p in parts] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    kept = pa.concat_tables(pq.read_table(p) for p in parts)
    rows = [i for i in range(9) if i % 3 != 1]
    assert kept.to_pylist() == source.take(rows).to_pylist(), "the source's columns and rows, in order, once"
    assert result.kept == len(rows) and result.items_present == 2 and result.files_written == 2
    loaded = datasets.load_dataset(str(dest), split="train")  # _mv2batch/ is not read as data
    assert loaded.column_names == source.column_names and len(loaded) == len(rows)


KEY, SECRET = "testing-key", "testing-secret"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback: the options a client needs, and an s3fs client for the test's own use."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": KEY, "secret": SECRET}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir("filter-bucket")
    try:
        yield options, fs
    finally:
        server.stop()


def fetched(fs, url: str, folder: Path) -> Path:
    fs.invalidate_cache()
    fs.get(url + "/", str(folder), recursive=True)
    return folder


def test_the_same_from_and_to_s3_folder_and_tars(s3, folder_run, tiny_model, tmp_path):
    options, fs = s3
    photos, local_out = folder_run
    threshold = median_score(local_out)
    filter_run(local_out, tmp_path / "local", where=f"topk_scores[1] >= {threshold}", unique=True)
    fs.put(str(photos) + "/", "filter-bucket/photos", recursive=True)
    out, dest = "s3://filter-bucket/out", "s3://filter-bucket/kept"
    classify("s3://filter-bucket/photos", out, tiny_model, embeddings=True, shard_size=4, storage_options=options)
    find_duplicates(out, storage_options=options)
    with pytest.raises(OutputError, match="killed"):
        filter_run(out, dest, where=f"topk_scores[1] >= {threshold}", unique=True, storage_options=options,
                   threads=1, parts=FilterParts(write_file=crashing_after(2)))
    for leftover in PART_TEMPS.glob(f"{os.getpid()}-*"):  # the crashed PUT's local file (a killed run's: its pid's)
        leftover.unlink()
    result = filter_run(out, dest, where=f"topk_scores[1] >= {threshold}", unique=True, storage_options=options)
    assert result.items_present == 2 and result.files_written == result.kept - 2
    got = fetched(fs, dest, tmp_path / "fetched")
    assert files_under(got) == files_under(tmp_path / "local") and result.kept == len(files_under(got))
    kept_rows = pq.read_table(got / "_mv2batch" / "predictions.parquet").column("id").to_pylist()
    assert kept_rows == sorted(files_under(got)) and json.loads((got / "_mv2batch" / "filter.json").read_text())[
        "complete"]
    assert not [key for key in fs.find(dest) if key.endswith(".tmp")]

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "data-000.tar", tar_samples(0, [0, 1, 2]))
    write_tar(shards / "data-001.tar", tar_samples(3, [3, 5]))
    fs.put(str(shards) + "/", "filter-bucket/shards", recursive=True)
    classify("s3://filter-bucket/shards", "s3://filter-bucket/tar-out", tiny_model, source="webdataset",
             storage_options=options)
    filter_run("s3://filter-bucket/tar-out", "s3://filter-bucket/tar-kept", where="label % 2 = 0",
               storage_options=options)
    got = fetched(fs, "s3://filter-bucket/tar-kept", tmp_path / "tars")
    assert sorted(p.name for p in got.glob("*.tar")) == ["data-000.tar"]
    want = [(n, d) for n, d in tar_members(shards / "data-000.tar") if n.split(".")[0] in {"s00_000", "s00_002"}]
    assert tar_members(got / "data-000.tar") == want


def test_a_table_streamed_from_and_to_s3(s3, tiny_model, tmp_path):
    options, fs = s3
    source = image_table(6)
    pq.write_table(source, tmp_path / "images.parquet")
    fs.put(str(tmp_path / "images.parquet"), "filter-bucket/tables/images.parquet")
    out, dest = "s3://filter-bucket/table-out", "s3://filter-bucket/table-kept"
    classify("s3://filter-bucket/tables/images.parquet", out, tiny_model, source="dataset", shard_size=4,
             streaming=True, storage_options=options)
    result = filter_run(out, dest, where="label = 0", storage_options=options)
    got = fetched(fs, dest, tmp_path / "fetched")
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((got / "data").glob("*.parquet")))
    assert kept.to_pylist() == source.take([0, 3]).to_pylist() and result.kept == 2


def test_a_saved_dataset_keeps_its_features(tiny_model, tmp_path):
    """A save_to_disk folder with a datasets.Image column: the kept rows' parts load back with the same features."""
    import datasets

    table = image_table(5)
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "caption": datasets.Value("string"), "label": datasets.Value("int64")})
    rows = [{**row, "image": {"bytes": row["image"], "path": None}} for row in table.to_pylist()]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    classify(tmp_path / "saved", tmp_path / "out", tiny_model, source="dataset")
    filter_run(tmp_path / "out", tmp_path / "kept", where="id <> 'train/1'")
    loaded = datasets.load_dataset(str(tmp_path / "kept"), split="train")
    assert loaded.features == features
    kept = loaded.cast_column("image", datasets.Image(decode=False)).to_list()
    assert [row["key"] for row in kept] == ["k0", "k2", "k3", "k4"]
    assert [row["image"]["bytes"] for row in kept] == [table.column("image")[i].as_py() for i in (0, 2, 3, 4)]
