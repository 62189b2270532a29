"""The device side chosen for a GPU, checked without one: IEEE float32 math for fp32, loader workers per process."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from conftest import classify, placed_with, read_rows, real_photos

from mv2batch.engines.local import LocalParts
from mv2batch.errors import Mv2batchError
from mv2batch.loading.resources import MAX_GPU_WORKERS, default_batch_size, default_workers
from mv2batch.model import device as device_module
from mv2batch.model.device import float32_math
from mv2batch.runner.job import describe_job

CUDA = torch.device("cuda")


def _precision() -> list:
    return [getattr(owner, name) for owner, name, _ in device_module._fp32_precision_settings()]


def test_fp32_on_cuda_is_ieee_while_running_and_the_settings_come_back():
    before = _precision()
    exact = [value for _, _, value in device_module._fp32_precision_settings()]
    assert before != exact  # PyTorch's default lets cuDNN use TF32: otherwise this test would prove nothing
    with float32_math(CUDA, torch.float32):
        assert _precision() == exact
    assert _precision() == before


@pytest.mark.parametrize("where, dtype", [(CUDA, torch.bfloat16), (CUDA, torch.float16),
                                          (torch.device("cpu"), torch.float32)])
def test_other_dtypes_and_devices_keep_the_settings(where, dtype):
    before = _precision()
    with float32_math(where, dtype):
        assert _precision() == before


def test_settings_come_back_after_an_error():
    before = _precision()
    with pytest.raises(RuntimeError):
        with float32_math(CUDA, torch.float32):
            raise RuntimeError("boom")
    assert _precision() == before


class StartSpy:
    """The job's task with on_start() called before each batch's start; everything else is the task's own."""

    def __init__(self, task, on_start):
        self.real, self.on_start = task, on_start

    def __getattr__(self, name):
        return getattr(self.real, name)

    def start(self, *args):
        self.on_start()
        return self.real.start(*args)


def test_the_runner_infers_inside_float32_math(tmp_path, tiny_model):
    """Every batch runs inside the block, given the run's device and dtype."""
    entered, inside_calls = [], []

    @contextmanager
    def spy(where, dtype):
        entered.append((where.type, dtype))
        entered.append("open")
        yield
        entered.append("closed")

    def spied_job(config):
        job = describe_job(config)
        return replace(job, task=StartSpy(job.task, lambda: inside_calls.append(entered[-1])))

    folder = tmp_path / "in"
    folder.mkdir()
    for i, photo in enumerate(real_photos(5)):
        photo.save(folder / f"{i}.png")
    classify(folder, tmp_path / "out", tiny_model, batch_size=2,
             parts=LocalParts(describe=spied_job, float32_math=spy))
    assert entered == [("cpu", torch.float32), "open", "closed"]
    assert inside_calls == ["open"] * 3


@pytest.mark.parametrize("cores, visible, environ, expected", [
    (16, 16, {}, 15),                                    # one process on a 16-core GPU machine
    (128, 128, {}, MAX_GPU_WORKERS),                     # more workers only cost memory
    (64, 64, {"LOCAL_WORLD_SIZE": "8"}, 7),              # torchrun, 8 GPUs: each process its eighth
    (64, 64, {"SLURM_NTASKS_PER_NODE": "4(x2)"}, 15),    # Slurm's form for 4 tasks on each of 2 nodes
    (64, 8, {"LOCAL_WORLD_SIZE": "8"}, 7),               # already bound to its 8 cores: not divided again
    (2, 2, {}, 1),
])
def test_gpu_workers_take_this_processs_share_of_the_cores(monkeypatch, cores, visible, environ, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(visible)))
    assert default_workers("cuda", environ) == expected


def test_cpu_workers_leave_the_cores_to_the_model(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers("cpu", {}) == 4


GIB = 2**30


@pytest.mark.parametrize("task, where, dtype, width, free_gib, expected", [
    ("classify", "cuda", torch.float32, 1.0, 70, 256),    # an H100 / H200: 256 fills it (measured +20-28 %)
    ("classify", "cuda", torch.float32, 2.0, 8, 64),      # 46 MiB per image: 128 would take 5.8 of 8 GiB
    ("classify", "cuda", torch.bfloat16, 2.0, 8, 128),    # half the bytes per image
    ("classify", "cuda", torch.float32, 2.0, 1, 32),      # nothing larger fits: the usual 32
    ("segment", "cuda", torch.float32, 1.0, 70, 32),      # whole photos, grouped by shape
    ("classify", "cpu", torch.float32, 1.0, 70, 32),      # micro-batches whatever the batch
])
def test_default_batch_size_fills_a_gpu_within_half_its_free_memory(monkeypatch, task, where, dtype, width,
                                                                    free_gib, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * GIB, 80 * GIB))
    assert default_batch_size(task, torch.device(where), dtype, width, 256 * 256) == expected


def test_run_json_records_the_batch_size_chosen(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    real_photos(1)[0].save(folder / "0.png")
    classify(folder, tmp_path / "out", tiny_model)  # no batch size given
    assert json.loads((tmp_path / "out" / "run.json").read_text())["options"]["batch_size"] == 32


def test_a_device_out_of_memory_ends_the_run_with_one_line_and_keeps_finished_shards(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, photo in enumerate(real_photos(6)):
        photo.save(folder / f"{i}.png")
    classify(folder, tmp_path / "clean", tiny_model, batch_size=2, shard_size=2)

    def full_on_the_third_batch(placement):
        calls = []

        def model(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return placement.model(*args, **kwargs)

        return replace(placement, model=model)

    with pytest.raises(Mv2batchError, match="ran out of memory at --batch-size 2: lower --batch-size") as raised:
        classify(folder, tmp_path / "out", tiny_model, batch_size=2, shard_size=2,
                 parts=placed_with(full_on_the_third_batch))
    assert "\n" not in str(raised.value)
    report = classify(folder, tmp_path / "out", tiny_model, batch_size=2, shard_size=2, resume=True)
    assert report.ran_now == 2  # the two shards finished before the failure were kept
    assert read_rows(tmp_path / "out") == read_rows(tmp_path / "clean")
