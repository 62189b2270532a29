"""One WebDataset tar read in order: members grouped into samples, links resolved inside the tar, reads bounded.

Only what a row needs is read: the sample's image member (the first of the image extensions it has, at most
`max_bytes`) and its label member (at most LABEL_MAX_BYTES). Every other member is passed over unread
(tarfile skips its data), so a 1.5 GB sidecar costs no memory. A hard link (GNU tar stores the second name of a
hardlinked file as one) reads its target's data from the same tar; a symbolic link is never followed: as a
sample's image it is an error row naming its target.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Generator, Iterator, Protocol

from mv2batch import storage
from mv2batch.inputs.listing import printable
from mv2batch.inputs.sources import Record
from mv2batch.storage import human_bytes

LABEL_EXTS = ("cls", "label")
LABEL_MAX_BYTES = 1 << 20  # a class id is a few digits: a larger `cls` member is not one, and is not read
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks end every complete tar
KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key, then everything after the dot
STREAM_BLOCK = 8 << 20  # an object's tar is read in ranges this large: few requests, little memory
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, storage.StoreReadError)


def split_key(member: str) -> tuple[str, str] | None:
    """(key, extension) of a member path as WebDataset splits it; None for a file with no extension."""
    match = KEY.match(member)
    return (match.group(1), match.group(2)) if match else None


@dataclass
class Member:
    """One member of a sample: its name (printable), size, and its bytes where they were read, or why not."""

    name: str
    size: int
    data: bytes | None = None
    problem: str | None = None

    def shown(self) -> str:
        """The member as a row's message names it: a large one that was not read, with its size."""
        unread = self.data is None and self.size > LABEL_MAX_BYTES
        return f"{self.name} ({human_bytes(self.size)}, not read)" if unread else self.name


def _kind(info: tarfile.TarInfo) -> str:
    kinds = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
    return kinds.get(info.type, f"a member of tar type {info.type!r}")


class TarsRead(Protocol):
    """What a reader reads of its source: inputs.tars.TarShards (which imports this module, so not named here)."""

    shards: list[str]
    names: list[str]
    image_exts: tuple[str, ...]
    require_label: bool
    max_bytes: int
    options: dict | None


