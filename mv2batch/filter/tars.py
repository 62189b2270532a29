"""WebDataset tars: for each tar with a kept sample, a tar of the same name holding every member of each kept
sample (image, cls, json, txt, ...), in the source's order, with the source's bytes and headers.

A tar is streamed once (members of samples that are not kept are skipped, never read into memory), one sample's
members held at a time: a sample is written only once it is complete, so a tar cut short or corrupt loses the
sample it breaks in (left out and counted, as the run made it an error row) and keeps the samples before it.
A tar with nothing kept is not written.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from contextlib import ExitStack
from functools import partial
from typing import BinaryIO, Callable, Iterator

from mv2batch import storage
from mv2batch.filter.destination import Destination, FileWriter
from mv2batch.filter.work import Outcome, ShardWork
from mv2batch.inputs.listing import printable
from mv2batch.inputs.tars import split_key

READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, storage.StoreReadError)
STREAM_BLOCK = 8 << 20  # an object's tar is read in ranges this large
COMPRESSED = (".tar.gz", ".tgz")


class TarLayout:
    """Kept samples of WebDataset tars, one output tar per source tar (the run's shard n is tar n)."""

    name = "tars"
    parallel = True

    def __init__(self, tars: list[str], destination: Destination, write_file: FileWriter,
                 options: dict | None = None):
        self.tars, self.destination, self.write_file, self.options = tars, destination, write_file, options

    def locations(self) -> list[tuple[str, storage.Location]]:
        folders = dict.fromkeys(storage.parent_of(storage.location(tar)) for tar in self.tars)
        return [("the input's tars in", folder) for folder in folders]

    def tasks(self, work: ShardWork) -> list[Callable[[], Outcome]]:
        ids = work.kept.column("id").to_pylist()
        return [partial(self.write_tar, work.shard, ids)] if ids else []

    def write_tar(self, shard: int, ids: list[str]) -> Outcome:
        source = self.tars[shard]
        keys = {item: item.split("/", 1)[1] for item in ids if "/" in item}  # id = <tar name>/<key>
        wanted = set(keys.values())
        final = storage.join(self.destination.root, storage.name_of(source))
        if self.destination.resuming and self.destination.exists(final):
            found = _keys_in(final, self.options)  # written by an earlier attempt: what it holds is what was kept
            return Outcome(_missing(ids, keys, found, None), present=len(found & wanted))
        copier = SampleCopier(source, wanted, self.options)
        written = 0
        with ExitStack() as stack:
            tar = None
            for members in copier.samples():
                if tar is None:  # opened at the first kept sample: a tar whose kept samples are all lost is not written
                    handle = stack.enter_context(self.write_file(self.destination, final))
                    tar = stack.enter_context(tarfile.open(fileobj=handle, mode=_write_mode(final),
                                                           format=tarfile.PAX_FORMAT))
                for info, data in members:
                    tar.addfile(info, io.BytesIO(data) if data is not None else None)
                tar.members = []  # a writing TarFile keeps every header too
                written += 1
        return Outcome(_missing(ids, keys, copier.found, copier.problem), items=written,
                       files=int(tar is not None))


class SampleCopier:
    """One pass over a source tar giving the kept samples' members, grouped as WebDataset groups them."""

    def __init__(self, path: str, wanted: set[str], options: dict | None):
        self.path, self.wanted, self.options = path, wanted, options
        self.found: set[str] = set()
        self.problem: str | None = None  # why the tar could not be read to its end

    def samples(self) -> Iterator[list[tuple[tarfile.TarInfo, bytes]]]:
        """Each kept sample's members, once complete, in tar order (a key seen again later is not the sample
        the run read: it made that one an error row)."""
        try:
            handle = _open(self.path, self.options)
        except READ_ERRORS as exc:
            self.problem = f"cannot read {self.path}: {getattr(exc, 'strerror', None) or exc}"
            return
        with handle:
            current, members, finished = None, [], set()
            for key, info, data in self._members(handle):
                if key != current:
                    if members:
                        self.found.add(current)
                        yield members
                    finished.add(current)
                    current, members = key, []
                if key in self.wanted and key not in finished:
                    members.append((info, data))
            if members and self.problem is None:
                self.found.add(current)
                yield members

    def _members(self, handle: BinaryIO) -> Iterator[tuple[str, tarfile.TarInfo, bytes | None]]:
        """(key, header, bytes: None where the sample is not kept) of each file member; stops at damage."""
        try:
            tar = tarfile.open(fileobj=handle, mode="r|*")
            members = iter(tar)
        except READ_ERRORS as exc:
            self.problem = f"{self.path} is not a tar file ({exc})"
            return
        while True:
            try:
                member = next(members, None)
                if member is None:
                    return
                tar.members = []  # tarfile keeps every header it has read: memory would grow with the tar
                split = split_key(member.name) if member.isfile() or member.islnk() or member.issym() else None
                key = printable(split[0]) if split else None  # as the run's ids write it
                wanted = key in self.wanted and member.isfile()  # a link member is copied as it is: a header
                data = tar.extractfile(member).read() if wanted else None
            except READ_ERRORS as exc:
                self.problem = f"{self.path} is cut short or corrupt: {exc}"
                return
            if key is not None:
                yield key, member, data


def _open(path: str, options: dict | None) -> BinaryIO:  # a local file, or an fsspec one
    if not storage.is_url(path):
        return open(path, "rb")
    return storage.retrying(lambda: storage.filesystem(path, options).open(path, "rb", block_size=STREAM_BLOCK))


def _write_mode(final: storage.Location) -> str:
    return "w|gz" if storage.name_of(final).lower().endswith(COMPRESSED) else "w|"


def _keys_in(final: storage.Location, options: dict | None) -> set[str]:
    """The sample keys of a tar this filter wrote."""
    with _open(str(final), options) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        return {printable(split[0]) for member in tar if (split := split_key(member.name))}


def _missing(ids: list[str], keys: dict[str, str], found: set[str], problem: str | None) -> dict[str, str]:
    """The kept ids whose sample is not in the output, and why."""
    why = problem or "no such sample in the tar (the run read it as an error row)"
    return {item: why for item in ids if keys.get(item) not in found}
