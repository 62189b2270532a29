"""Shards: resumption after SIGKILL, torchrun / Slurm process sharing, retries, full disk."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (
    assert_same_rows_across_batches,
    classify,
    classify_on_ray,
    free_port,
    kill_during_a_shard,
    noisy_photos,
    read_rows,
)

from mv2batch.errors import OutputError
from mv2batch.out.rundir import RunDir
from mv2batch.report.tables import load_report, write_report
from mv2batch.runner.shard_plan import Rank, rank_from_env

STABLE_SUMMARY = ["task", "dataset", "model", "n_images", "n_errors"]


def _cli(folder: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["-m", "mv2batch", "classify", "folder", str(folder), "-o", str(out), "--model", str(model),
            "--device", "cpu", "--workers", "0", "--quiet", *extra]


def _summary(out: Path) -> dict:
    row = pq.read_table(out / "report" / "summary.parquet").to_pylist()[0]
    return {key: row[key] for key in STABLE_SUMMARY}


def _assert_same_output(out: Path, reference: Path) -> None:
    rows, expected = read_rows(out), read_rows(reference)
    assert [r["id"] for r in rows] == [r["id"] for r in expected]  # none missing, none duplicated
    for row, want in zip(rows, expected):
        assert row["topk_ids"] == want["topk_ids"], row["id"]
        np.testing.assert_allclose(row["topk_scores"], want["topk_scores"], atol=1e-6)
        assert (row["status"], row["shard"], row["width"], row["height"]) == (
            want["status"], want["shard"], want["width"], want["height"])
    assert _summary(out) == _summary(reference)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """Twenty photos and the output of one uninterrupted run over them, in shards of 3."""
    root = tmp_path_factory.mktemp("shards")
    folder = noisy_photos(root / "images", 20)
    classify(folder, root / "reference", tiny_model, shard_size=3, batch_size=1)
    return folder, root / "reference"


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_output(reference, tiny_model, tmp_path):
    folder, expected = reference
    out = tmp_path / "out"
    args = _cli(folder, out, tiny_model, "--shard-size", "3", "--batch-size", "1")
    process = subprocess.Popen([sys.executable, *args])
    killed_with_temp = kill_during_a_shard(process, out, after_markers=2)
    markers = list((out / "shards").glob("*.json"))
    assert 2 <= len(markers) < 7, "the kill must land mid-run"
    assert killed_with_temp, "the kill must land while a shard's part was being written"
    classify(folder, out, tiny_model, shard_size=3, batch_size=1)  # the rerun: in-process is the same
    _assert_same_output(out, expected)


def test_a_resume_with_another_batch_size_and_workers_continues_to_the_uninterrupted_output(tiny_model, tmp_path):
    """Batch size and workers change how fast, not what: a crashed run resumed with others continues, and every
    row is the uninterrupted run's (to the bit on CPUs whose kernels round batches of 4 and 8 alike; within
    float32 rounding where they do not: assert_same_rows_across_batches)."""
    folder = noisy_photos(tmp_path / "images", 24)
    expected, out = tmp_path / "reference", tmp_path / "out"
    classify(folder, expected, tiny_model, shard_size=8, batch_size=8)
    shutil.copytree(expected, out)
    (out / "shards" / "00002.json").unlink()  # as if the run had crashed before committing its last shard
    (out / "predictions" / "part-00002.parquet").unlink()
    shutil.rmtree(out / "report")
    report = classify(folder, out, tiny_model, shard_size=8, batch_size=4, workers=1)
    assert report.ran_now == 8 and report.complete
    assert_same_rows_across_batches(read_rows(out), read_rows(expected))
    assert _summary(out) == _summary(expected)


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_output(reference, tiny_model, tmp_path):
    folder, expected = reference
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), *_cli(folder, out, tiny_model, "--shard-size", "3",
                                                          "--batch-size", "1")]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_same_output(out, expected)
    ranks = {json.loads(m.read_text())["rank"] for m in (out / "shards").glob("*.json")}
    assert ranks == {0, 1}


def test_slurm_variables_select_the_same_shards_as_torchrun():
    for world in (1, 2, 3, 8):
        for rank in range(world):
            torchrun = rank_from_env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % 4)})
            slurm = rank_from_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
                                   "SLURM_LOCALID": str(rank % 4)})
            assert torchrun == slurm == Rank(rank, world, rank % 4)
            assert [s for s in range(20) if slurm.owns(s)] == list(range(rank, 20, world))
    assert rank_from_env({}) == Rank(0, 1, None)


def test_slurm_tasks_run_one_after_another_complete_the_run(reference, tiny_model, tmp_path, monkeypatch):
    folder, expected = reference
    out = tmp_path / "out"
    for rank in (1, 0):  # in any order; the last one to finish writes the report
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_NTASKS", "2")
        report = classify(folder, out, tiny_model, shard_size=3, batch_size=1)
    assert report.complete
    _assert_same_output(out, expected)


class SourceThatFailsOn:
    """A job's source whose reads of the named files give bytes that are no image (a transient read error):
    every other attribute is the real source's."""

    def __init__(self, source, names: tuple[str, ...]):
        self.source, self.names = source, names

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int):
        record = self.source.read(index)
        if str(record.path).endswith(self.names):
            return dataclasses.replace(record, raw=b"\xff\xd8 transient read error")
        return record


