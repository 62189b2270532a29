"""Describing a job: its source, model, task, preprocessing, plan and run.json; and opening OUT for it.

Nothing here loads weights or touches a device (placement does): the Ray driver describes a job and opens
OUT without either, and every mistake found here costs the user no model load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from mv2batch.inputs.sources import Source
    from mv2batch.tasks.task import Task

from mv2batch.config import RunConfig
from mv2batch.errors import ConfigError, OutputError
from mv2batch.inputs import openers
from mv2batch.loading.preprocess import Preprocessing
from mv2batch.model import checkpoints
from mv2batch.out.rundir import RunDir
from mv2batch.runner import runinfo
from mv2batch.runner.shard_plan import Group, Rank, ShardPlan


@dataclass(frozen=True)
class Job:
    """A described job: what every process of a run agrees on before any of them places a model."""

    config: RunConfig
    source: Source
    model_name: str
    resolved: checkpoints.ResolvedModel
    model_config: dict
    labels: list[str]
    task: Task
    preprocessing: Preprocessing
    dtype: torch.dtype
    run_info: dict  # run.json's content

    @property
    def fingerprint(self) -> str:
        return self.run_info["fingerprint"]

    @property
    def shard_size(self) -> int:
        return self.run_info["plan"]["shard_size"]

    def plan(self) -> ShardPlan:
        """The shard plan of an indexed source (a stream's is known only once read)."""
        return ShardPlan(self.run_info["plan"]["n_items"], self.shard_size)


def describe_job(config: RunConfig) -> Job:
    """Open the source, resolve the model, read its config and processor, build the task and run.json."""
    from mv2batch.model.device import dtype_of
    from mv2batch.tasks.task import make_task

    name = config.task.value
    source = openers.open_source(config)  # a wrong input path is the cheapest mistake to report, so first
    model_name = config.model or checkpoints.DEFAULT_MODELS[name]
    resolved = checkpoints.resolve_model(model_name, config.revision)
    model_config = checkpoints.read_config(resolved.folder)
    checkpoints.check_head(model_config, name, model_name)
    labels = checkpoints.label_names(model_config)
    openers.check_classes(config, labels, model_name)
    task = make_task(config, labels, model_config)
    protocol = config.preprocess.value if config.preprocess else task.default_protocol
    preprocessing = task.preprocessing(protocol, lambda: checkpoints.load_processor(resolved.folder, model_name),
                                       model_name)
    dtype = dtype_of(config.dtype.value)
    run_info = runinfo.describe_run(config, source, resolved, preprocessing, dtype, labels)
    return Job(config, source, model_name, resolved, model_config, labels, task, preprocessing, dtype, run_info)


def owner(rank: Rank, only: tuple[int, ...] | None = None) -> Callable[[int], bool]:
    """This process's shards: by rank, narrowed to the ones an engine task was given."""
    return lambda shard: rank.owns(shard) and (only is None or shard in only)


def open_out(job: Job, rank: Rank, group: Group, batch_size: int | None = None,
             owns: Callable[[int], bool] | None = None) -> RunDir:
    """The first process creates (or wipes) OUT and writes run.json; the others join once it has, where a
    barrier allows. batch_size: the one chosen, for run.json's options (a resume may change it)."""
    config = job.config
    if rank.world_size > 1 and config.overwrite and not group.active:
        raise ConfigError("--overwrite needs one process (or torchrun) to clear OUT before the others start: "
                          "clear OUT first, then launch the processes without --overwrite")
    run_info = job.run_info
    if batch_size is not None:
        run_info = {**run_info, "options": {**run_info["options"], "batch_size": batch_size}}
    rundir, owns = RunDir(config.out, config.storage_options), owns or owner(rank)
    if rank.is_first:
        rundir.prepare(run_info, config.overwrite, config.resume, owns)
    group.barrier()
    if not rank.is_first:
        if rundir.files.on_object_store and not group.active:
            wait_for_run(rundir, rank.rank)
        rundir.prepare(run_info, False, config.resume, owns)
    return rundir


RUN_WAIT_S = 600


def wait_for_run(rundir: RunDir, rank: int, limit_s: float = RUN_WAIT_S, poll_s: float = 1.0) -> None:
    """Ranks without a barrier (Slurm tasks) on an object store: the first rank writes run.json, the others
    wait for it rather than write the same key (a file system's renames make that harmless, PUTs do not say
    which one won)."""
    import time

    deadline = time.monotonic() + limit_s
    while rundir.read_run() is None:
        if time.monotonic() > deadline:
            raise OutputError(f"rank {rank} waited {limit_s:.0f} s for rank 0 to create {rundir.root}/run.json: "
                              "is rank 0 running?")
        time.sleep(poll_s)
