"""Object storage: s3://, gs://, az://, hf:// and any fsspec URL beside local paths, for inputs and outputs.

A location is a `Path` (local; `file://` URLs become one) or a URL string. Each process opens its own
filesystem instance (fsspec's instances hold an event loop and connections that do not survive a fork): the
loader's workers, torchrun's ranks and Ray's tasks each make theirs on first use. Reads are retried on
transient failures (throttling, 5xx, a reset connection) beyond the store's own retries; what still fails is
one image's error, with the store's message. A missing object, a denied one or a missing bucket is not
retried: it will not get better.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, TypeVar

from mv2batch.errors import ConfigError, InputError, Mv2batchError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
# The extra that installs each protocol's fsspec package (`pip install 'mv2batch[s3]'`).
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
          "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
          "adl": ("adlfs", "azure")}
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
READ_ATTEMPTS = 4
BACKOFF_S = 0.25

Location = Path | str
Options = dict[str, Any]  # fsspec's keyword arguments: JSON values
T = TypeVar("T")


def protocol_of(value: object) -> str | None:
    """The URL scheme of value (`s3`, `gs`, ...), or None for a plain path."""
    match = URL.match(value) if isinstance(value, str) else None
    return match.group(1).lower() if match else None


def is_url(value: object) -> bool:
    """Whether value names an object store (or any fsspec filesystem) rather than a local path."""
    return protocol_of(value) not in (None, "file")


def location(value: object) -> Location | None:
    """A local Path (`~` expanded, `file://` stripped) or a URL without its trailing slash; None stays None."""
    if value is None or isinstance(value, Path):
        return value.expanduser() if isinstance(value, Path) else None
    text = str(value)
    if protocol_of(text) == "file":
        return Path(text[len("file://"):]).expanduser()
    if is_url(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return Path(text).expanduser()


def join(base: Location, *parts: str) -> Location:
    """base / parts, for a path or a URL."""
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent_of(where: Location) -> Location:
    if isinstance(where, Path):
        return where.parent
    return where.rsplit("/", 1)[0] if where.count("/") > 2 else where


def name_of(where: Location) -> str:
    return where.name if isinstance(where, Path) else where.rstrip("/").rsplit("/", 1)[-1]


_FILESYSTEMS: dict[tuple[int, str | None, str], AbstractFileSystem] = {}


def filesystem(url: str, options: Options | None = None) -> AbstractFileSystem:
    """This process's fsspec filesystem for url's protocol and the options (`--storage-options`)."""
    protocol = protocol_of(url)
    key = (os.getpid(), protocol, json.dumps(options or {}, sort_keys=True, default=str))
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = _open_filesystem(protocol, dict(options or {}))
    return _FILESYSTEMS[key]


def _open_filesystem(protocol: str | None, options: Options) -> AbstractFileSystem:
    import fsspec

    try:
        kind = fsspec.get_filesystem_class(protocol)
    except ImportError:
        package, extra = EXTRAS.get(protocol or "", (f"fsspec's {protocol} package", protocol))
        raise ConfigError(f"{protocol}:// URLs need {package}: pip install 'mv2batch[{extra}]'") from None
    except ValueError:
        raise ConfigError(f"unknown storage protocol {protocol}:// (fsspec has no filesystem of that name)") from None
    try:
        return kind(skip_instance_cache=True, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--storage-options do not suit {protocol}://: {exc}") from None


def parse_options(text: str | None) -> Options | None:
    """--storage-options: a JSON object handed to fsspec (endpoint, credentials, anonymous access...)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def message(exc: BaseException) -> str:
    """The store's own message, on one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


def permanent_reason(exc: BaseException) -> str:
    """Why a read will not get better, in words: s3fs's FileNotFoundError and PermissionError carry only the
    key (no strerror), which alone would make an error row that names the object and no reason."""
    text = message(exc)
    if getattr(exc, "strerror", None) is None and isinstance(exc, FileNotFoundError):
        return f"no such object (deleted or moved since it was listed?): {text}"
    if getattr(exc, "strerror", None) is None and isinstance(exc, PermissionError):
        return f"access denied: {text}"
    return text


def human_bytes(count: int) -> str:
    """A size as a message says it: 1.5 GB, 256.0 MB, 12 bytes."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class StoreReadError(Exception):
    """An object that could not be read (missing, denied, or still failing after retries)."""