def failing_reads_of(*names: str):
    """LocalParts whose job's source fails to read the named files."""
    from mv2batch.engines.local import LocalParts
    from mv2batch.runner.job import describe_job

    def describe(config):
        job = describe_job(config)
        return dataclasses.replace(job, source=SourceThatFailsOn(job.source, names))

    return LocalParts(describe=describe)


def test_retry_errors_reruns_only_failed_rows(reference, tiny_model, tmp_path):
    folder, expected = reference
    out = tmp_path / "out"
    first = classify(folder, out, tiny_model, shard_size=3, batch_size=1,
                     parts=failing_reads_of("img_004.jpg", "img_011.jpg"))
    assert first.n_errors == 2
    assert {row["id"] for row in read_rows(out) if row["status"] == "error"} == {"img_004.jpg", "img_011.jpg"}
    second = classify(folder, out, tiny_model, shard_size=3, batch_size=1, retry_errors=True)
    assert second.n_errors == 0 and second.ran_now == 2
    _assert_same_output(out, expected)


def disk_full_after(writes: int):
    """LocalParts whose part writer raises ENOSPC once `writes` batches of rows have been written."""
    from mv2batch.engines.local import LocalParts
    from mv2batch.out.writer import PartWriter

    calls = []

    class FillingDisk(PartWriter):
        def write(self, columns):
            calls.append(1)
            if len(calls) > writes:
                raise OSError(errno.ENOSPC, "No space left on device")
            super().write(columns)

    return LocalParts(part_writer=FillingDisk)


def test_full_disk_is_one_clear_error_and_a_rerun_continues(reference, tiny_model, tmp_path):
    folder, expected = reference
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full"):
        classify(folder, out, tiny_model, shard_size=3, batch_size=1, parts=disk_full_after(5))
    done = {int(m.stem) for m in (out / "shards").glob("*.json")}
    assert done and done < set(range(7)), "the shard in flight must not be marked done"
    assert not list((out / "predictions").glob("*.tmp*")), "no half-written part is left behind"
    classify(folder, out, tiny_model, shard_size=3, batch_size=1)
    _assert_same_output(out, expected)


def test_unwritable_output_is_one_clear_error(reference, tiny_model, tmp_path):
    folder, _ = reference
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError):
        classify(folder, blocker / "out", tiny_model)


