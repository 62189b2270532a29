"""The Ray engine: the driver describes the job and opens OUT (no weights, no device); each pending shard is a
Ray task (one GPU each where the cluster has GPUs) that places the model and runs it, with Ray's retries."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mv2batch.config import RunConfig
from mv2batch.errors import ConfigError
from mv2batch.inputs.sources import is_sharded
from mv2batch.out.rundir import OutLock
from mv2batch.report.tables import Report
from mv2batch.runner.batch_loop import ProgressCallback, ProgressUpdate
from mv2batch.runner.job import Job, describe_job, open_out, owner
from mv2batch.runner.shard_plan import Group, Rank

if TYPE_CHECKING:
    from types import ModuleType

    from mv2batch.out.rundir import RunDir

TASK_RETRIES = 3  # Ray re-runs a shard whose worker died (node lost, OOM kill); a committed shard is never redone


def _ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'mv2batch[ray]'") from None
    if not ray.is_initialized():
        # RAY_ADDRESS joins an existing cluster; without it Ray starts a local one.
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    return ray


def run_shard(job: Job, shard: int) -> tuple[int, int]:
    """A Ray task: place the model on this node and run one shard; (rows, error rows) it ran."""
    from mv2batch.runner import shards
    from mv2batch.runner.placement import place

    job = _with_model_here(job)
    placed = place(job)
    rank, owns = Rank(), owner(Rank(), (shard,))
    joining = dataclasses.replace(job.config, resume=True, overwrite=False)  # the driver prepared OUT
    rundir = open_out(dataclasses.replace(job, config=joining), rank, Group(rank), owns=owns)
    counters = shards.run_shards(job, placed, rundir, owns)
    return counters.done, counters.errors


def _with_model_here(job: Job) -> Job:
    """The job with its checkpoint resolved on this node, at the revision the driver resolved, where the driver's
    folder is not visible here (another machine's hub cache)."""
    from mv2batch.model import checkpoints

    if Path(job.resolved.folder).is_dir():
        return job
    return dataclasses.replace(job, resolved=checkpoints.resolve_model(job.model_name, job.resolved.revision))


def run(config: RunConfig, progress: ProgressCallback | None = None) -> Report:
    """Describe the job and open OUT here, run every pending shard as a Ray task, then write the report once."""
    started = time.perf_counter()
    ray = _ray()
    job = describe_job(dataclasses.replace(config, engine="local"))
    rank = Rank()
    lock = OutLock(config.out).acquire()  # held by the driver for all its tasks
    try:
        return _run_tasks(ray, job, open_out(job, rank, Group(rank)), progress, started)
    finally:
        lock.release()


def _run_tasks(ray: ModuleType, job: Job, rundir: RunDir, progress: ProgressCallback | None, started: float
               ) -> Report:
    """Every pending shard as a Ray task; progress per finished shard; the report once, at the end."""
    from mv2batch.runner import shards

    config = job.config
    done = rundir.committed(job.fingerprint)
    pending = [s for s in range(job.run_info["plan"]["n_shards"])
               if s not in done or (config.retry_errors and done[s]["errors"])]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_gpus=gpus, max_retries=TASK_RETRIES)(run_shard)
    job_ref = ray.put(job)
    waiting = [task.remote(job_ref, shard) for shard in pending]
    ran = errors = 0
    total = None if is_sharded(job.source) else sum(len(job.plan().shard(s)) for s in pending)
    if progress:
        progress(ProgressUpdate(0, total, 0))
    while waiting:  # progress per finished shard, in the order they finish
        finished, waiting = ray.wait(waiting, num_returns=1)
        rows, failed = ray.get(finished[0])
        ran, errors = ran + rows, errors + failed
        if progress:
            progress(ProgressUpdate(ran, total, errors))
    return shards.finish(job, rundir, ran, time.perf_counter() - started, write=True)
