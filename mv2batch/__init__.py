"""mv2batch: MobileViTV2 classification and segmentation over folders and datasets, streamed to Parquet."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mv2batch.errors import ConfigError, InputError, ModelError, Mv2batchError, OutputError

__version__ = "0.1.0"
__all__ = ["run", "RunConfig", "Report", "Mv2batchError", "ConfigError", "InputError", "ModelError", "OutputError"]

if TYPE_CHECKING:
    from mv2batch.config import RunConfig
    from mv2batch.report.tables import Report
    from mv2batch.runner.batch_loop import ProgressCallback


def run(config: RunConfig, progress: ProgressCallback | None = None) -> Report:
    """Run a job described by a RunConfig and return its Report (heavy imports happen here, not at import)."""
    from mv2batch.engines import run as run_on_engine

    return run_on_engine(config, progress)


def __getattr__(name: str) -> type[RunConfig] | type[Report]:
    if name == "RunConfig":
        from mv2batch.config import RunConfig

        return RunConfig
    if name == "Report":
        from mv2batch.report.tables import Report

        return Report
    raise AttributeError(name)