def retrying(call: Callable[[], T], attempts: int = READ_ATTEMPTS, backoff_s: float = BACKOFF_S,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """call(), again after 0.25, 0.5, 1 s on a transient failure; StoreReadError with the store's message."""
    for attempt in range(attempts):
        try:
            return call()
        except Mv2batchError:
            raise
        except PERMANENT as exc:
            raise StoreReadError(permanent_reason(exc)) from None
        except Exception as exc:  # throttling, 5xx, a reset connection, a timeout: worth another try
            if attempt == attempts - 1:
                raise StoreReadError(f"{message(exc)} (failed {attempts} times)") from None
            sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def read_bytes(where: Location, options: Options | None = None) -> bytes:
    """A whole file or object; StoreReadError when it cannot be had."""
    if isinstance(where, Path):
        try:
            return where.read_bytes()
        except OSError as exc:
            raise StoreReadError(exc.strerror or str(exc)) from None
    return retrying(lambda: filesystem(where, options).cat_file(where))


@dataclass(frozen=True, eq=False)
class RemoteFile:
    """An object to read in a loader worker, with the options of the filesystem it lives on."""

    url: str
    options: Options | None = None

    def read(self) -> bytes:
        return read_bytes(self.url, self.options)

    def open(self) -> BinaryIO:  # fsspec's buffered file
        """A seekable file on the object that fetches ranges as read (for a header)."""
        return retrying(lambda: filesystem(self.url, self.options).open(self.url, "rb", block_size=1 << 16))

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, eq=False)
class FetchedFile(RemoteFile):
    """A RemoteFile whose bytes have come already (or whose read failed, after its retries): read() gives
    them, or raises that failure, as RemoteFile.read would have."""

    data: bytes | None = None
    failure: StoreReadError | None = None

    def read(self) -> bytes:
        if self.failure is not None:
            raise self.failure
        return self.data


def fetched_ahead(files: list[RemoteFile], at_once: int) -> Iterator[RemoteFile]:
    """The files in order, each one's bytes fetched while those before it are used, up to at_once GETs in
    flight: a worker that read one object at a time would wait a GET's round trip (tens of ms on a real bucket)
    per photo, and a GPU takes thousands of photos a second. At most at_once + 1 objects' bytes are held (a
    batch of 256 camera photos is not). Gives FetchedFiles; at_once <= 1 or a single file: the files as they
    are, read when decoded."""
    if at_once <= 1 or len(files) < 2:
        yield from files
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def fetch(file: RemoteFile) -> FetchedFile:
        try:
            return FetchedFile(file.url, file.options, data=file.read())
        except StoreReadError as exc:
            return FetchedFile(file.url, file.options, failure=exc)

    with ThreadPoolExecutor(max_workers=min(at_once, len(files)), thread_name_prefix="mv2batch-fetch") as pool:
        pending = deque(pool.submit(fetch, file) for file in files[:at_once])
        following = iter(files[at_once:])
        while pending:
            fetched = pending.popleft().result()
            after = next(following, None)
            if after is not None:
                pending.append(pool.submit(fetch, after))
            yield fetched


def write_bytes(where: Location, data: bytes, options: Options | None = None) -> None:
    """A whole file (local) or object (one PUT: it appears whole or not at all)."""
    if isinstance(where, Path):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(data)
    else:
        as_os_error(lambda: filesystem(where, options).pipe_file(where, data))


def upload(local: Path, url: str, options: Options | None = None) -> None:
    """A finished local file to its final key: one PUT, or a multipart upload completed at the end."""
    as_os_error(lambda: filesystem(url, options).put_file(str(local), url))


def as_os_error(call: Callable[[], T]) -> T:
    """A store call whose failures are all OSErrors (botocore's connection errors are not), so that the writers'
    error handling (out_files.output_errors) says each in one line."""
    try:
        return call()
    except (OSError, StoreReadError, Mv2batchError):
        raise
    except Exception as exc:
        raise OSError(message(exc)) from None


def exists(where: Location, options: Options | None = None) -> bool:
    return where.exists() if isinstance(where, Path) else filesystem(where, options).exists(where)


def is_dir(where: Location, options: Options | None = None) -> bool:
    return where.is_dir() if isinstance(where, Path) else filesystem(where, options).isdir(where)


def is_file(where: Location, options: Options | None = None) -> bool:
    return where.is_file() if isinstance(where, Path) else filesystem(where, options).isfile(where)


def children(where: Location, options: Options | None = None) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry right under where, sorted by name."""
    if isinstance(where, Path):
        return sorted((child.name, child.is_dir()) for child in where.iterdir())
    entries = filesystem(where, options).ls(where, detail=True)
    return sorted((name_of(entry["name"]), entry["type"] == "directory") for entry in entries)


@contextmanager
def start_up_errors(what: str, url: str, error: type[Mv2batchError] = InputError) -> Iterator[None]:
    """At the start of a run, a store that refuses, lacks the bucket or cannot be reached: one line."""
    try:
        yield
    except Mv2batchError:
        raise
    except PermissionError as exc:
        raise error(f"access denied to {what} {url}: {message(exc)}") from None
    except FileNotFoundError as exc:
        raise error(f"{what} not found: {url} ({message(exc)})") from None
    except Exception as exc:  # no route, refused connection, bad endpoint, bad credentials
        raise error(f"cannot reach {what} {url}: {message(exc)}") from None