def test_a_run_held_by_another_process_is_one_line_naming_it(reference, tiny_model, tmp_path):
    from mv2batch.out.rundir import OutLock

    folder, expected = reference
    held = OutLock(tmp_path / "out").acquire()  # as a run in another process holds it
    try:
        with pytest.raises(OutputError, match=rf"is being written by pid {os.getpid()} on host .* since ") as refused:
            classify(folder, tmp_path / "out", tiny_model, shard_size=3, batch_size=1)
        assert "wait for it, or pass another OUT" in str(refused.value) and "\n" not in str(refused.value)
    finally:
        held.release()
    assert not (tmp_path / "out" / "predictions").exists()  # the refused run wrote nothing
    classify(folder, tmp_path / "out", tiny_model, shard_size=3, batch_size=1)
    _assert_same_output(tmp_path / "out", expected)


def test_the_lock_of_a_dead_process_is_taken_over(reference, tiny_model, tmp_path):
    folder, expected = reference
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, sys.argv[1]);"
                           "from mv2batch.out.rundir import OutLock; OutLock(sys.argv[2]).acquire(); os._exit(9)",
                           str(Path(__file__).resolve().parents[2]), str(out)])
    assert dead.returncode == 9 and "pid" in (out / ".mv2batch.lock").read_text()
    classify(folder, out, tiny_model, shard_size=3, batch_size=1)
    _assert_same_output(out, expected)


@pytest.mark.slow
def test_two_processes_started_at_once_on_one_out_one_refused_the_other_complete(tiny_model, tmp_path):
    folder = noisy_photos(tmp_path / "images", 400, size=(64, 48))
    reference = tmp_path / "reference"
    classify(folder, reference, tiny_model, batch_size=1, speedups=False)
    command = [sys.executable, *_cli(folder, tmp_path / "out", tiny_model, "--batch-size", "1", "--no-speedups")]
    both = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in both)
    assert [code for code, _ in outcomes] == [0, OutputError.exit_code], outcomes
    lines = outcomes[1][1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mv2batch: error:") and "is being written by pid" in lines[0]
    _assert_same_output(tmp_path / "out", reference)


@pytest.mark.slow
def test_ray_engine_runs_shards_as_tasks_with_the_single_process_output(reference, tiny_model, local_ray,
                                                                        tmp_path):
    folder, expected = reference
    out = tmp_path / "out"
    updates = []
    report = classify_on_ray(folder, out, tiny_model, shard_size=3, batch_size=1, progress=updates.append)
    assert report.complete and report.ran_now == 20
    _assert_same_output(out, expected)
    # Progress once before any shard, then once per finished shard (6 of 3 images, 1 of 2).
    assert len(updates) == 1 + 7 and updates[0].done == 0 and {u.total for u in updates} == {20}
    assert sorted(u.done for u in updates) == [u.done for u in updates] and updates[-1].done == 20
    assert {b.done - a.done for a, b in zip(updates, updates[1:])} <= {2, 3}


def test_processes_writing_the_same_report_at_once_all_succeed(reference, tmp_path):
    # Ray tasks (or Slurm tasks) whose last shards end together each write report/ and, starting
    # together, run.json: with one shared temporary name one of them failed (seen in CI).
    out = shutil.copytree(reference[1], tmp_path / "out")
    report, rundir = load_report(out), RunDir(out)
    run_info = rundir.read_run()
    writers = 4
    start_together = Barrier(writers)

    def write_both_many_times(_: int) -> None:
        # The report's files a few times each (its page takes ~0.1 s), then run.json many times in a tight loop:
        # both races are then found every time (25 rounds of both found a shared name in run.json's 2 times in 3,
        # for 6x the time).
        start_together.wait()
        for _ in range(5):
            write_report(report, rundir)
        start_together.wait()
        for _ in range(50):
            rundir.write_run(run_info)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write_both_many_times, range(writers)))  # re-raises a writer's OutputError
    assert _summary(out) == _summary(reference[1]) and rundir.read_run() == run_info
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
