"""The report: merge shard markers into OUT/report/summary.parquet (and per_class.parquet when labels are known)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mv2batch.tasks.task import Task

import pyarrow as pa
import pyarrow.parquet as pq

from mv2batch.inputs.eval_layouts import target_reader
from mv2batch.out.rundir import RunDir, open_run


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
    metrics: dict[str, Any] = field(default_factory=dict)  # the task's summary: JSON values
    per_class: list[dict] = field(default_factory=list)
    confusion: list[dict] = field(default_factory=list)  # segmentation eval: non-zero (gt, pred) cells
    shards_done: int = 0
    shards: list[int] = field(default_factory=list)  # the committed shards merged: the page reads their parts
    shards_total: int = 0
    ran_now: int = 0  # rows processed by this invocation
    elapsed_s: float = 0.0  # wall time of this invocation, start-up included

    def summary_row(self) -> dict[str, Any]:  # JSON values
        """The one row of summary.parquet."""
        return {"task": self.task, "dataset": self.dataset, "model": self.model, "n_images": self.n_images,
                "n_errors": self.n_errors, "images_per_s": self.images_per_s, **self.metrics}


def build_report(rundir: RunDir, run_info: dict, markers: dict[int, dict], task: Task) -> Report:
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
        per_class=per_class, shards_done=len(markers), shards=sorted(markers), shards_total=n_shards or 0,
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

    from mv2batch.report.page import ROW_COLUMNS, build_page

    try:
        run_info = rundir.read_run()
        rows = []
        for shard in report.shards:  # the shards the report merged: no second listing of the markers
            part = rundir.read_part(shard, ROW_COLUMNS[report.task]).to_pylist()
            rows += [{**row, "_shard": shard, "_row": position} for position, row in enumerate(part)]

        @functools.lru_cache(maxsize=2)  # gallery rows come shard by shard often enough; a part is not small
        def masks_of(shard: int) -> pa.ChunkedArray:
            return rundir.read_part(shard, ["mask_png"]).column("mask_png")

        def read_mask(row: dict) -> bytes:
            return masks_of(row["_shard"])[row["_row"]].as_py()

        page = build_page(report, run_info, rows, functools.partial(_read_photo, options=rundir.options),
                          read_mask, target_reader(run_info, rundir.options), _duplicates(rundir))
        rundir.write_report_file("index.html", page.encode("utf-8"))
    except Exception as exc:  # noqa: BLE001  (see the docstring)
        logging.getLogger("mv2batch").warning(f"the HTML report was not written: {type(exc).__name__}: {exc}")


def _duplicates(rundir: RunDir) -> dict | None:
    """OUT/report/duplicates.parquet's rows and what dedup read (shards, threshold), where dedup wrote one."""
    import json

    from mv2batch.storage import join

    where = join(rundir.report, "duplicates.parquet")
    if not rundir.files.exists(where):
        return None
    with rundir.files.open_read(where) as handle:
        table = pq.read_table(handle)
    metadata = {key.decode(): json.loads(value) for key, value in (table.schema.metadata or {}).items()
                if key.startswith(b"mv2batch.")}
    return {"rows": table.to_pylist(), "shards": metadata.get("mv2batch.shards"),
            "threshold": metadata.get("mv2batch.threshold")}


def refresh_html(rundir: RunDir, run_info: dict) -> None:
    """index.html built again from the committed shards (after dedup wrote its groups beside it); as in
    write_html, a page that cannot be built is a warning."""
    import logging

    try:
        report = report_of_committed(rundir, run_info)
    except Exception as exc:  # noqa: BLE001  (see write_html)
        logging.getLogger("mv2batch").warning(f"the HTML report was not written: {type(exc).__name__}: {exc}")
        return
    write_html(report, rundir)


# A thumbnail read again from an image URL: a short deadline and cap, so that a slow or huge answer costs the page
# a caption, never an endless or memory-filling `mv2batch report`.
THUMBNAIL_URL_LIMITS = {"timeout_s": 5.0, "max_bytes": 32_000_000}


def _read_photo(path: str, options: dict | None) -> bytes:
    """One attempt: a thumbnail is not worth the retries' waits."""
    from mv2batch import storage
    from mv2batch.inputs.urls import UrlLimits, fetch, is_http

    if is_http(path):
        return fetch(path, UrlLimits(**THUMBNAIL_URL_LIMITS))
    where = storage.location(path)
    if isinstance(where, Path):
        return where.read_bytes()
    return storage.filesystem(where, options).cat_file(where)


def report_of_committed(rundir: RunDir, run_info: dict) -> Report:
    """The report of a run's committed shards, from their markers and the task named in run.json."""
    from mv2batch.tasks.task import TASKS

    markers = rundir.committed(run_info["fingerprint"])
    return build_report(rundir, run_info, markers, TASKS[run_info["task"]](run_info["model"]["labels"]))


def load_report(out: Path | str, storage_options: dict | None = None) -> Report:
    """Rebuild the report of a run from its markers, and rewrite OUT/report/ when every shard is done."""
    rundir, run_info = open_run(out, storage_options, needs=("model", "input"))
    report = report_of_committed(rundir, run_info)
    if report.complete:
        write_report(report, rundir)
    return report
