"""Sources: folders and `datasets` datasets, each an ordered, indexable list of images behind one interface."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Protocol

from mv2batch import storage
from mv2batch.errors import InputError
from mv2batch.inputs.listing import image_extensions, list_folder, list_prefix, printable, warn_about
from mv2batch.inputs.urls import HttpFile, UrlLimits, is_http

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class Record:
    """What a worker needs to produce one row: the encoded image and its metadata."""

    raw: str | bytes | storage.RemoteFile
    path: str | None
    label: int | None
    target: str | storage.RemoteFile | None = None  # a ground-truth mask file, for segmentation evaluation
    id: str | None = None  # the row's id, where the source names it as it reads (tar keys, an id column)
    error: str | None = None  # why this item has no image (a tar sample without one): the row's error


class IndexedSource(Protocol):
    """An input of known length read by index: planned into shards up front, any shard read in any order."""

    streamed: ClassVar[bool]  # False
    description: str
    label_names: list[str] | None

    def __len__(self) -> int: ...
    def item_id(self, index: int) -> str: ...
    def read(self, index: int) -> Record: ...
    def fingerprint(self) -> str: ...


class StreamedSource(Protocol):
    """An input read once, in order: cut into shards as it comes (its length is known only at the end)."""

    streamed: ClassVar[bool]  # True
    description: str
    label_names: list[str] | None

    def records(self) -> Iterator[Record]: ...
    def item_id(self, index: int) -> str: ...
    def fingerprint(self) -> str: ...


class ShardedSource(Protocol):
    """An input that comes in shards of its own (WebDataset tars): one mv2batch shard per input shard, their
    number known up front, each read in order by one loader worker; a shard's length is known once read."""

    streamed: ClassVar[bool]  # False
    sharded: ClassVar[bool]  # True
    description: str
    label_names: list[str] | None
    shards: list[str]

    def records(self, shard: int) -> Iterator[Record]: ...  # in a worker; every Record names its id
    def read_member(self, path: str) -> bytes: ...  # a record's encoded image again, by its path
    def fingerprint(self) -> str: ...


def is_sharded(source: object) -> bool:
    """Whether a source brings its own shards (ShardedSource)."""
    return bool(getattr(source, "sharded", False))


Source = IndexedSource | StreamedSource | ShardedSource  # what inputs.openers.open_source gives



def list_images(root: Path) -> tuple[list[str], int]:
    """Image paths under root relative to it, sorted; also the count of files left out (listing.list_folder)."""
    listing = list_folder(root)
    return listing.ids, listing.skipped_files


@dataclass
class FolderSource:
    """Every image file under a folder (or object under a URL prefix), recursively, in sorted order; id = path
    relative to the folder. Evaluation layouts attach a gold label, or a ground-truth mask file, to each image.
    """

    streamed: ClassVar[bool] = False
    root: Path | str  # a URL: an object-store prefix, read through fsspec in the workers
    ids: list[str]
    skipped_files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # what the listing left out, by kind
    label_names: list[str] | None = None
    description: str = ""
    labels: list[int | None] | None = None
    targets: list[str] | None = None
    options: dict | None = None  # the object store's --storage-options
    signatures: dict[str, str] | None = None  # the object store's size and ETag of each id
    real_names: dict[str, str] = field(default_factory=dict)  # id -> name on disk, where that is not UTF-8

    @classmethod
    def open(cls, root: str | Path, exclude: Iterable[Path | str] = (),
             options: dict | None = None) -> "FolderSource":
        """List the folder (leaving out the folders in exclude), or raise InputError when it is missing or holds
        no images; say on the warning line what the listing left out."""
        path = storage.location(root)
        if isinstance(path, str):
            return cls._open_prefix(path, exclude, options)
        if not path.exists():
            raise InputError(f"input folder not found: {path}")
        if not path.is_dir():
            raise InputError(f"input is not a folder: {path}")
        listing = list_folder(path, exclude)
        warn_about(listing, path)
        if not listing.ids:
            extensions = ", ".join(sorted(e.lstrip(".") for e in image_extensions()))
            raise InputError(f"no images found under {path} (looked for: {extensions})")
        return cls(root=path.resolve(), ids=listing.ids, skipped_files=listing.skipped_files,
                   skipped=listing.skipped, description=f"folder {printable(str(path))}",
                   real_names=listing.real_names)

    @classmethod
    def _open_prefix(cls, url: str, exclude: Iterable[Path | str], options: dict | None) -> "FolderSource":
        with storage.start_up_errors("input", url):
            listing = list_prefix(url, options, exclude)
        warn_about(listing, url)
        if not listing.ids:
            extensions = ", ".join(sorted(e.lstrip(".") for e in image_extensions()))
            raise InputError(f"no images found under {url} (looked for: {extensions})")
        return cls(root=url, ids=listing.ids, skipped_files=listing.skipped_files, skipped=listing.skipped,
                   description=f"folder {url}", options=options, signatures=listing.signatures)

    def file(self, relative: str) -> str:
        """Where a file of this folder lies, as text (a path or a URL); its name on disk, bytes that are not
        UTF-8 included."""
        return str(storage.join(self.root, self.real_names.get(relative, relative)))

    def remote(self, where: str | None) -> str | storage.RemoteFile | None:
        """What a worker reads: a path, or the object behind a URL with this store's options."""
        return storage.RemoteFile(where, self.options) if storage.is_url(where) else where

    def __len__(self) -> int:
        return len(self.ids)

    def item_id(self, index: int) -> str:
        return self.ids[index]

    def read(self, index: int) -> Record:
        path = self.file(self.ids[index])
        label = self.labels[index] if self.labels is not None else None
        target = self.targets[index] if self.targets is not None else None
        return Record(raw=self.remote(path), path=printable(path), label=label, target=self.remote(target))

    def fingerprint(self) -> str:
        """Hash of the listing: ids, file sizes (objects: size and ETag) and gold labels, so a changed input is a
        different run."""
        digest = hashlib.sha256()
        for index, item in enumerate(self.ids):
            size = self.signatures.get(item) if self.signatures is not None else _size(Path(self.file(item)))
            label = self.labels[index] if self.labels is not None else ""
            target = self.targets[index] if self.targets is not None else ""
            digest.update(f"{item}\0{size}\0{label}\0{target}\n".encode())
        return digest.hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


