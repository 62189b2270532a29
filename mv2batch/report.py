"""The report: merge shard markers into OUT/report/summary.parquet (and per_class.parquet when labels are known)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .rundir import RunDir


@dataclass
class Report:
    """What a run produced: counts, metrics and where the output is."""

    task: str
    out: Path
    dataset: str
    model: str
    n_images: int
    n_errors: int
    images_per_s: float | None
    complete: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    per_class: list[dict] = field(default_factory=list)
    confusion: list[dict] = field(default_factory=list)  # segmentation eval: non-zero (gt, pred) cells
    shards_done: int = 0
    shards_total: int = 0
    ran_now: int = 0  # rows processed by this invocation
    elapsed_s: float = 0.0  # wall time of this invocation, start-up included

    def summary_row(self) -> dict[str, Any]:
        """The one row of summary.parquet."""
        return {"task": self.task, "dataset": self.dataset, "model": self.model, "n_images": self.n_images,
                "n_errors": self.n_errors, "images_per_s": self.images_per_s, **self.metrics}


def build_report(rundir: RunDir, run_info: dict, markers: dict[int, dict], task: Any) -> Report:
    """Merge every marker; the report is complete when every planned shard has one."""
    counts = task.new_counts()
    rows = errors = 0
    seconds = 0.0
    for marker in markers.values():
        rows += marker["rows"]
        errors += marker["errors"]
        seconds += marker.get("timings", {}).get("seconds", 0.0)
        counts = counts.merge(task.counts_from_json(marker.get("metrics", {})))
    n_shards = run_info["plan"].get("n_shards")
    metrics, per_class = task.summarize(counts)
    confusion = getattr(counts, "confusion", {})
    classes = max(1, len(task.labels))
    return Report(
        task=run_info["task"], out=rundir.root, dataset=run_info["input"]["description"],
        model=run_info["model"]["id"], n_images=rows, n_errors=errors,
        images_per_s=(rows - errors) / seconds if seconds > 0 else None,
        complete=n_shards is not None and len(markers) == n_shards, metrics=metrics,
        per_class=per_class, shards_done=len(markers), shards_total=n_shards or 0,
        confusion=[{"gt_class": cell // classes, "pred_class": cell % classes, "pixels": pixels}
                   for cell, pixels in sorted(confusion.items())],
    )


def _table_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def write_report(report: Report, rundir: RunDir) -> None:
    """summary.parquet (and per_class.parquet, confusion.parquet), each written whole (renamed, or one PUT)."""
    rundir.write_report_file("summary.parquet", _table_bytes([report.summary_row()]))
    if report.per_class:
        rundir.write_report_file("per_class.parquet", _table_bytes(report.per_class))
    if report.confusion:
        rundir.write_report_file("confusion.parquet", _table_bytes(report.confusion))
    write_html(report, rundir)


def write_html(report: Report, rundir: RunDir) -> None:
    """OUT/report/index.html (html_report). A page that fails to build is a warning, never a failed run: the
    predictions and the tables above are what the run is for."""
    import functools
    import logging

    from . import storage
    from .html_report import ROW_COLUMNS, build_page

    try:
        run_info = rundir.read_run()
        rows = []
        for shard in sorted(rundir.committed(run_info["fingerprint"])):
            part = rundir.read_part(shard).select(ROW_COLUMNS[report.task]).to_pylist()
            rows += [{**row, "_shard": shard, "_row": position} for position, row in enumerate(part)]

        @functools.lru_cache(maxsize=2)  # gallery rows come shard by shard often enough; a part is not small
        def masks_of(shard: int) -> Any:
            return rundir.read_part(shard).column("mask_png")

        def read_mask(row: dict) -> bytes:
            return masks_of(row["_shard"])[row["_row"]].as_py()

        def read_photo(path: str) -> bytes:  # one attempt: a thumbnail is not worth the retries' waits
            where = storage.location(path)
            if isinstance(where, Path):
                return where.read_bytes()
            return storage.filesystem(where, rundir.options).cat_file(where)

        page = build_page(report, run_info, rows, read_photo, read_mask)
        rundir.write_report_file("index.html", page.encode("utf-8"))
    except Exception as exc:  # noqa: BLE001  (see the docstring)
        logging.getLogger("mv2batch").warning(f"the HTML report was not written: {type(exc).__name__}: {exc}")


def open_run(out: Path | str, storage_options: dict | None = None) -> tuple[RunDir, dict]:
    """An existing OUT and its run.json, for commands that read a run (report, export); else one line."""
    rundir = RunDir(out, storage_options)
    if not rundir.exists():
        raise OutputError(f"no such output directory: {out}")
    run_info = rundir.read_run()
    if run_info is None:
        raise OutputError(f"{out} holds no mv2batch run (no run.json)")
    return rundir, run_info


def load_report(out: Path | str, storage_options: dict | None = None) -> Report:
    """Rebuild the report of a run from its markers, and rewrite OUT/report/ when every shard is done."""
    rundir, run_info = open_run(out, storage_options)
    from .tasks import TASKS

    markers = rundir.committed(run_info["fingerprint"])
    report = build_report(rundir, run_info, markers, TASKS[run_info["task"]](run_info["model"]["labels"]))
    if report.complete:
        write_report(report, rundir)
    return report
