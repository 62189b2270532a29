"""WebDataset tar shards as a source: one mv2batch shard per tar, each streamed in order by one loader worker.

Samples are grouped as WebDataset groups them: consecutive members with the same key (the member path up to
the first dot of its file name); the image is the member with a chosen image extension, `cls` / `label` the
gold class id. Nothing is extracted or copied, and no sample is dropped: a sample without an image, a
truncated tar or a file that is not a tar each become an error row naming what was wrong.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Sequence

from mv2batch import storage
from mv2batch.config import DEFAULT_MAX_IMAGE_BYTES
from mv2batch.errors import InputError
from mv2batch.inputs.listing import printable
from mv2batch.inputs.sources import Record
from mv2batch.inputs.tar_reader import TarReader, open_tar_file, split_key

__all__ = ["TarShards", "expand_braces", "looks_like_shards", "resolve_shards", "shard_name", "split_key"]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".list", ".shards")
# The image extensions looked for when --image-ext is not given, in order of preference.
DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif", "avif", "heic", "heif")
BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero-padded as written); `{x,y}` lists too."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _is_tar(path: Path | str) -> bool:
    return storage.name_of(path).lower().endswith(TAR_SUFFIXES)


def _listed(path: Path | str, options: dict | None = None) -> list[str]:
    """A shard list: one path per line (relative to the list's folder), blank lines and # comments skipped."""
    try:
        text = storage.read_bytes(path, options).decode("utf-8", "replace")
    except storage.StoreReadError as exc:
        raise InputError(f"cannot read the shard list {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line if Path(line).is_absolute() or storage.is_url(line) else str(storage.join(
        storage.parent_of(path), line)) for line in lines if line and not line.startswith("#")]


def looks_like_shards(name: str, options: dict | None = None) -> bool:
    """Whether an input names tar shards: a tar, a brace pattern of them, a shard list, or a folder (prefix) of
    tars holding no save_to_disk dataset."""
    path = storage.location(name)
    if _is_tar(path) or ("{" in name and ".tar" in name) or storage.name_of(path).lower().endswith(LIST_SUFFIXES):
        return True
    if isinstance(path, str):
        with storage.start_up_errors("input", path):
            return storage.is_dir(path, options) and any(_is_tar(n) for n, _ in storage.children(path, options))
    return path.is_dir() and any(_is_tar(child) for child in path.iterdir())


def resolve_shards(inputs: Sequence[str], options: dict | None = None) -> list[Path | str]:
    """Every tar the inputs name, in the order given (folders: their tars, sorted); a missing one: InputError."""
    shards: list[Path | str] = []
    for given in inputs:
        for name in expand_braces(str(given)):
            path = storage.location(name)
            if isinstance(path, str):
                shards += _remote_shards(path, options)
            elif path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and _is_tar(p))
                if not found:
                    raise InputError(f"no .tar files under {path}")
                shards += found
            elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
                shards += resolve_shards(_listed(path), options)
            else:
                shards.append(path)
    missing = [p for p in shards if isinstance(p, Path) and not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]}")
    if not shards:
        raise InputError("no shards given")
    return [p.resolve() if isinstance(p, Path) else p for p in shards]


def _remote_shards(url: str, options: dict | None) -> list[str]:
    """A tar's URL as given; a shard list's entries; the tars under a prefix, sorted by key."""
    if url.lower().endswith(LIST_SUFFIXES):
        return resolve_shards(_listed(url, options), options)  # type: ignore[return-value]
    if _is_tar(url):
        return [url]
    fs = storage.filesystem(url, options)
    with storage.start_up_errors("input", url):
        found = sorted(fs.unstrip_protocol(key) for key in fs.find(url) if _is_tar(key))
    if not found:
        raise InputError(f"no .tar files under {url}")
    return found


def remote_signatures(urls: list[str], options: dict | None) -> dict[str, str]:
    """Size and ETag of each tar on an object store, one listing per prefix (not a request per tar)."""
    by_prefix: dict[str, dict[str, str]] = {}
    signatures = {}
    for url in urls:
        prefix = str(storage.parent_of(url))
        if prefix not in by_prefix:
            fs = storage.filesystem(url, options)
            with storage.start_up_errors("input", prefix):
                entries = fs.ls(prefix, detail=True, refresh=True)
            by_prefix[prefix] = {storage.name_of(e["name"]): f"{e.get('size')}:{e.get('ETag', '')}" for e in entries
                                 if e.get("type") == "file"}
        found = by_prefix[prefix].get(storage.name_of(url))
        if found is None:
            missing = [u for u in urls if storage.name_of(u) not in by_prefix.get(str(storage.parent_of(u)), {})]
            raise InputError(f"{len(missing) or 1} of {len(urls)} shard(s) not found, e.g. {url}")
        signatures[url] = found
    return signatures


