"""mv2batch: MobileViTV2 classification and segmentation over folders and datasets, streamed to Parquet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InputError, ModelError, Mv2batchError, OutputError

__version__ = "0.1.0"
__all__ = ["run", "RunConfig", "Report", "Mv2batchError", "ConfigError", "InputError", "ModelError", "OutputError"]

if TYPE_CHECKING:
    from .config import RunConfig
    from .report import Report


def run(config: "RunConfig", progress: Any = None) -> "Report":
    """Run a job described by a RunConfig and return its Report (heavy imports happen here, not at import)."""
    from .engines import run as run_on_engine

    return run_on_engine(config, progress)


def __getattr__(name: str) -> Any:
    if name == "RunConfig":
        from .config import RunConfig

        return RunConfig
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(name)
