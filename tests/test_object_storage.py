"""Object storage: inputs and OUT on S3 (moto's real S3 API server on loopback), crash-safe without rename."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import classify, classify_on_ray, cli, read_rows, segment

from mv2batch.engines.local import LocalParts
from mv2batch.errors import OutputError
from mv2batch.out.files import PART_TEMPS
from mv2batch.report.tables import load_report
from mv2batch.runner.placement import place
from mv2batch.testing import write_tar

# moto's S3 server, CLI processes with AWS's variables, torchrun, Slurm ranks, Ray: CI runs these, the quick tier
# (-m "not slow") does not.
pytestmark = pytest.mark.slow

KEY, SECRET = "testing-key", "testing-secret"


class S3:
    """moto in server mode on 127.0.0.1, and what a client needs to reach it."""

    def __init__(self, endpoint: str):
        import s3fs

        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
        # The CLI's way: AWS's own variables. No metadata service is asked (traffic stays on loopback).
        self.env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        self.buckets = 0

    def bucket(self) -> str:
        """A new, empty bucket's URL."""
        self.buckets += 1
        name = f"bucket-{self.buckets:03d}"
        self.fs.mkdir(name)
        return f"s3://{name}"

    def upload(self, folder: Path, url: str) -> str:
        self.fs.put(str(folder) + "/", url, recursive=True)
        return url

    def keys(self, url: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(k.split("/", 1)[1] for k in self.fs.find(url))

    def download(self, url: str, folder: Path) -> Path:
        self.fs.invalidate_cache()
        self.fs.get(url + "/", str(folder), recursive=True)
        return folder

    def set_auth(self, enforced: bool) -> None:
        """moto checks credentials and IAM policies only when told to (its reset-auth call)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", method="POST",
                                         data=b"0" if enforced else b"inf", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3(f"http://{host}:{port}")
    finally:
        server.stop()


def _photos(folder: Path, count: int) -> Path:
    from conftest import real_photos

    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(real_photos(count, (160, 120))):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        photo.save(sub / f"photo_{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("object-storage") / "photos", 12)


@pytest.fixture(scope="module")
def photos_run(photos, tiny_model, tmp_path_factory):
    """(report, OUT) of one local run over the photos with the default options, for the tests that only read it."""
    out = tmp_path_factory.mktemp("object-storage") / "local"
    return classify(photos, out, tiny_model), out


def _same_rows(got: list[dict], want: list[dict]) -> None:
    """The rows of two runs equal, but for where their photos were read from."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for row, expected in zip(got, want):
        assert {k: v for k, v in row.items() if k != "path"} == {k: v for k, v in expected.items() if k != "path"}


def _rows_at(s3: S3, url: str, scratch: Path) -> list[dict]:
    return read_rows(s3.download(url, scratch))


def test_classify_folder_s3_to_s3_gives_the_local_rows(s3, photos, tiny_model, tmp_path):
    local = classify(photos, tmp_path / "local", tiny_model, shard_size=5)
    source = s3.upload(photos, s3.bucket() + "/photos")
    out = s3.bucket() + "/runs/one"
    report = classify(source, out, tiny_model, shard_size=5, storage_options=s3.options)
    assert report.complete and report.n_images == local.n_images == 12 and report.n_errors == 0
    _same_rows(_rows_at(s3, out, tmp_path / "fetched"), read_rows(tmp_path / "local"))
    keys = s3.keys(out)
    assert keys == sorted(["runs/one/run.json", *(f"runs/one/predictions/part-0000{i}.parquet" for i in range(3)),
                           *(f"runs/one/shards/0000{i}.json" for i in range(3)), "runs/one/report/summary.parquet",
                           "runs/one/report/index.html"])
    again = classify(source, out, tiny_model, shard_size=5, storage_options=s3.options)
    assert again.ran_now == 0 and again.complete, "a second run finds every shard committed"
    assert load_report(out, s3.options).n_images == 12
    with pytest.raises(OutputError, match=r"holds a different run \(shard_size: 5 -> 6\)"):
        classify(source, out, tiny_model, shard_size=6, storage_options=s3.options)
    replaced = classify(source, out, tiny_model, shard_size=6, overwrite=True, storage_options=s3.options)
    assert replaced.ran_now == 12 and len([k for k in s3.keys(out) if "/predictions/" in k]) == 2
    assert len([k for k in s3.keys(out) if "/shards/" in k]) == 2, "--overwrite removed the old run's objects"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mv2batch", *args, "--device", "cpu", "--quiet"]


def test_webdataset_tars_on_s3_read_in_worker_processes_give_the_local_rows(s3, photos, tiny_model, tmp_path):
    """Tars named by a brace pattern on S3, streamed by a forked loader worker (its own s3fs instance), through
    the CLI with AWS's own variables (AWS_ENDPOINT_URL)."""
    files = sorted(photos.rglob("*.jpg"))
    tars = tmp_path / "tars"
    tars.mkdir()
    for number in range(3):
        write_tar(tars / f"part-{number:03d}.tar",
                  [(f.stem, {"jpg": f.read_bytes(), "cls": b"3"}) for f in files[number * 4:(number + 1) * 4]])
    bucket = s3.bucket()
    s3.upload(tars, bucket + "/tars")
    classify(str(tars / "part-{000..002}.tar"), tmp_path / "local", tiny_model, source="webdataset", workers=1)
    subprocess.run(_cli("classify", "webdataset", bucket + "/tars/part-{000..002}.tar", "-o", bucket + "/out",
                        "--model", str(tiny_model), "--workers", "1"), check=True, timeout=300, env=s3.env)
    _same_rows(_rows_at(s3, bucket + "/out", tmp_path / "fetched"), read_rows(tmp_path / "local"))
    assert all(row["path"].startswith(bucket + "/tars/part-") for row in _rows_at(s3, bucket + "/out", tmp_path / "f2"))


def test_segment_with_masks_on_s3_writes_the_local_masks(s3, photos, tiny_segmenter, tmp_path):
    segment(photos, tmp_path / "local", tiny_segmenter, masks_dir=tmp_path / "masks")
    bucket = s3.bucket()
    source = s3.upload(photos, bucket + "/photos")
    report = segment(source, bucket + "/out", tiny_segmenter, masks_dir=bucket + "/masks",
                     overlays_dir=bucket + "/over", storage_options=s3.options)
    assert report.complete and report.n_errors == 0
    _same_rows(_rows_at(s3, bucket + "/out", tmp_path / "fetched"), read_rows(tmp_path / "local"))
    local_masks = sorted(p.relative_to(tmp_path / "masks").as_posix() for p in (tmp_path / "masks").rglob("*.png"))
    assert s3.keys(bucket + "/masks") == [f"masks/{name}" for name in local_masks] and len(local_masks) == 12
    for name in local_masks:
        assert s3.fs.cat_file(f"{bucket}/masks/{name}") == (tmp_path / "masks" / name).read_bytes(), name
    assert len(s3.keys(bucket + "/over")) == 12
    # export coco from the S3 OUT to S3: the same two files as from the local OUT to local files.
    from mv2batch.report.coco import export_coco

    export_coco(tmp_path / "local", tmp_path / "results.json")
    done = export_coco(bucket + "/out", bucket + "/coco/results.json", s3.options)
    assert (done.results, done.images_file) == (f"{bucket}/coco/results.json", f"{bucket}/coco/results.images.json")
    for name in ("results.json", "results.images.json"):
        assert s3.fs.cat_file(f"{bucket}/coco/{name}") == (tmp_path / name).read_bytes(), name


def test_eval_imagenet_val_from_s3_gives_the_local_report(s3, imagenet_model, tmp_path):
    from conftest import real_photos

    from mv2batch.inputs.eval_layouts import imagenet_wnids

    wnids = imagenet_wnids()
    val = tmp_path / "val"
    for i, photo in enumerate(real_photos(8, (160, 120))):
        (val / wnids[i % 3]).mkdir(parents=True, exist_ok=True)
        photo.save(val / wnids[i % 3] / f"photo_{i}.JPEG", quality=90)
    local = classify(val, tmp_path / "local", imagenet_model, source="imagenet", shard_size=3)
    source = s3.upload(val, s3.bucket() + "/imagenet/val")
    remote = classify(source, s3.bucket() + "/eval", imagenet_model, source="imagenet", shard_size=3,
                      storage_options=s3.options)
    assert remote.metrics == local.metrics and remote.n_images == 8 and remote.per_class == local.per_class
    assert "class folders" in json.loads(s3.fs.cat_file(remote.out + "/run.json"))["input"]["description"]


@pytest.fixture(scope="module")
def reference(s3, tiny_model, tmp_path_factory):
    """Twenty photos on S3 and the output of one uninterrupted local run over them, in shards of 3."""
    root = tmp_path_factory.mktemp("s3-reference")
    folder = _photos(root / "photos", 20)
    classify(folder, root / "reference", tiny_model, shard_size=3, batch_size=1)
    return s3.upload(folder, s3.bucket() + "/photos"), root / "reference"


def _assert_committed_output(s3: S3, out: str, reference: Path, scratch: Path) -> None:
    """The run's rows are the reference's (none missing, none twice), and OUT holds only committed objects."""
    got = _rows_at(s3, out, scratch)
    assert [r["id"] for r in got] == [r["id"] for r in read_rows(reference)]
    _same_rows(got, read_rows(reference))
    prefix = out.split("/", 3)[3]
    names = sorted(k[len(prefix) + 1:] for k in s3.keys(out))
    expected = ["report/summary.parquet", "report/index.html", "run.json",
                *(f"predictions/part-{i:05d}.parquet" for i in range(7)), *(f"shards/{i:05d}.json" for i in range(7))]
    assert names == sorted(expected)


def _markers(s3: S3, out: str) -> int:
    s3.fs.invalidate_cache()
    try:
        return len(s3.fs.ls(out + "/shards"))
    except FileNotFoundError:
        return 0


def test_sigkill_during_an_s3_run_then_rerun_gives_the_uninterrupted_output(s3, reference, tiny_model, tmp_path):
    source, expected = reference
    out = s3.bucket() + "/out"
    args = _cli("classify", "folder", source, "-o", out, "--model", str(tiny_model), "--shard-size", "3",
                "--batch-size", "1", "--workers", "0")
    process = subprocess.Popen(args, env=s3.env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and (
            _markers(s3, out) < 2 or not list(PART_TEMPS.glob(f"{process.pid}-*"))):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 2 <= _markers(s3, out) < 7, "the kill must land mid-run"
    assert list(PART_TEMPS.glob(f"{process.pid}-*")), "the kill must land while a part is being made"
    # The rerun in-process (the killed run was a process): the same run, its storage options passed.
    classify(source, out, tiny_model, shard_size=3, batch_size=1, storage_options=s3.options)
    _assert_committed_output(s3, out, expected, tmp_path / "fetched")
    assert not list(PART_TEMPS.glob(f"{process.pid}-*")), "the killed run's local part was left behind"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_into_one_s3_out(s3, reference, tiny_model, tmp_path):
    source, expected = reference
    out = s3.bucket() + "/out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), *_cli("classify", "folder", source, "-o", out, "--model", str(tiny_model),
                                        "--shard-size", "3", "--batch-size", "1", "--workers", "0")[1:]]
    subprocess.run(command, check=True, timeout=300, env={**s3.env, "OMP_NUM_THREADS": "1"})
    _assert_committed_output(s3, out, expected, tmp_path / "fetched")
    ranks = {json.loads(s3.fs.cat_file(f"{out}/shards/{i:05d}.json"))["rank"] for i in range(7)}
    assert ranks == {0, 1}


