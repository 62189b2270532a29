"""The output directory: run.json and its fingerprint, shard markers, temporary parts, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError

OWNED = ("run.json", "predictions", "shards", "report", "masks", "overlays")
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".mv2batch.lock"


def fingerprint_of(fields: dict[str, Any]) -> str:
    """A stable hash of the fields that change a run's outputs."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextmanager
def output_errors(what: str) -> Iterator[None]:
    """Turn a full disk or a permission problem into one clear OutputError."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {what}: free some space and re-run to continue") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write {what}: {exc.strerror}") from None
        raise OutputError(f"cannot write {what}: {exc}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(temp: Path, final: Path) -> None:
    """fsync a finished temporary file, rename it into place, fsync the folder."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)
    _fsync_dir(final.parent)


def temporary_name(path: Path) -> Path:
    """A hidden temporary name of this writer's own next to `path`.

    Processes of one run may write the same file at the same moment (run.json when they start together,
    the report when their last shards end together): with a shared temporary name, one renames the
    other's half-written file into place or finds its own gone. Each writes whole and renames; all
    write the same content, so whichever rename lands last is right.
    """
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary name to write `path` whole under; commit it when the block ends, or remove it."""
    temp = temporary_name(path)
    try:
        yield temp
        commit_file(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # only there when writing or committing failed


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON under a temporary name and rename it, so a reader never sees half a file."""
    with output_errors(str(path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as temp:
            temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def part_name(shard: int) -> str:
    """The file name of a shard's Parquet part."""
    return f"part-{shard:05d}.parquet"


class RunDir:
    """Paths and state of one OUT directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.predictions = self.root / "predictions"
        self.shards = self.root / "shards"
        self.report = self.root / "report"

    def part_path(self, shard: int) -> Path:
        return self.predictions / part_name(shard)

    def part_temp(self, shard: int) -> Path:
        # A leading dot: pyarrow, DuckDB and Spark skip it when reading predictions/ as a dataset.
        return self.predictions / f".part-{shard:05d}.parquet{TEMP_SUFFIX}"

    def marker_path(self, shard: int) -> Path:
        return self.shards / f"{shard:05d}.json"

    def read_run(self) -> dict | None:
        if not self.run_json.is_file():
            return None
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, ValueError):
            raise OutputError(f"{self.run_json} is unreadable: remove it or use --overwrite") from None

    def prepare(self, run_info: dict, overwrite: bool, resume: bool, owns: Callable[[int], bool] = lambda s: True) -> None:
        """Start a new run, or continue the same one; refuse another run's directory unless overwriting.

        `owns` tells which shards this process runs: only their leftovers are removed, since another
        process of the same run may be writing its own at this moment.
        """
        if self.root.exists() and not self.root.is_dir():
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
            for folder in (self.predictions, self.shards):
                folder.mkdir(parents=True, exist_ok=True)
        self.remove_temporaries(owns)
        if existing is None:
            write_json_atomic(self.run_json, run_info)

    def _refuse_foreign_content(self) -> None:
        # Our own folders without run.json: another process of this run is creating it right now.
        if self.root.is_dir() and any(p.name not in (*OWNED, LOCK_NAME) and not _is_run_json_temporary(p.name)
                                      for p in self.root.iterdir()):
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
                target = self.root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()

    def remove_temporaries(self, owns: Callable[[int], bool] = lambda s: True) -> None:
        """Delete parts a crashed run left half-written; their shards have no marker and run again."""
        for temp in self.predictions.glob(f".part-*{TEMP_SUFFIX}"):
            number = temp.name.removeprefix(".part-").split(".")[0]
            if not number.isdigit() or owns(int(number)):
                temp.unlink(missing_ok=True)

    def committed(self, fingerprint: str) -> dict[int, dict]:
        """Markers of this run whose part file is in place, by shard number."""
        done = {}
        for marker in sorted(self.shards.glob("*.json")):
            try:
                data = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            shard = data.get("shard")
            if data.get("fingerprint") == fingerprint and isinstance(shard, int) and self.part_path(shard).is_file():
                done[shard] = data
        return done


def _is_run_json_temporary(name: str) -> bool:
    return name.startswith(".run.json.") and name.endswith(TEMP_SUFFIX)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


class OutLock:
    """OUT held by one run at a time: processes that are not ranks of one run (two shells, two cron jobs) would
    otherwise write the same parts. flock, so that the kernel releases it when its process dies, even by
    kill -9: a dead holder's lock is taken over by the next run. Ranks of one run do not take it (torchrun,
    Slurm); under Ray the driver holds it for its tasks. The file is removed on release, while still held."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.handle: Any = None

    def acquire(self) -> "OutLock":
        """Take the lock, or raise OutputError naming the process that holds it."""
        if self.path.parent.exists() and not self.path.parent.is_dir():
            return self  # not a directory: RunDir.prepare says so
        with output_errors(str(self.path.parent)):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while self.handle is None:
                self.handle = self._try_lock()
        self._write_holder()
        return self

    def _try_lock(self) -> Any:
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
