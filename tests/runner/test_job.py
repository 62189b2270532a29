"""Describing a job loads no weights and touches no device; placing it does both; the fingerprint's fields are
the RunConfig fields declared as changing outputs."""

from __future__ import annotations

import shutil
from dataclasses import fields, replace

import pytest
from conftest import real_photos, run_config

from mv2batch.config import RunConfig, output_fields
from mv2batch.errors import ConfigError, ModelError
from mv2batch.runner.job import describe_job
from mv2batch.runner.placement import place


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, photo in enumerate(real_photos(3)):
        photo.save(folder / f"{i}.jpg")
    return folder


def test_describing_needs_neither_the_weights_nor_the_device(tmp_path, folder, tiny_model):
    broken = shutil.copytree(tiny_model, tmp_path / "broken-weights")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    config = run_config(folder, tmp_path / "out", broken, device="cuda:7")  # no machine here has 8 GPUs
    job = describe_job(config)
    assert job.plan().n_items == 3 and len(job.labels) == 10 and job.fingerprint
    assert not (tmp_path / "out").exists()  # describing writes nothing either
    with pytest.raises(ConfigError, match="cuda:7"):
        place(job)
    with pytest.raises(ModelError, match="cannot load"):
        place(replace(job, config=replace(config, device="cpu")))


def test_the_fingerprint_holds_exactly_the_declared_fields(tmp_path, folder, tiny_model):
    declared = set(output_fields())
    assert {"max_pixels", "masks_dir", "overlays_dir", "dtype", "speedups", "input", "model"} <= declared
    assert not declared & {"out", "batch_size", "workers", "device", "engine", "resume", "overwrite"}
    assert declared < {f.name for f in fields(RunConfig)}
    job = describe_job(run_config(folder, tmp_path / "out", tiny_model))
    assert set(job.run_info["fingerprint_fields"]) == declared - {"max_image_bytes"}  # added later: at its default


def test_a_field_added_later_leaves_the_fingerprint_of_a_default_run_as_it_was(tmp_path, folder, tiny_model):
    """--max-image-bytes came after runs were made: at its default a run's fingerprint is the one an older
    version gave (its run.json lacks the field), so that run resumes; another value makes another run."""
    config = run_config(folder, tmp_path / "out", tiny_model)
    default = describe_job(config).run_info
    assert "max_image_bytes" not in default["fingerprint_fields"]
    other = describe_job(replace(config, max_image_bytes=1_000_000)).run_info
    assert other["fingerprint_fields"]["max_image_bytes"] == 1_000_000
    assert other["fingerprint"] != default["fingerprint"]


@pytest.mark.parametrize("change, differs", [
    ({"max_pixels": 10_000}, True), ({"top_k": 3}, True), ({"batch_size": 7}, False), ({"workers": 2}, False),
    ({"device": "auto"}, False), ({"preprocess": "hf"}, False),  # hf is the classify default: the same run
])
def test_a_field_changes_the_fingerprint_when_it_is_declared(tmp_path, folder, tiny_model, change, differs):
    config = run_config(folder, tmp_path / "out", tiny_model)
    before = describe_job(config).fingerprint
    assert (describe_job(replace(config, **change)).fingerprint != before) is differs