def shard_name(path: Path | str) -> str:
    """A tar's name without its suffix: the first part of its rows' ids."""
    name = storage.name_of(path)
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class TarShards:
    """Tar shards read as WebDataset samples; id = `<tar name>/<key>`, path = `<tar path>#<member>`."""

    streamed: ClassVar[bool] = False
    sharded: ClassVar[bool] = True
    shards: list[str]
    image_exts: tuple[str, ...] = DEFAULT_IMAGE_EXTS
    require_label: bool = False  # evaluation: a sample without a class id is an error row
    label_names: list[str] | None = None
    description: str = ""
    names: list[str] = field(default_factory=list)
    options: dict | None = None  # the object store's --storage-options, for tars named by URL
    signatures: dict[str, str] = field(default_factory=dict)  # size and ETag of each tar on an object store
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # an image member larger than this is an error row, not read
    _open_tar: tuple | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:  # an open tar stays in the process that opened it
        return {**self.__dict__, "_open_tar": None}

    @classmethod
    def open(cls, inputs: Sequence[str], image_exts: Iterable[str] | None = None,
             require_label: bool = False, options: dict | None = None,
             max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> "TarShards":
        paths = resolve_shards(inputs, options)
        signatures = remote_signatures([p for p in paths if isinstance(p, str)], options)
        names = [printable(shard_name(p)) for p in paths]  # the first part of ids: text, whatever the bytes
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise InputError(f"two shards are named {twice!r}: ids (<tar name>/<key>) would collide")
        exts = tuple(e.lower().lstrip(".") for e in image_exts) if image_exts else DEFAULT_IMAGE_EXTS
        first = str(paths[0]) if len(paths) == 1 else f"{storage.parent_of(paths[0])} ({len(paths)} tars)"
        return cls(shards=[str(p) for p in paths], image_exts=exts, require_label=require_label,
                   description=f"webdataset {printable(first)}", names=names, options=options,
                   signatures=signatures, max_bytes=max_bytes)

    def fingerprint(self) -> str:
        """Hash of the shard names and sizes (and what is read from them)."""
        digest = hashlib.sha256(f"{','.join(self.image_exts)}\0{self.require_label}\n".encode())
        for path in self.shards:
            size = self.signatures.get(path) or _size(path)
            digest.update(f"{printable(storage.name_of(path))}\0{size}\n".encode())
        return digest.hexdigest()

    def item_id(self, index: int) -> str:  # ids come with the records
        raise NotImplementedError("tar sample ids come with their records")

    def records(self, shard: int) -> Iterator[Record]:
        """The shard's samples in tar order, and an error record for whatever could not be read."""
        reader = TarReader(self, shard)
        yield from reader.samples()
        if not reader.yielded:
            yield reader.error(0, "the tar holds no samples")

    def read_member(self, path: str) -> bytes:
        """A member's bytes by its `<tar>#<member>` path, as a row shows it (overlays re-read their photo, in
        the writer thread); at most max_bytes + 1 of them (a larger member was an error row).

        The last tar read stays open with its members by name: a tar's rows come in order, and a lookup by
        name alone would scan its headers again for every photo.
        """
        tar_path, _, member = path.partition("#")
        if self._open_tar is None or self._open_tar[0] != tar_path:
            if self._open_tar is not None:
                self._open_tar[1].close()
            real = next((shard for shard in self.shards if printable(shard) == tar_path), tar_path)
            tar = tarfile.open(fileobj=open_tar_file(real, self.options), mode="r:*", encoding="utf-8",
                               errors="surrogateescape")
            self._open_tar = (tar_path, tar, {printable(info.name): info for info in tar.getmembers()})
        _, tar, members = self._open_tar
        handle = tar.extractfile(members[member]) if member in members else None  # a hard link: its target's
        return handle.read(self.max_bytes + 1) if handle is not None else b""


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1