@dataclass
class DatasetColumns:
    """A `datasets` split and the columns that hold the image and the gold label; ids are `split/index`."""

    dataset: datasets.Dataset | datasets.IterableDataset  # read whole (DatasetSource) or streamed
    split: str
    image_column: str
    label_column: str | None
    label_names: list[str] | None = None
    description: str = ""
    id_column: str | None = None  # ids from this column (they travel with the records) instead of split/index
    base: Path | str | None = None  # relative image paths in the table point from here (the table's folder)
    options: dict | None = None  # the object store's --storage-options, for tables and images named by URL
    urls: UrlLimits = field(default_factory=UrlLimits)  # an image URL's deadline and size cap

    def item_id(self, index: int) -> str:
        return f"{self.split}/{index}"

    def record(self, row: dict) -> Record:
        """One row's undecoded image cell, label and (with an id column) id."""
        record = cell_record(row[self.image_column], row.get(self.label_column) if self.label_column else None,
                             self.base, self.options, self.urls)
        if self.id_column is None:
            return record
        return replace(record, id=str(id_value(row[self.id_column])))


@dataclass
class DatasetSource(DatasetColumns):
    """A map-style `datasets.Dataset`; the image column is read undecoded and decoded in the workers."""

    streamed: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> Record:
        return self.record(self.dataset[index])

    def fingerprint(self) -> str:
        """The dataset's own content fingerprint, with split and length."""
        own = getattr(self.dataset, "_fingerprint", "")
        return hashlib.sha256(f"{own}\0{self.split}\0{len(self)}".encode()).hexdigest()


class IdCheck:
    """--id-column's values as they come, for the indexed path (the whole column, before any work) and the
    streaming one (each row before its record is made, so before its row or mask is written): a null or a
    repeated id is refused in one line. The ids seen are kept, about 100 bytes each."""

    def __init__(self, column: str):
        self.column, self.seen = column, set()

    def see(self, value: object, row: int) -> str:
        if value is None or value != value:  # None, or NaN (pandas' null of a numeric column)
            raise InputError(f"--id-column {self.column!r} is empty in row {row}: every row needs an id")
        text = str(value)
        if text in self.seen:
            raise InputError(f"--id-column {self.column!r} repeats {text!r} (again in row {row}): ids must be unique")
        self.seen.add(text)
        return text


def id_value(value: Any) -> Any:  # a table cell, any type
    """An --id-column cell's value (the image column of paths itself is cast to an undecoded datasets.Image)."""
    return value.get("path") if isinstance(value, dict) else value


def cell_record(cell: Any, label: Any, base: Path | str | None = None, options: dict | None = None,
                urls: UrlLimits | None = None) -> Record:  # cell, label: table cells, any type
    """An undecoded `datasets.Image` cell ({bytes, path}) and its label as a Record; a relative path points
    from base (the table's folder); an object-store URL is read in the worker with the run's options, an http(s)
    one within urls' deadline and size cap."""
    gold = None if label is None or int(label) < 0 else int(label)
    if cell is None or (isinstance(cell, dict) and cell.get("bytes") is None and not cell.get("path")):
        return Record(raw=b"", path=None, label=gold, error="the image cell is empty (null): no image to read")
    path = cell.get("path") if isinstance(cell, dict) else None
    if isinstance(cell, dict):
        raw = cell.get("bytes") or _from(base, cell.get("path")) or b""
    elif isinstance(cell, (bytes, str)):
        raw = _from(base, cell) if isinstance(cell, str) else cell
    else:
        raw = b""
    shown = path if path is None or isinstance(raw, bytes) else raw
    if isinstance(raw, str) and is_http(raw):
        raw = HttpFile(raw, None, urls or UrlLimits())
    elif isinstance(raw, str) and storage.is_url(raw):
        raw = storage.RemoteFile(raw, options)
    return Record(raw=raw, path=shown, label=gold)


def _from(base: Path | str | None, path: str | None) -> str | None:
    if not path or base is None or "://" in path or Path(path).is_absolute():
        return path
    return str(storage.join(base, path))