class TarReader:
    """One pass over one tar of a source (inputs.tars.TarShards), grouping members into samples."""

    def __init__(self, source: TarsRead, shard: int):
        self.source, self.path, self.name = source, source.shards[shard], source.names[shard]
        self.shown = printable(self.path)
        self.yielded = 0
        self.keys: set[str] = set()
        self.targets: dict[str, tuple[int, int]] = {}  # image and label members: name -> (data offset, size)
        self.again: tuple[BinaryIO, tarfile.TarFile] | None = None  # the tar opened again, for hard links' targets

    def error(self, offset: int, message: str, key: str | None = None) -> Record:
        self.yielded += 1
        item = f"{self.name}/{printable(key)}" if key is not None else f"{self.name}/@{offset}"
        return Record(raw=b"", path=f"{self.shown}#@{offset}", label=None, id=item, error=message)

    def samples(self) -> Iterator[Record]:
        try:
            handle = open_tar_file(self.path, self.source.options)
        except (OSError, storage.StoreReadError) as exc:
            yield self.error(0, f"cannot read {self.shown}: {getattr(exc, 'strerror', None) or exc}")
            return
        try:
            with handle:
                yield from self._read(handle)
        finally:
            if self.again is not None:
                self.again[1].close()
                self.again[0].close()

    def _read(self, handle: BinaryIO) -> Iterator[Record]:
        try:
            tar = tarfile.open(fileobj=handle, mode="r|*", encoding="utf-8", errors="surrogateescape")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            yield self.error(0, f"{self.shown} is not a tar file ({exc})")
            return
        cut_short = yield from self._grouped(tar)
        problem = None if cut_short else _tail_problem(handle, tar)
        if problem:
            yield self.error(tar.offset, f"{self.shown}: {problem}")

    def _grouped(self, tar: tarfile.TarFile) -> Generator[Record, None, bool]:
        """The tar's samples; returns whether reading stopped at damage (reported as the last record)."""
        key, members, member = None, {}, None
        try:
            for member in tar:
                tar.members = []  # tarfile keeps every header it has read: memory would grow with the tar
                split = split_key(member.name) if not member.isdir() else None
                if split is None:
                    continue
                if split[0] != key and key is not None:
                    yield self._sample(key, members)
                    members = {}
                key = split[0]
                members[split[1].lower()] = self._member(tar, member, split[1].lower(), members)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            offset = member.offset if member is not None else 0
            yield self.error(offset, f"{self.shown} is cut short or corrupt at byte {offset} "
                                     f"(member {printable(member.name) if member else '?'}): {exc}", key)
            return True
        if key is not None:
            yield self._sample(key, members)
        return False

    def _rank(self, ext: str) -> int:
        exts = self.source.image_exts
        return exts.index(ext) if ext in exts else len(exts)

    def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, members: dict[str, Member]) -> Member:
        """The member, read only when it is the label or an image preferred to those of the sample before it."""
        rank, name = self._rank(ext), printable(info.name)
        # Ranks differ by extension, so `<=` lets a repeated member (a.jpg twice) replace the one before it.
        wanted_image = rank < len(self.source.image_exts) and rank <= min(map(self._rank, members), default=rank)
        if info.isfile() and (ext in LABEL_EXTS or rank < len(self.source.image_exts)):
            self.targets[info.name] = (info.offset_data, info.size)
        if not (wanted_image or ext in LABEL_EXTS):
            return Member(name, info.size)
        limit = LABEL_MAX_BYTES if ext in LABEL_EXTS else self.source.max_bytes
        if info.issym():
            return Member(name, info.size, problem=f"{name} is a symbolic link to {printable(info.linkname)!r}: "
                                                   "links are not followed")
        if info.islnk():
            return self._linked(info, name, limit, ext)
        if not info.isfile():
            return Member(name, info.size, problem=f"{name} is {_kind(info)}, not a file")
        if info.size > limit:
            return Member(name, info.size, problem=_too_large(name, info.size, limit, ext))
        return Member(name, info.size, tar.extractfile(info).read())

    def _linked(self, info: tarfile.TarInfo, name: str, limit: int, ext: str) -> Member:
        """A hard link: its target's bytes, read again from the tar (its data came before, in the stream)."""
        target = self.targets.get(info.linkname)
        if target is None:
            return Member(name, 0, problem=f"{name} is a hard link to {printable(info.linkname)!r}, which is not "
                                           "an image or label member before it in the tar")
        offset, size = target
        if size > limit:
            return Member(name, size, problem=_too_large(name, size, limit, ext))
        try:
            return Member(name, size, self._read_at(offset, size))
        except READ_ERRORS as exc:
            return Member(name, size, problem=f"{name} is a hard link to {printable(info.linkname)!r}, which "
                                              f"cannot be read again: {exc}")

    def _read_at(self, offset: int, size: int) -> bytes:
        if self.again is None:
            handle = open_tar_file(self.path, self.source.options)
            self.again = (handle, tarfile.open(fileobj=handle, mode="r:*"))
        info = tarfile.TarInfo()
        info.offset_data, info.size, info.type = offset, size, tarfile.REGTYPE
        return self.again[1].extractfile(info).read()

    def _sample(self, key: str, members: dict[str, Member]) -> Record:
        if key in self.keys:
            return self.error(0, f"key {printable(key)!r} appears again in {self.shown}: a sample's members must "
                                 "be consecutive", key=f"{key}@{self.yielded}")
        self.keys.add(key)
        self.yielded += 1
        shown_key = printable(key)
        item, had = f"{self.name}/{shown_key}", ", ".join(member.shown() for member in members.values())
        image = next((members[e] for e in self.source.image_exts if e in members), None)
        if image is None:
            wanted = ", ".join(self.source.image_exts[:6])
            return Record(raw=b"", path=f"{self.shown}#{shown_key}", label=None, id=item,
                          error=f"sample {shown_key!r} has no image member (it has: {had}; looked for: {wanted}; "
                                "see --image-ext)")
        path = f"{self.shown}#{image.name}"
        if image.problem is not None:
            return Record(raw=b"", path=path, label=None, id=item, error=f"sample {shown_key!r}: {image.problem}")
        label, problem = _label(members)
        if problem is None and label is None and self.source.require_label:
            problem = f"sample {shown_key!r} has no cls member (it has: {had}): evaluation needs the class id"
        return Record(raw=image.data, path=path, label=label, id=item, error=problem)


def _too_large(name: str, size: int, limit: int, ext: str) -> str:
    cap = f"the {human_bytes(limit)} a label may have" if ext in LABEL_EXTS else \
        f"the {human_bytes(limit)} cap (--max-image-bytes)"
    return f"{name} is {human_bytes(size)}, over {cap}: not read"


def open_tar_file(path: str, options: dict | None) -> BinaryIO:  # a local file, or an fsspec one
    """A tar file, or the object behind a URL (a seekable file that reads ahead in large ranges)."""
    if not storage.is_url(path):
        return open(path, "rb")
    return storage.retrying(lambda: storage.filesystem(path, options).open(path, "rb", block_size=STREAM_BLOCK))


def _label(members: dict[str, Member]) -> tuple[int | None, str | None]:
    """The class id of a `cls` / `label` member, or why it holds none."""
    for ext in LABEL_EXTS:
        if ext in members:
            member = members[ext]
            if member.problem is not None:
                return None, member.problem
            text = member.data.decode("utf-8", "replace").strip()
            if re.fullmatch(r"\d+", text):
                return int(text), None
            return None, f"{member.name} holds {text[:20]!r}, not a class id"
    return None, None


def _tail_problem(handle: BinaryIO, tar: tarfile.TarFile) -> str | None:
    """What follows the last member of an uncompressed tar, when it is not the end-of-archive marker.

    tarfile ends quietly at a header cut short, or at the end of the file with no marker, so a tar truncated
    between members would otherwise lose its last samples without a word.
    """
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return None  # a compressed stream that ended early has raised already
    size = handle.size if hasattr(handle, "size") else os.fstat(handle.fileno()).st_size
    handle.seek(tar.offset)
    rest = handle.read(min(size - tar.offset, 1 << 20))
    if size - tar.offset < END_OF_ARCHIVE:
        return f"ends at byte {size} without the end-of-archive marker: cut short after byte {tar.offset}"
    if rest.strip(b"\0"):
        return f"bytes after offset {tar.offset} are not a tar member (corrupt, or cut short)"
    return None
