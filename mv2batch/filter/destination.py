"""DEST: refused when it holds anything else (unless --overwrite), continued when it holds this same filter's
unfinished output; each file written whole (a temporary name renamed into place, or one PUT); a marker per shard
once every file of it is in place; `_mv2batch/filter.json`.

A file appears under its final name only complete, so a crash leaves at most hidden temporaries (`.<name>.tmp`,
written over by the next attempt at that file) and the next run skips what is there. The shard markers spare a
rerun from asking after each file of the shards that were finished.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterator

from mv2batch import storage
from mv2batch.errors import OutputError
from mv2batch.out.files import files_for, output_errors
from mv2batch.out.rundir import LOCK_NAME, OutLock

META = "_mv2batch"  # beside the kept items; a leading underscore: pyarrow and Spark do not read it as data
STATE = "filter.json"
PREDICTIONS = "predictions.parquet"
DONE = "done"  # one marker per shard whose kept items are all in place


class Destination:
    """DEST: a folder or an object-store prefix, written the way OUT is (out.files)."""

    def __init__(self, root: Path | str, options: dict | None = None):
        self.root = storage.location(root)
        self.options = options
        self.files = files_for(self.root, options)
        self.meta = storage.join(self.root, META)
        self.state = storage.join(self.meta, STATE)
        self.done = storage.join(self.meta, DONE)
        self.resuming = False
        self.lock = OutLock(self.root)  # a local DEST only: two filters into one folder would write the same files

    def prepare(self, identity: dict, overwrite: bool, protected: list[tuple[str, Path | str]]) -> None:
        """Start a new output, or continue this same filter's; refuse DEST when it overlaps the run or its input,
        or holds anything else (unless overwrite: then what it holds is removed)."""
        for what, where in protected:
            if overlapping(self.root, where):
                raise OutputError(f"DEST {self.root} overlaps {what} {where}: choose a DEST outside both")
        with output_errors(str(self.root)):
            if self.files.exists(self.root) and not self.files.is_dir(self.root):
                raise OutputError(f"DEST exists and is not a directory: {self.root}")
        self.lock.acquire()
        with output_errors(str(self.root)):
            state = self._read_state()
            if overwrite:
                for name in self._contents():
                    self.files.remove(storage.join(self.root, name))
            elif state is not None and _same(state.get("identity"), identity):
                self.resuming = True
            elif self._contents():
                raise OutputError(_refusal(self.root, state, identity))
            self.files.make_folders(self.root, self.meta, self.done)
            self.write_json(self.state, {"identity": identity, "complete": False})

    def _contents(self) -> list[str]:
        return [name for name in self.files.names(self.root) if name != LOCK_NAME]

    def _read_state(self) -> dict | None:
        data = self.files.read_bytes(self.state)
        try:
            return json.loads(data) if data else None
        except ValueError:
            return None

    def release(self) -> None:
        self.lock.release()

    def write_json(self, where: Path | str, data: Any) -> None:  # data: a JSON value
        with output_errors(str(where)):
            self.files.write_whole(where, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def finished_shards(self) -> dict[int, dict]:
        """The markers of shards done by an earlier attempt of this filter, by shard."""
        if not self.resuming:
            return {}
        with output_errors(str(self.done)):
            names = [name for name in self.files.names(self.done) if name.endswith(".json")]
            contents = self.files.read_many(self.done, names)
        found = {}
        for name, data in contents.items():
            try:
                found[int(name.removesuffix(".json"))] = json.loads(data)
            except ValueError:
                continue  # not ours, or unreadable: that shard is done again
        return found

    def mark(self, shard: int, marker: dict) -> None:
        self.write_json(storage.join(self.done, f"{shard:05d}.json"), marker)

    def exists(self, where: Path | str) -> bool:
        with output_errors(str(where)):
            return os.path.lexists(where) if isinstance(where, Path) else self.files.exists(where)

    def item(self, relative: str) -> Path | str:
        """Where an item of a relative path (an id) goes; one that would leave DEST is refused."""
        parts = relative.split("/")
        if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise OutputError(f"the item {relative!r} has no relative path inside DEST")
        return storage.join(self.root, *parts)


# How a file is written under DEST: a context manager giving a handle to fill, committed when it closes. A test
# passes its own (one that fails part-way, as a full disk or a killed process would).
FileWriter = Callable[[Destination, storage.Location], ContextManager[BinaryIO]]  # (DEST, the file's final location)


@contextmanager
def written_whole(destination: Destination, final: Path | str) -> Iterator[BinaryIO]:
    """A handle on a temporary file; renamed into place (fsync'd) or uploaded in one PUT once filled."""
    files = destination.files
    with output_errors(str(final)):
        if isinstance(final, Path):
            final.parent.mkdir(parents=True, exist_ok=True)
        temp = files.local_temp(final)
        try:
            with open(temp, "wb") as handle:
                yield handle
            files.commit(temp, final)
        finally:
            temp.unlink(missing_ok=True)  # only there when filling or committing failed


def overlapping(first: Path | str, second: Path | str) -> bool:
    """Whether one location is the other or lies inside it."""
    if isinstance(first, Path) and isinstance(second, Path):
        a, b = first.expanduser().resolve(), second.expanduser().resolve()
        return a == b or a in b.parents or b in a.parents
    if isinstance(first, str) and isinstance(second, str):
        a, b = first.rstrip("/"), second.rstrip("/")
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")
    return False


def _same(before: Any, now: Any) -> bool:  # JSON values
    return json.dumps(before, sort_keys=True, default=str) == json.dumps(now, sort_keys=True, default=str)


def _refusal(root: Path | str, state: dict | None, identity: dict) -> str:
    if state is None:
        return (f"{root} is not empty and holds no filter output: choose a new or empty DEST, or --overwrite to "
                "replace what it holds")
    before = state.get("identity") or {}
    differing = [key for key in sorted(set(before) | set(identity)) if not _same(before.get(key), identity.get(key))]
    detail = "; ".join(f"{key}: {before.get(key)!r} -> {identity.get(key)!r}" for key in differing)
    return f"{root} holds another filter's output ({detail}): use another DEST, or --overwrite to replace it"
