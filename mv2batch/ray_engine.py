"""The Ray engine: the same shard work as Ray tasks (one GPU each where the cluster has GPUs), with Ray's retries."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .errors import ConfigError

TASK_RETRIES = 3  # Ray re-runs a shard whose worker died (node lost, OOM kill); a committed shard is never redone


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'mv2batch[ray]'") from None
    if not ray.is_initialized():
        # RAY_ADDRESS joins an existing cluster; without it Ray starts a local one.
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    return ray


def _run_shard(config: Any) -> int:
    from .runner import run

    return run(config).ran_now


def run_on_ray(config: Any, progress: Any = None) -> Any:
    """Prepare OUT here, run every pending shard as a Ray task, then build the report once."""
    from .report import load_report
    from .rundir import RunDir
    from .runner import run

    ray = _ray()
    local = dataclasses.replace(config, engine="local")
    run(dataclasses.replace(local, only_shards=()))  # validates, prepares OUT, plans; runs nothing
    rundir = RunDir(config.out)
    run_info = rundir.read_run()
    done = rundir.committed(run_info["fingerprint"])
    pending = [s for s in range(run_info["plan"]["n_shards"])
               if s not in done or (config.retry_errors and done[s]["errors"])]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_gpus=gpus, max_retries=TASK_RETRIES)(_run_shard)
    shard_config = dataclasses.replace(local, overwrite=False, resume=True)
    ran = ray.get([task.remote(dataclasses.replace(shard_config, only_shards=(s,))) for s in pending])
    report = load_report(config.out)
    report.ran_now = sum(ran)
    return report
