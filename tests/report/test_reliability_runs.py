"""Issue 34, commands that read a run: rich markup in a path (9), run.json of another version (10), export coco of
an unfinished run (11), and the wording of a deleted object's row and of a report refused by the store."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import classify, read_rows, real_photos, segment
from typer.testing import CliRunner

from mv2batch.cli.app import app
from mv2batch.errors import OutputError


def _photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(real_photos(count)):
        photo.resize((64, 48)).save(folder / f"p{i}.jpg", quality=90)
    return folder


def _one_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model) -> Path:
    """A finished classify run."""
    root = tmp_path_factory.mktemp("finished")
    classify(_photos(root / "photos", 2), root / "out", tiny_model)
    return root / "out"


def test_a_path_holding_rich_markup_is_printed_as_it_is(tiny_model, tmp_path):
    """Point 9: a folder `[/bold]` raised rich's MarkupError after the shard was committed, and again from
    `mv2batch report`; `Trip [paris]` was shown as `Trip`."""
    folder = _photos(tmp_path / "Trip [paris]" / "[/bold]", 2)
    out = tmp_path / "Trip [paris]" / "out"
    run = CliRunner().invoke(app, ["classify", "folder", str(folder), "-o", str(out), "--model", str(tiny_model),
                                   "--device", "cpu", "--workers", "0"])
    assert run.exit_code == 0 and run.exception is None, run.output
    shown = CliRunner().invoke(app, ["report", str(out)], env={"COLUMNS": "400"})  # paths on one line each
    assert shown.exit_code == 0 and "[/bold]" in shown.output and "Trip [paris]" in shown.output, shown.output


@pytest.mark.parametrize("change", ["empty", "no plan", "task detect", "not an object"])
def test_a_run_json_of_another_version_is_one_line_for_report_export_and_dedup(finished, tmp_path, change):
    """Point 10: `mv2batch report` on a run.json of another version ({}, no plan, task detect): KeyError."""
    out = tmp_path / "other"
    shutil.copytree(finished, out)
    run_info = json.loads((out / "run.json").read_text())
    edited = {"empty": {}, "no plan": {k: v for k, v in run_info.items() if k != "plan"},
              "task detect": {**run_info, "task": "detect"}, "not an object": [run_info]}[change]
    (out / "run.json").write_text(json.dumps(edited))
    for command in (["report", str(out)], ["export", "coco", str(out), "-o", str(tmp_path / "r.json")],
                    ["dedup", str(out)]):
        line = _one_line(CliRunner().invoke(app, command), 5)
        assert "is not a run this mv2batch version reads" in line and str(out / "run.json") in line, line
    assert "'detect'" in line if change == "task detect" else True


def test_export_coco_of_an_unfinished_run_says_how_many_shards_are_missing(tiny_segmenter, tmp_path):
    """Point 11: `export coco` of a run killed after 1 of 3 shards printed its counts and exited 0."""
    from mv2batch.report.coco import export_coco

    out = tmp_path / "out"
    segment(_photos(tmp_path / "photos", 3), out, tiny_segmenter, shard_size=1)
    for marker in ("00001.json", "00002.json"):  # as a run killed after its first shard leaves it
        (out / "shards" / marker).unlink()
    line = _one_line(CliRunner().invoke(app, ["export", "coco", str(out), "-o", str(tmp_path / "r.json")]), 5)
    assert "unfinished run: 2 of its 3 shards are missing" in line and "--allow-incomplete" in line
    assert not (tmp_path / "r.json").exists()
    done = export_coco(out, tmp_path / "r.json", allow_incomplete=True)
    assert done.images == 1 and done.shards_done == 1 and done.shards_total == 3 and not done.complete
    assert len(json.loads((tmp_path / "r.images.json").read_text())["images"]) == 1


KEY, SECRET = "testing-key", "testing-secret"


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server on 127.0.0.1, stopped after the module."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}", {"endpoint_url": f"http://{host}:{port}", "key": KEY, "secret": SECRET}
    finally:
        server.stop()


def _enforce_auth(endpoint: str, enforced: bool) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", method="POST",
                                     data=b"0" if enforced else b"inf", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).read()


def test_a_deleted_object_says_why_and_a_refused_report_says_it_was_reading(moto, finished, tiny_model, tmp_path):
    """Low: a deleted object's error row said only its key; `report` with bad credentials said "cannot write"."""
    import s3fs

    endpoint, options = moto
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir("reliability")
    fs.put(str(_photos(tmp_path / "photos", 1) / "p0.jpg"), "reliability/photos/p0.jpg")
    urls = ["s3://reliability/photos/p0.jpg", "s3://reliability/photos/deleted.jpg"]
    pq.write_table(pa.table({"url": urls, "name": ["kept", "deleted"]}), tmp_path / "t.parquet")
    classify(tmp_path / "t.parquet", tmp_path / "out", tiny_model, source="dataset", image_column="url",
             id_column="name", storage_options=options)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert rows["kept"]["status"] == "ok" and "no such object" in rows["deleted"]["error"]
    fs.put(str(finished), "reliability/out", recursive=True)
    _enforce_auth(endpoint, True)
    try:
        from mv2batch.report.tables import load_report

        with pytest.raises(OutputError) as refused:
            load_report("s3://reliability/out", {**options, "key": "AKIANOTAKEY", "secret": "not-the-secret"})
    finally:
        _enforce_auth(endpoint, False)
    assert "cannot write" not in str(refused.value) and "s3://reliability/out" in str(refused.value)
    assert "access denied to OUT" in str(refused.value) or "cannot reach OUT" in str(refused.value)
