"""The output directory: run.json and its fingerprint, shard markers, parts, the same-run check, the lock.

OUT is a folder on a file system or a prefix on an object store; `out_files` writes each file whole on
either, and RunDir never asks which.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from mv2batch import storage
from mv2batch.errors import OutputError
from mv2batch.out.files import TEMP_SUFFIX, files_for, output_errors

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["OWNED", "LOCK_NAME", "RunDir", "OutLock", "fingerprint_of", "open_run", "output_errors", "part_name",
           "run_problem"]

OWNED = ("run.json", "predictions", "shards", "report", "masks", "overlays")
LOCK_NAME = ".mv2batch.lock"


def fingerprint_of(fields: dict[str, Any]) -> str:  # JSON values
    """A stable hash of the fields that change a run's outputs."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _json_bytes(data: Any) -> bytes:  # a JSON value
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def part_name(shard: int) -> str:
    """The file name of a shard's Parquet part."""
    return f"part-{shard:05d}.parquet"


class RunDir:
    """Paths and state of one OUT directory (a folder, or a prefix on an object store)."""

    def __init__(self, root: Path | str, options: dict | None = None):
        self.root = storage.location(root)
        self.options = options  # the store's, for what is read beside OUT (the report's photos)
        self.files = files_for(self.root, options)
        self.run_json = storage.join(self.root, "run.json")
        self.predictions = storage.join(self.root, "predictions")
        self.shards = storage.join(self.root, "shards")
        self.report = storage.join(self.root, "report")

    def part_path(self, shard: int) -> Path | str:
        return storage.join(self.predictions, part_name(shard))

    def marker_path(self, shard: int) -> Path | str:
        return storage.join(self.shards, f"{shard:05d}.json")

    def part_temp(self, shard: int) -> Path:
        """A local file to write a part in before it is committed."""
        return self.files.local_temp(self.part_path(shard))

    def commit_part(self, shard: int, temp: Path) -> None:
        """The finished part under its final name: renamed into place, or uploaded whole."""
        self.files.commit(temp, self.part_path(shard))

    def read_part(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """A committed part as a table; columns: only those of them it has (an older run's part may lack one),
        so that a page or an export never reads the masks or vectors it does not show."""
        import pyarrow.parquet as pq

        with self.files.open_read(self.part_path(shard)) as handle:
            if columns is None:
                return pq.read_table(handle)
            present = set(pq.read_schema(handle).names)
            handle.seek(0)
            return pq.read_table(handle, columns=[name for name in columns if name in present])

    def write_json(self, where: Path | str, data: Any) -> None:  # data: a JSON value
        """A JSON file written whole (a reader never sees half of it)."""
        with output_errors(str(where)):
            self.files.write_whole(where, _json_bytes(data))

    def write_run(self, run_info: dict) -> None:
        self.write_json(self.run_json, run_info)

    def write_marker(self, shard: int, marker: dict) -> None:
        self.write_json(self.marker_path(shard), marker)

    def write_report_file(self, name: str, data: bytes) -> None:
        with output_errors(str(self.report)):
            self.files.write_whole(storage.join(self.report, name), data)

    def exists(self) -> bool:
        with output_errors(str(self.root)):
            return self.files.is_dir(self.root)

    def read_run(self) -> dict | None:
        try:
            data = self.files.read_bytes(self.run_json)
        except OSError:
            data = b""
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise OutputError(f"{self.run_json} is unreadable: remove it or use --overwrite") from None

    def prepare(self, run_info: dict, overwrite: bool, resume: bool,
                owns: Callable[[int], bool] = lambda s: True) -> None:
        """Start a new run, or continue the same one; refuse another run's directory unless overwriting.

        `owns` tells which shards this process runs: only their leftovers are removed, since another
        process of the same run may be writing its own at this moment.
        """
        with output_errors(str(self.root)):
            if self.files.exists(self.root) and not self.files.is_dir(self.root):
                raise OutputError(f"output path exists and is not a directory: {self.root}")
            if overwrite:
                self._wipe()
        existing = self.read_run()
        if existing is None:
            if resume:
                raise OutputError(f"nothing to resume: {self.root} holds no mv2batch run")
            self._refuse_foreign_content()
        else:
            self._check_same_run(existing, run_info)
        with output_errors(str(self.root)):
            self.files.make_folders(self.predictions, self.shards)
        self.remove_temporaries(owns)
        if existing is None:
            self.write_run(run_info)

    def _refuse_foreign_content(self) -> None:
        # Our own folders without run.json: another process of this run is creating it right now.
        with output_errors(str(self.root)):
            names = self.files.names(self.root)
        if any(name not in (*OWNED, LOCK_NAME) and not _is_run_json_temporary(name) for name in names):
            raise OutputError(
                f"{self.root} is not empty and holds no mv2batch run: choose a new or empty directory"
            )

    def _check_same_run(self, existing: dict, run_info: dict) -> None:
        if existing.get("fingerprint") == run_info["fingerprint"]:
            return
        before, now = existing.get("fingerprint_fields", {}), run_info["fingerprint_fields"]
        differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        detail = "; ".join(f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}" for k in differing)
        raise OutputError(
            f"{self.root} holds a different run ({detail or 'unknown fields'}): "
            "use another output directory, or --overwrite to replace it"
        )

    def _wipe(self) -> None:
        with output_errors(str(self.root)):
            for name in OWNED:
                self.files.remove(storage.join(self.root, name))

    def remove_temporaries(self, owns: Callable[[int], bool] = lambda s: True) -> None:
        """Delete parts a crashed run left half-written on a file system; their shards have no marker and run
        again. (On an object store nothing is half-written: a part without a marker is written over.)"""
        if self.files.on_object_store:
            self.files.remove_leftovers()
            return
        for temp in Path(self.predictions).glob(f".part-*{TEMP_SUFFIX}"):
            number = temp.name.removeprefix(".part-").split(".")[0]
            if not number.isdigit() or owns(int(number)):
                temp.unlink(missing_ok=True)

    def committed(self, fingerprint: str) -> dict[int, dict]:
        """Markers of this run whose part file is in place, by shard number."""
        with output_errors(str(self.root)):
            parts = set(self.files.names(self.predictions))
            markers = [name for name in self.files.names(self.shards) if name.endswith(".json")]
            contents = self.files.read_many(self.shards, markers)
        done = {}
        for name in markers:
            try:
                data = json.loads(contents.get(name) or b"")
            except ValueError:
                continue
            shard = data.get("shard")
            if data.get("fingerprint") == fingerprint and isinstance(shard, int) and part_name(shard) in parts:
                done[shard] = data
        return done


def _is_run_json_temporary(name: str) -> bool:
    return name.startswith(".run.json.") and name.endswith(TEMP_SUFFIX)


def _short(value: Any) -> str:  # a JSON value
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


class OutLock:
    """OUT held by one run at a time: processes that are not ranks of one run (two shells, two cron jobs) would
    otherwise write the same parts. flock, so that the kernel releases it when its process dies, even by
    kill -9: a dead holder's lock is taken over by the next run. Ranks of one run do not take it (torchrun,
    Slurm); under Ray the driver holds it for its tasks. The file is removed on release, while still held."""

    def __init__(self, root: Path | str):
        where = storage.location(root)
        # An object store has no flock (nor any lock its clients all honour): there, OUT is not locked.
        self.path = where / LOCK_NAME if isinstance(where, Path) else None
        self.handle: TextIO | None = None

    def acquire(self) -> "OutLock":
        """Take the lock, or raise OutputError naming the process that holds it."""
        if self.path is None:
            return self
        if self.path.parent.exists() and not self.path.parent.is_dir():
            return self  # not a directory: RunDir.prepare says so
        with output_errors(str(self.path.parent)):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while self.handle is None:
                self.handle = self._try_lock()
        self._write_holder()
        return self

    def _try_lock(self) -> TextIO | None:
        """The open, locked file; None where it was removed by its last holder between our open and lock."""
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputError(f"{self.path.parent} is being written by {holder}: wait for it, or pass another "
                              "OUT") from None
        if not self.path.exists() or not os.path.samestat(os.fstat(handle.fileno()), self.path.stat()):
            handle.close()
            return None
        return handle

    def _write_holder(self) -> None:
        import socket
        import time

        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n")
        self.handle.flush()

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()  # closing the file releases the flock
            self.handle = None


def open_run(out: Path | str, storage_options: dict | None = None,
             needs: tuple[str, ...] = ()) -> tuple[RunDir, dict]:
    """An existing OUT and its run.json, checked: the one reader of a run for the commands that read one (report,
    export, dedup, filter). Each problem is one line: no OUT, no run.json, a store that refuses the read or cannot
    be reached (said as a read, not a write), a run.json of another version or of a task this one does not run.
    needs: what the reader takes beyond the task, fingerprint and plan ("model": its id and labels, "input": its
    description), checked too.
    """
    rundir = RunDir(out, storage_options)
    with storage.start_up_errors("OUT", str(rundir.root), OutputError):
        present = rundir.files.is_dir(rundir.root)
        data = rundir.files.read_bytes(rundir.run_json) if present else None
    if not present:
        raise OutputError(f"no such output directory: {out}")
    if data is None:
        raise OutputError(f"{out} holds no mv2batch run (no run.json)")
    try:
        run_info = json.loads(data)
    except ValueError as exc:
        raise OutputError(f"{rundir.run_json} is not JSON ({exc}): not a run this mv2batch can read") from None
    problem = run_problem(run_info, needs)
    if problem is not None:
        raise OutputError(f"{rundir.run_json} is not a run this mv2batch version reads: {problem} (written by "
                          "another version? run it again into a new OUT, or with --overwrite)")
    return rundir, run_info


# What every reader of a run takes from run.json, by key: the type of its value; and what some readers take.
RUN_FIELDS = {"task": str, "fingerprint": str, "plan": dict}
NEEDED_FIELDS = {"model": ("id", "labels"), "input": ("description",)}


def run_problem(run_info: object, needs: tuple[str, ...] = ()) -> str | None:
    """What makes a run.json unreadable to this version (None: nothing): a missing or mistyped field, a task this
    version does not run, or a part a reader needs (see open_run) missing."""
    from mv2batch.config import Task

    if not isinstance(run_info, dict):
        return f"it holds a {type(run_info).__name__}, not an object"
    for key, kind in RUN_FIELDS.items():
        if not isinstance(run_info.get(key), kind):
            return f"no {key!r}" if key not in run_info else f"{key!r} is not a {kind.__name__}"
    if run_info["task"] not in {task.value for task in Task}:
        return f"its task is {run_info['task']!r}, which this version does not run"
    n_shards = run_info["plan"].get("n_shards")
    if "n_shards" not in run_info["plan"] or not (n_shards is None or isinstance(n_shards, int)):
        return "the shard plan has no shard count"
    for part in needs:
        found = run_info.get(part)
        missing = [key for key in NEEDED_FIELDS[part] if not isinstance(found, dict) or key not in found]
        if missing:
            return f"no {part} {', '.join(missing)}"
    return None
