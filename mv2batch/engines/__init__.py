"""Engines: how a run's shards reach processes. local: this process (its rank from torchrun or Slurm); ray: each
shard a Ray task. An engine describes the job, places it (or has its tasks place it) and calls the runner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mv2batch.config import Engine, RunConfig

if TYPE_CHECKING:
    from mv2batch.report.tables import Report
    from mv2batch.runner.batch_loop import ProgressCallback


def run(config: RunConfig, progress: ProgressCallback | None = None) -> Report:
    """Run a job on the engine its configuration names and return its report."""
    if config.engine is Engine.ray:
        from mv2batch.engines.ray import run as run_on_ray

        return run_on_ray(config, progress)
    from mv2batch.engines.local import run as run_here

    return run_here(config, progress)
