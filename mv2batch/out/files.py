"""How OUT's files are written whole: on a file system by fsync + rename, on an object store by one PUT.

A reader (a resume, DuckDB, another rank) must never see half a file. A file system gives that with a
temporary name renamed into place; an object store has no rename, but an object appears whole or not at all
when its PUT (or its multipart upload) completes, so each file is written once under its final key.
`RunDir` holds one of these two and never asks which.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from mv2batch import storage
from mv2batch.errors import OutputError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

TEMP_SUFFIX = ".tmp"
# Where parts bound for an object store are made: `<pid>-<random>-<name>`, so that a killed run's leftovers
# are known by their dead pid and removed by the next run.
PART_TEMPS = Path(tempfile.gettempdir()) / "mv2batch-parts"


@contextmanager
def output_errors(what: str) -> Iterator[None]:
    """Turn a full disk or a permission problem into one clear OutputError."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {what}: free some space and re-run to continue") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(exc, PermissionError):
            detail = exc.strerror or storage.message(exc)
            if exc.errno != errno.EROFS and "denied" not in detail.lower():
                detail = f"access denied ({detail})"  # an object store's bare "Forbidden"
            raise OutputError(f"cannot write {what}: {detail}") from None
        raise OutputError(f"cannot write {what}: {storage.message(exc)}") from None


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


class LocalFiles:
    """OUT on a file system (local, or shared by every process of the run)."""

    on_object_store = False

    def exists(self, where: Path) -> bool:
        return where.exists()

    def is_dir(self, where: Path) -> bool:
        return where.is_dir()

    def names(self, folder: Path) -> list[str]:
        """The entries right under folder (none when it does not exist)."""
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def read_bytes(self, where: Path) -> bytes | None:
        """A file's content; None when it is not there."""
        try:
            return where.read_bytes()
        except FileNotFoundError:
            return None

    def read_many(self, folder: Path, names: list[str]) -> dict[str, bytes]:
        """The files of folder by name (those that could be read)."""
        found = {}
        for name in names:
            try:
                found[name] = (folder / name).read_bytes()
            except OSError:
                continue
        return found

    def write_whole(self, where: Path, data: bytes) -> None:
        where.parent.mkdir(parents=True, exist_ok=True)
        with replacing(where) as temp:
            temp.write_bytes(data)

    def make_folders(self, *folders: Path) -> None:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)

    def remove(self, where: Path) -> None:
        if where.is_dir():
            shutil.rmtree(where)
        elif where.exists():
            where.unlink()

    def local_temp(self, final: Path) -> Path:
        # A leading dot: pyarrow, DuckDB and Spark skip it when reading predictions/ as a dataset.
        return final.with_name(f".{final.name}{TEMP_SUFFIX}")

    def commit(self, temp: Path, final: Path) -> None:
        commit_file(temp, final)

    def open_read(self, where: Path) -> BinaryIO:
        return open(where, "rb")


class ObjectFiles:
    """OUT on an object store: each file written under its final key by one PUT (or a multipart upload
    completed at the end). Parts are made in a local temporary folder first: Parquet needs a seekable file."""

    on_object_store = True

    def __init__(self, options: dict | None = None):
        self.options = options

    def _fs(self, where: str) -> AbstractFileSystem:
        return storage.filesystem(where, self.options)

    def exists(self, where: str) -> bool:
        return storage.as_os_error(lambda: self._fs(where).exists(where))

    def is_dir(self, where: str) -> bool:
        return storage.as_os_error(lambda: self._fs(where).isdir(where))

    def names(self, folder: str) -> list[str]:
        fs = self._fs(folder)
        try:
            entries = storage.as_os_error(lambda: fs.ls(folder, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(storage.name_of(name) for name in entries if name.rstrip("/") != fs._strip_protocol(folder))

    def read_bytes(self, where: str) -> bytes | None:
        try:
            return storage.as_os_error(lambda: storage.retrying(lambda: self._fs(where).cat_file(where)))
        except storage.StoreReadError as exc:
            if self.exists(where):
                raise OSError(f"cannot read {where}: {exc}") from None
            return None

    def read_many(self, folder: str, names: list[str]) -> dict[str, bytes]:
        """The objects of a prefix by name, fetched concurrently (a resume of 1,000 shards reads 1,000 markers)."""
        if not names:
            return {}
        fs = self._fs(folder)
        fetched = storage.as_os_error(lambda: fs.cat([f"{folder}/{name}" for name in names], on_error="omit"))
        return {storage.name_of(key): data for key, data in fetched.items() if isinstance(data, bytes)}

    def write_whole(self, where: str, data: bytes) -> None:
        storage.as_os_error(lambda: self._fs(where).pipe_file(where, data))

    def make_folders(self, *folders: str) -> None:
        """Object stores have no folders: a key's prefix exists once an object is under it."""

    def remove(self, where: str) -> None:
        fs = self._fs(where)
        if storage.as_os_error(lambda: fs.exists(where)):
            storage.as_os_error(lambda: fs.rm(where, recursive=True))

    def local_temp(self, final: str) -> Path:
        PART_TEMPS.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=PART_TEMPS, prefix=f"{os.getpid()}-", suffix=f"-{storage.name_of(final)}")
        os.close(handle)
        return Path(name)

    def remove_leftovers(self) -> None:
        """Local parts a killed run (kill -9: no cleanup ran) was making for an object store."""
        for leftover in PART_TEMPS.glob("*-*") if PART_TEMPS.is_dir() else ():
            pid = leftover.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                leftover.unlink(missing_ok=True)

    def commit(self, temp: Path, final: str) -> None:
        try:
            storage.as_os_error(lambda: storage.upload(temp, final, self.options))
        finally:
            temp.unlink(missing_ok=True)

    def open_read(self, where: str) -> BinaryIO:  # fsspec's file
        return storage.as_os_error(lambda: self._fs(where).open(where, "rb"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def files_for(root: Path | str, options: dict | None = None) -> LocalFiles | ObjectFiles:
    """How files are written under root: a URL is an object store."""
    return ObjectFiles(options) if isinstance(root, str) else LocalFiles()
