"""Tables of images: Parquet / CSV of image bytes, {bytes, path} structs, paths or URLs; ids from a column."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import classify, encoded_photos, photo_folder, read_rows

from mv2batch.errors import InputError


def _classify_table(table: Path, out: Path, model: Path, **options):
    return classify(table, out, model, source="dataset", **options)


def _by_key(rows: list[dict], key=lambda row: Path(row["id"]).stem) -> dict[str, dict]:
    return {key(row): row for row in rows}


@pytest.fixture(scope="module")
def photos():
    return encoded_photos(8)


@pytest.fixture(scope="module")
def folder_rows(tmp_path_factory, photos, tiny_model):
    root = tmp_path_factory.mktemp("tables")
    classify(photo_folder(photos, root / "folder"), root / "out", tiny_model)
    return _by_key(read_rows(root / "out"))


def _assert_rows_match(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    assert rows.keys() == expected.keys()
    for key, row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert row["topk_ids"] == expected[key]["topk_ids"], key
        assert row["topk_scores"] == pytest.approx(expected[key]["topk_scores"], abs=1e-6)
        assert (row["width"], row["height"]) == (expected[key]["width"], expected[key]["height"])


def test_a_parquet_of_image_bytes_is_found_without_naming_its_column(photos, folder_rows, tiny_model, tmp_path):
    table = pa.table({"key": [k for _, k, _ in photos], "jpg": [d for _, _, d in photos], "size": [len(d) for
                                                                                                     *_, d in photos]})
    pq.write_table(table, tmp_path / "images.parquet")
    _classify_table(tmp_path / "images.parquet", tmp_path / "out", tiny_model, id_column="key")
    rows = read_rows(tmp_path / "out")
    assert sorted(row["id"] for row in rows) == sorted(k for _, k, _ in photos)  # ids from the key column
    _assert_rows_match(_by_key(rows), folder_rows)


def test_a_struct_of_bytes_and_path_is_found_and_ids_default_to_split_and_index(photos, folder_rows, tiny_model,
                                                                                  tmp_path):
    cells = [{"bytes": data, "path": f"{key}.jpg"} for _, key, data in photos]
    pq.write_table(pa.table({"image": cells}), tmp_path / "images.parquet")
    _classify_table(tmp_path / "images.parquet", tmp_path / "out", tiny_model)
    rows = read_rows(tmp_path / "out")
    assert sorted(row["id"] for row in rows) == sorted(f"train/{i}" for i in range(len(photos)))
    _assert_rows_match(_by_key(rows, key=lambda row: Path(row["path"]).stem), folder_rows)


def test_a_column_of_relative_paths_points_from_the_tables_folder(photos, folder_rows, tiny_model, tmp_path,
                                                                  monkeypatch):
    data = tmp_path / "data"
    photo_folder(photos, data / "images")
    pacsv.write_csv(pa.table({"file": [f"images/{key}.jpg" for _, key, _ in photos]}), data / "index.csv")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the table, not to where the command runs
    _classify_table(data / "index.csv", tmp_path / "out", tiny_model, image_column="file", id_column="file")
    rows = read_rows(tmp_path / "out")
    assert all(row["path"] == str(data / row["id"]) for row in rows)
    _assert_rows_match(_by_key(rows), folder_rows)


@pytest.fixture
def served(tmp_path, photos):
    """The photos over HTTP on loopback (a real server; nothing leaves the machine)."""
    root = photo_folder(photos, tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_column_of_urls_is_fetched_and_a_missing_one_is_an_error_row(served, photos, folder_rows, tiny_model,
                                                                       tmp_path):
    urls = [f"{served}/{key}.jpg" for _, key, _ in photos] + [f"{served}/missing.jpg"]
    pq.write_table(pa.table({"url": urls, "name": [Path(u).stem for u in urls]}), tmp_path / "urls.parquet")
    report = _classify_table(tmp_path / "urls.parquet", tmp_path / "out", tiny_model, image_column="url",
                             id_column="name")
    rows = _by_key(read_rows(tmp_path / "out"))
    missing = rows.pop("missing")
    assert missing["status"] == "error" and "HTTP 404" in missing["error"] and report.n_errors == 1
    _assert_rows_match(rows, folder_rows)


def test_a_bad_id_column_is_one_line_before_any_work(photos, tiny_model, tmp_path):
    table = pa.table({"jpg": [d for *_, d in photos[:3]], "key": ["a", "b", "a"]})
    pq.write_table(table, tmp_path / "images.parquet")
    with pytest.raises(InputError, match="repeats 'a'"):
        _classify_table(tmp_path / "images.parquet", tmp_path / "out", tiny_model, id_column="key")
    with pytest.raises(InputError, match="no column 'name' for --id-column"):
        _classify_table(tmp_path / "images.parquet", tmp_path / "out", tiny_model, id_column="name")
    assert not (tmp_path / "out").exists()


def _cache_bytes() -> int:
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0


def test_streaming_a_local_parquet_leaves_the_datasets_cache_as_it_was(photos, tiny_model, tmp_path):
    table = pa.table({"jpg": [d for *_, d in photos], "key": [k for _, k, _ in photos]})
    pq.write_table(table, tmp_path / "images.parquet")
    before = _cache_bytes()
    streamed = _classify_table(tmp_path / "images.parquet", tmp_path / "streamed", tiny_model, streaming=True,
                               id_column="key")
    assert streamed.n_images == len(photos) and _cache_bytes() == before
    _classify_table(tmp_path / "images.parquet", tmp_path / "copied", tiny_model, id_column="key")
    assert _cache_bytes() > before  # without --streaming, datasets copies the table into its cache
    assert read_rows(tmp_path / "streamed") == read_rows(tmp_path / "copied")


@pytest.mark.slow
def test_quiet_silences_the_datasets_progress_lines_too(photos, tiny_model, tmp_path):
    pq.write_table(pa.table({"jpg": [d for *_, d in photos[:2]]}), tmp_path / "images.parquet")
    command = [sys.executable, "-m", "mv2batch", "classify", "dataset", str(tmp_path / "images.parquet"), "-o",
               str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu", "--workers", "0"]
    from mv2batch.cli.progress import QUIET_ENVIRONMENT

    # An in-process --quiet run of another test has set these here: the loud run must not inherit them.
    env = {key: value for key, value in os.environ.items() if key not in QUIET_ENVIRONMENT}
    loud = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, env=env)
    assert "Generating train split" in loud.stderr  # what --quiet must silence is there without it
    pq.write_table(pa.table({"jpg": [d for *_, d in photos[2:4]]}), tmp_path / "other.parquet")
    command[5], command[7] = str(tmp_path / "other.parquet"), str(tmp_path / "quiet")
    quiet = subprocess.run([*command, "--quiet"], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert quiet.stderr == "" and quiet.stdout == ""


def test_tars_given_as_a_dataset_point_to_the_webdataset_command(photos, tmp_path):
    from test_webdataset import _as_tars

    tars = _as_tars(photos[:2], tmp_path / "tars")
    for name in (tars[0], tmp_path / "tars"):
        with pytest.raises(InputError, match="classify webdataset"):
            _classify_table(name, tmp_path / "out", tmp_path / "no-model-needed")