def test_polars_reads_the_s3_predictions_as_one_table(s3, photos, tiny_model, tmp_path):
    import polars as pl

    out = s3.bucket() + "/out"
    classify(s3.upload(photos, s3.bucket() + "/photos"), out, tiny_model, shard_size=5, storage_options=s3.options)
    options = {"aws_endpoint_url": s3.endpoint, "aws_access_key_id": KEY, "aws_secret_access_key": SECRET,
               "aws_region": "us-east-1", "aws_allow_http": "true"}
    table = pl.read_parquet(out + "/predictions/*.parquet", storage_options=options)
    assert table.height == 12 and sorted(table["id"].to_list()) == sorted(r["id"] for r in _rows_at(s3, out, tmp_path))
    assert set(table["shard"].to_list()) == {0, 1, 2} and table["status"].to_list() == ["ok"] * 12


def _one_line_error(args: list[str], env: dict, code: int) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("mv2batch: error: ") and "Traceback" not in result.stderr, lines
    return lines[0]


@pytest.fixture
def reader(s3, photos):
    """An IAM user allowed one bucket only; moto checks credentials while the test runs."""
    import boto3

    allowed, denied = s3.bucket(), s3.bucket()
    s3.upload(photos, allowed + "/photos")
    s3.upload(photos, denied + "/photos")
    iam = boto3.client("iam", endpoint_url=s3.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                       region_name="us-east-1")
    iam.create_user(UserName="reader")
    name = allowed.removeprefix("s3://")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
        f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
    iam.put_user_policy(UserName="reader", PolicyName="one-bucket", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    env = {**s3.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    s3.set_auth(True)
    try:
        yield allowed, denied, env
    finally:
        s3.set_auth(False)


def test_denied_bucket_and_wrong_credentials_are_one_line_before_any_work(s3, reader, tiny_model):
    allowed, denied, env = reader
    run = _cli("classify", "folder", denied + "/photos", "-o", allowed + "/out", "--model", str(tiny_model))
    line = _one_line_error(run, env, 3)
    assert f"access denied to input {denied}/photos" in line and "Access Denied" in line
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret", "AWS_ACCESS_KEY_ID": "AKIANOTAKEY"}
    line = _one_line_error(_cli("classify", "folder", allowed + "/photos", "-o", allowed + "/out2", "--model",
                                str(tiny_model)), wrong, 3)
    assert "access denied to input" in line and "Access Key Id you provided does not exist" in line
    line = _one_line_error(_cli("classify", "folder", allowed + "/photos", "-o", denied + "/out", "--model",
                                str(tiny_model)), env, 5)
    assert f"cannot write {denied}/out: access denied" in line
    s3.set_auth(False)
    try:
        assert not [k for k in s3.keys(allowed) if k.startswith("out")], "a refused run writes nothing"
    finally:
        s3.set_auth(True)


def test_missing_bucket_unreachable_endpoint_and_missing_package_are_one_line(s3, photos, tiny_model, tmp_path):
    source = s3.upload(photos, s3.bucket() + "/photos")
    model = ["--model", str(tiny_model)]
    line = _one_line_error(_cli("classify", "folder", "s3://no-such-bucket/photos", "-o", str(tmp_path / "o"),
                                *model), s3.env, 3)
    assert "input not found: s3://no-such-bucket/photos" in line and "bucket does not exist" in line
    line = _one_line_error(_cli("classify", "folder", source, "-o", "s3://no-such-bucket/out", *model), s3.env, 5)
    assert "s3://no-such-bucket/out" in line and "bucket does not exist" in line
    unreachable = json.dumps({"endpoint_url": f"http://127.0.0.1:{_free_port()}",
                              "config_kwargs": {"retries": {"max_attempts": 1}}})
    line = _one_line_error(_cli("classify", "folder", source, "-o", str(tmp_path / "o"), *model,
                                "--storage-options", unreachable), s3.env, 3)
    assert f"cannot reach input {source}" in line and "Could not connect" in line
    line = _one_line_error(_cli("classify", "folder", "gs://bucket/photos", "-o", str(tmp_path / "o"), *model),
                           s3.env, 2)
    assert "gs:// URLs need gcsfs: pip install 'mv2batch[gcs]'" in line
    line = _one_line_error(_cli("classify", "folder", source, "-o", str(tmp_path / "o"), *model,
                                "--storage-options", "{endpoint"), s3.env, 2)
    assert "--storage-options is not JSON" in line
    assert not (tmp_path / "o").exists()


def test_an_object_deleted_between_listing_and_reading_is_an_error_row(s3, photos, tiny_model, tmp_path):
    source = s3.upload(photos, s3.bucket() + "/photos")

    def delete_then_place(job, local_rank=None):  # after the listing (describe_job), before any read
        s3.fs.rm(source + "/a/photo_03.jpg")
        return place(job, local_rank)

    report = classify(source, tmp_path / "out", tiny_model, parts=LocalParts(place=delete_then_place),
                      storage_options=s3.options)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert report.n_images == 12 and report.n_errors == 1
    gone = rows["a/photo_03.jpg"]
    assert gone["status"] == "error" and gone["error"].startswith(f"cannot read {source}/a/photo_03.jpg")
    assert all(row["status"] == "ok" for key, row in rows.items() if key != "a/photo_03.jpg")


class FlakyS3:
    """An fsspec filesystem over S3 whose reads fail as a throttled or reset connection does: each object's
    first `failures` reads raise (moto cannot throttle). Registered as flaky-s3:// by the test."""

    failures = 1
    forever: set[str] = set()  # keys that never read
    attempts: dict[str, int] = {}

    @classmethod
    def kind(cls):
        import s3fs

        class Flaky(s3fs.S3FileSystem):
            protocol = ("flaky-s3",)

            async def _cat_file(self, path, *args, **kwargs):
                key = self._strip_protocol(path)
                cls.attempts[key] = cls.attempts.get(key, 0) + 1
                if key in cls.forever or cls.attempts[key] <= cls.failures:
                    raise ConnectionResetError(104, "Connection reset by peer")
                return await super()._cat_file(path, *args, **kwargs)

        return Flaky


def test_a_transient_read_failure_is_retried_and_a_lasting_one_is_an_error_row(s3, photos, photos_run, tiny_model,
                                                                               tmp_path):
    import fsspec

    fsspec.register_implementation("flaky-s3", FlakyS3.kind(), clobber=True)
    bucket = s3.bucket()
    s3.upload(photos, bucket + "/photos")
    source = bucket.replace("s3://", "flaky-s3://") + "/photos"
    FlakyS3.forever = {bucket.removeprefix("s3://") + "/photos/b/photo_04.jpg"}
    report = classify(source, tmp_path / "out", tiny_model, storage_options=s3.options)
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert report.n_images == 12 and report.n_errors == 1
    assert rows["b/photo_04.jpg"]["error"].endswith("Connection reset by peer (failed 4 times)")
    read_once_more = [key for key, n in FlakyS3.attempts.items() if key not in FlakyS3.forever]
    # Twice by the run (a failure, then the retry), once more by the HTML report for its thumbnails.
    assert len(read_once_more) == 11 and all(FlakyS3.attempts[key] == 3 for key in read_once_more)
    local, local_out = photos_run
    _same_rows([r for r in read_rows(tmp_path / "out") if r["id"] != "b/photo_04.jpg"],
               [r for r in read_rows(local_out) if r["id"] != "b/photo_04.jpg"])
    assert local.n_errors == 0


def test_tables_on_s3_bytes_streamed_and_paths_relative_to_the_table(s3, photos, photos_run, tiny_model, tmp_path):
    """A Parquet of image bytes on S3, read whole and streamed, and a table of paths relative to its own
    prefix (each image then an object read in the worker): the folder's rows, ids from the key column."""
    import pyarrow as pa

    files = sorted(photos.rglob("*.jpg"))
    ids = [f.relative_to(photos).as_posix() for f in files]
    bucket = s3.bucket()
    pq.write_table(pa.table({"key": ids, "jpg": [f.read_bytes() for f in files]}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"key": ids, "file": [f"photos/{i}" for i in ids]}), tmp_path / "paths.parquet")
    s3.fs.put(str(tmp_path / "bytes.parquet"), bucket.removeprefix("s3://") + "/tables/bytes.parquet")
    s3.fs.put(str(tmp_path / "paths.parquet"), bucket.removeprefix("s3://") + "/paths.parquet")
    s3.upload(photos, bucket + "/photos")
    want = read_rows(photos_run[1])
    runs = {"whole": dict(input_path=bucket + "/tables/bytes.parquet"),
            "streamed": dict(input_path=bucket + "/tables", streaming=True),
            "paths": dict(input_path=bucket + "/paths.parquet", image_column="file")}
    for name, run in runs.items():
        report = classify(run.pop("input_path"), tmp_path / name, tiny_model, source="dataset", id_column="key",
                          storage_options=s3.options, **run)
        assert report.n_images == 12 and report.n_errors == 0, name
        _same_rows(read_rows(tmp_path / name), want)
    paths = [row["path"] for row in read_rows(tmp_path / "paths")]
    assert paths == [f"{bucket}/photos/{i}" for i in ids]


def test_slurm_tasks_without_a_barrier_share_one_s3_out_and_only_rank_0_writes_run_json(s3, reference,
                                                                                        tiny_model, tmp_path):
    """Rank 1 starts first: on an object store it waits for rank 0's run.json instead of writing the same key."""
    source, expected = reference
    out = s3.bucket() + "/out"
    args = _cli("classify", "folder", source, "-o", out, "--model", str(tiny_model), "--shard-size", "3",
                "--batch-size", "1", "--workers", "0")
    env = {**s3.env, "SLURM_NTASKS": "2", "OMP_NUM_THREADS": "1"}
    second = subprocess.Popen(args, env={**env, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    time.sleep(8)  # rank 1 has listed the input and is waiting
    assert second.poll() is None and not s3.fs.exists(out + "/run.json")
    first = subprocess.run(args, env={**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, timeout=300)
    assert first.returncode == 0 and second.wait(timeout=300) == 0
    _assert_committed_output(s3, out, expected, tmp_path / "fetched")
    ranks = {json.loads(s3.fs.cat_file(f"{out}/shards/{i:05d}.json"))["rank"] for i in range(7)}
    assert ranks == {0, 1}


def test_a_part_without_its_marker_is_written_over_by_the_next_run(s3, reference, tiny_model, tmp_path):
    """A crash between a part's PUT and its marker's leaves a part no marker vouches for: the next run runs that
    shard again and writes its part over, whatever the stray object holds."""
    source, expected = reference
    out = s3.bucket() + "/out"
    options = {"shard_size": 3, "batch_size": 1, "storage_options": s3.options}
    classify(source, out, tiny_model, **options)
    s3.fs.rm(out + "/shards/00004.json")
    s3.fs.pipe(out + "/predictions/part-00004.parquet", b"half a part")
    s3.fs.rm(out + "/report", recursive=True)
    classify(source, out, tiny_model, **options)
    _assert_committed_output(s3, out, expected, tmp_path / "fetched")


def test_ray_tasks_read_and_write_s3_with_the_runs_storage_options(s3, reference, tiny_model, local_ray, tmp_path):
    source, expected = reference
    out = s3.bucket() + "/out"
    report = classify_on_ray(source, out, tiny_model, shard_size=3, batch_size=1, storage_options=s3.options)
    assert report.complete and report.ran_now == 20
    _assert_committed_output(s3, out, expected, tmp_path / "fetched")


def test_embed_to_s3_then_dedup_of_the_s3_out_through_the_cli(s3, photos, tiny_model, tmp_path):
    """Photos and OUT on S3 (AWS's own variables): the embeddings equal a local run's, and dedup reads them from
    the bucket and writes duplicates.parquet beside them, naming the objects of a copied photo's group."""
    copies = tmp_path / "with-a-copy"
    copies.mkdir()
    for path in sorted(photos.rglob("*.jpg")):
        (copies / path.name).write_bytes(path.read_bytes())
    (copies / "copy.jpg").write_bytes((copies / "photo_03.jpg").read_bytes())
    bucket = s3.bucket()
    s3.upload(copies, bucket + "/photos")
    classify(copies, tmp_path / "local", tiny_model, task="embed")  # the local reference: in-process
    subprocess.run(_cli("embed", "folder", bucket + "/photos", "-o", bucket + "/out", "--model", str(tiny_model),
                        "--workers", "0"), env=s3.env, check=True, timeout=300)
    _same_rows(_rows_at(s3, bucket + "/out", tmp_path / "fetched"), read_rows(tmp_path / "local"))
    assert cli("dedup", str(tmp_path / "local")).exit_code == 0
    done = subprocess.run([sys.executable, "-m", "mv2batch", "dedup", bucket + "/out"], env=s3.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "13 items, 13 with embeddings" in done.stdout and f"{bucket}/out/report/duplicates.parquet" in done.stdout
    s3.fs.invalidate_cache()
    with s3.fs.open(f"{bucket}/out/report/duplicates.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    local = pq.read_table(tmp_path / "local" / "report" / "duplicates.parquet").to_pylist()
    # Which other photos pass the threshold depends on the random weights: the local run's groups are the truth.
    assert [row["path"] for row in rows] == [f"{bucket}/photos/{row['id']}" for row in rows]
    assert [{**row, "path": None} for row in rows] == [{**row, "path": None} for row in local]
    original = next(row for row in rows if row["id"] == "photo_03.jpg")  # copy.jpg comes first: it represents
    assert original["duplicate_of"] == "copy.jpg" and original["similarity"] == 1.0
