"""Folder inputs (and the eval layouts, folders too): each kept file at DEST/<id>, its relative path.

Copied byte for byte (a local file streamed, an object read whole: photos are small), or with `--link hard` /
`--link symlink` a link made under a temporary name and renamed into place, where input and DEST are local.
A source that cannot be read now (deleted since the run) is left out and counted, never a failed filter.
"""

from __future__ import annotations

import io
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mv2batch import storage
from mv2batch.errors import ConfigError
from mv2batch.filter.destination import Destination, FileWriter
from mv2batch.filter.work import Outcome, ShardWork
from mv2batch.out.files import TEMP_SUFFIX, output_errors

FILES_PER_TASK = 32  # a thread's share at a time: few futures, and progress that still moves
COPY_BUFFER = 1 << 20
LINKS = ("copy", "hard", "symlink")


class Unreadable(Exception):
    """The source of a kept item cannot be read (its message says why)."""


class FolderLayout:
    """Kept files of a folder input placed at DEST/<id>."""

    name = "folder"
    parallel = True

    def __init__(self, root: Path | str, destination: Destination, write_file: FileWriter, link: str = "copy",
                 options: dict | None = None):
        self.root, self.destination, self.write_file = root, destination, write_file
        self.link, self.options = link, options

    def locations(self) -> list[tuple[str, Path | str]]:
        return [("the input folder", self.root)]

    def check_link(self) -> None:
        """--link hard / symlink: both sides local (hard: one file system); else one line."""
        if self.link == "copy":
            return
        if not isinstance(self.root, Path) or not isinstance(self.destination.root, Path):
            raise ConfigError(f"--link {self.link} needs a local input and a local DEST: use --link copy")
        if self.link == "hard" and _device(self.root) != _device(self.destination.root):
            raise ConfigError(f"--link hard needs DEST on the input's file system ({self.root}): use --link symlink "
                              "or --link copy")

    def tasks(self, work: ShardWork) -> list[Callable[[], Outcome]]:
        ids = work.kept.column("id").to_pylist()
        paths = work.kept.column("path").to_pylist()
        return [partial(self.place_all, ids[start:start + FILES_PER_TASK], paths[start:start + FILES_PER_TASK])
                for start in range(0, len(ids), FILES_PER_TASK)]

    def place_all(self, ids: list[str], paths: list[str]) -> Outcome:
        outcome = Outcome()
        for item, source in zip(ids, paths):
            if source and not storage.is_url(source) and not os.path.lexists(source):
                item, source = real_name(item), real_name(source)  # a name that is not UTF-8, as the run wrote it
            final = self.destination.item(item)
            if self.destination.resuming and self.destination.exists(final):
                outcome.present += 1
                continue
            try:
                self.place(source, final)
            except Unreadable as exc:
                outcome.unavailable[item] = str(exc)
                continue
            outcome.items += 1
            outcome.files += 1
        return outcome

    def place(self, source: str | None, final: Path | str) -> None:
        if self.link != "copy":
            _link(source, final, self.link)
            return
        reader = _open_source(source, self.options)
        with reader, self.write_file(self.destination, final) as handle:
            _copy(reader, handle, source)


def real_name(text: str) -> str:
    """A name as ids and paths hold it (bytes that are not UTF-8 written as `\\xHH`: inputs.listing.printable) back
    to the name the file system gave, for reading the file and naming its copy."""
    if "\\x" not in text:
        return text
    escaped = text.encode("utf-8", "surrogatepass")
    return os.fsdecode(re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), escaped))


def _open_source(source: str | None, options: dict | None) -> BinaryIO:
    """The item's bytes to read: a local file, or an object read whole (retried as the run's reads are)."""
    if not source:
        raise Unreadable("the run names no file for it")
    try:
        if storage.is_url(source):
            return io.BytesIO(storage.read_bytes(source, options))
        return open(source, "rb")
    except (OSError, storage.StoreReadError) as exc:
        raise Unreadable(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None


def _copy(reader: BinaryIO, handle: BinaryIO, source: str) -> None:
    """reader into handle; a read failing part-way (a disk error under the input) is the source's fault."""
    while True:
        try:
            block = reader.read(COPY_BUFFER)
        except OSError as exc:
            raise Unreadable(f"cannot read {source}: {exc.strerror or exc}") from None
        if not block:
            return
        handle.write(block)


def _link(source: str | None, final: Path | str, how: str) -> None:
    """A hard or symbolic link to source at final, made under a temporary name and renamed into place."""
    if not source or not os.path.exists(source):
        raise Unreadable(f"cannot read {source}: no such file")
    assert isinstance(final, Path)
    with output_errors(str(final)):
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.with_name(f".{final.name}{TEMP_SUFFIX}")
        temp.unlink(missing_ok=True)  # an earlier attempt's, killed between making it and renaming it
        if how == "hard":
            os.link(source, temp)
        else:
            os.symlink(os.path.abspath(source), temp)
        os.replace(temp, final)


def _device(where: Path) -> int:
    """The file system of where, or of its nearest existing folder (DEST may not exist yet)."""
    for candidate in (where, *where.parents):
        if candidate.exists():
            return candidate.stat().st_dev
    return -1


def folder_root(first_row: dict[str, Any]) -> Path | str:
    """The input folder, from a row: its path less its id (the relative path)."""
    path, item = str(first_row["path"]), str(first_row["id"])
    root = path[: -len(item)].rstrip("/") if path.endswith(item) else str(storage.parent_of(storage.location(path)))
    return storage.location(root or "/")
