"""Listing a folder: its image files in sorted order, each real directory once, and what was skipped, by kind.

Only regular files are listed: a FIFO named like a photo would block the worker that opens it forever. Symbolic
links are followed, but a directory reached twice (a link back up the tree) is walked once. Whatever is left
out is counted by kind, recorded in run.json and said in one warning line: nothing is skipped silently.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

log = logging.getLogger("mv2batch")

BASE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Formats that are photos but that this installation may have no decoder for: listed where it has one.
OPTIONAL_FORMATS = {".avif": "avif", ".heic": "heif", ".heif": "heif"}

NOT_IMAGES = "not images"
NO_DECODER = "photos no decoder here reads"
NOT_REGULAR = "not regular files (FIFO, socket, device)"
UNREADABLE = "unreadable directories"
REPEATED = "directories reached again through a link"
OUTPUTS = "this run's own outputs"
AMBIGUOUS = "names not UTF-8 whose printable form is another file's name"


def register_plugins() -> None:
    """HEIC / HEIF through pillow-heif (AVIF is Pillow's own), once per process: before a folder is listed and
    before the first image is opened (so in every loader worker). Not at import: it costs ~75 ms, and --help
    imports this module."""
    global _PLUGINS_REGISTERED
    if _PLUGINS_REGISTERED:
        return
    _PLUGINS_REGISTERED = True
    try:
        import pillow_heif
    except ImportError:  # image_extensions then leaves .heic / .heif out, and says so
        return
    pillow_heif.register_heif_opener()


_PLUGINS_REGISTERED = False


def _decodable(extension: str) -> bool:
    """Whether Pillow (with its plugins registered, e.g. pillow-heif) opens files of this extension."""
    from PIL import Image

    register_plugins()

    return extension in Image.registered_extensions()


def image_extensions() -> frozenset[str]:
    """The extensions a folder listing takes: the common formats, and AVIF / HEIF where a decoder is present."""
    return BASE_EXTENSIONS | {e for e in OPTIONAL_FORMATS if _decodable(e)}


@dataclass
class Listing:
    """A folder's image ids (paths relative to it, POSIX, sorted) and the entries left out, by kind."""

    ids: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few of each kind, for the warning
    signatures: dict[str, str] | None = None  # an object store's size and ETag of each id (the fingerprint)
    real_names: dict[str, str] = field(default_factory=dict)  # id -> the name on disk, where printable changed it

    def skip(self, kind: str, relative: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if len(self.examples.setdefault(kind, [])) < 3:
            self.examples[kind].append(printable(relative))

    def add(self, relative: str) -> None:
        shown = printable(relative)
        self.ids.append(shown)
        if shown != relative:
            self.real_names[shown] = relative

    @property
    def skipped_files(self) -> int:
        """Files left out (not directories)."""
        return sum(n for kind, n in self.skipped.items() if kind in (NOT_IMAGES, NO_DECODER, NOT_REGULAR, AMBIGUOUS))

    def warning(self, root: Path | str) -> str | None:
        """One line naming what was left out, by kind with a few examples each (None: nothing was)."""
        if not self.skipped:
            return None
        parts = [f"{n} {kind} ({', '.join(self.examples[kind])}{', ...' if n > len(self.examples[kind]) else ''})"
                 for kind, n in sorted(self.skipped.items())]
        return f"left out under {root}: " + "; ".join(parts)


def printable(name: str) -> str:
    """A file name as ids and paths hold it: the bytes a file system gave that are not UTF-8 (Python keeps them
    as surrogates, os.fsdecode) written as `\\xHH`, so that Parquet, JSON and a terminal take the name; the
    source keeps the name itself to read the file (Listing.real_names)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        data = name.encode("utf-8", "surrogateescape") if _only_escapes(name) else name.encode("utf-8", "surrogatepass")
        return data.decode("utf-8", "backslashreplace")


def _only_escapes(name: str) -> bool:
    return all(not 0xD800 <= ord(c) < 0xE000 or 0xDC80 <= ord(c) < 0xDD00 for c in name)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_folder(root: Path, exclude: Iterable[Path | str] = (), scan: Callable = os.scandir) -> Listing:
    """The image files under root (hidden entries skipped), each real directory walked once; directories in
    exclude (this run's masks and overlays, when they lie under the input) are left out. scan: os.scandir
    (a test passes one that refuses a directory, as permissions do for anyone but root)."""
    extensions, listing = image_extensions(), Listing()
    excluded = {_identity(path) for path in exclude if isinstance(path, Path) and path.is_dir()}
    seen: set[tuple[int, int]] = set()
    pending = [Path(".")]
    while pending:
        relative = pending.pop()
        directory = root / relative
        identity = _identity(directory)
        if identity in seen:
            listing.skip(REPEATED, relative.as_posix())
            continue
        seen.add(identity)
        if identity in excluded:
            listing.skip(OUTPUTS, relative.as_posix())
            continue
        try:
            entries = sorted(scan(directory), key=lambda entry: entry.name)
        except OSError:
            listing.skip(UNREADABLE, relative.as_posix())
            continue
        subdirectories = [sub for entry in entries if not _is_hidden(entry.name)
                          if (sub := _add(entry, relative / entry.name, extensions, listing)) is not None]
        pending.extend(reversed(subdirectories))  # depth first, in sorted order: the first name of a directory wins
    listing.ids.sort()
    if listing.real_names:
        _drop_ambiguous(listing)
    return listing


def _drop_ambiguous(listing: Listing) -> None:
    """`bad\\xff.jpg` spelled with a backslash beside a file named with the byte 0xff: ids must be unique, so
    the one that is not UTF-8 is left out (and said)."""
    from collections import Counter

    for shown in [name for name, n in Counter(listing.ids).items() if n > 1 and name in listing.real_names]:
        listing.ids.remove(shown)
        listing.skip(AMBIGUOUS, listing.real_names.pop(shown))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _add(entry: os.DirEntry, relative: Path, extensions: frozenset[str], listing: Listing) -> Path | None:
    """List or skip one entry; a directory is returned, to be walked."""
    try:
        mode = entry.stat().st_mode  # follows links: what the link points to is what counts
    except OSError:  # a dangling link: not an image that can be read
        listing.skip(NOT_IMAGES, relative.as_posix())
        return None
    if stat.S_ISDIR(mode):
        return relative
    suffix = relative.suffix.lower()
    if suffix not in extensions:
        listing.skip(NO_DECODER if suffix in OPTIONAL_FORMATS else NOT_IMAGES, relative.as_posix())
    elif not stat.S_ISREG(mode):
        listing.skip(NOT_REGULAR, relative.as_posix())
    else:
        listing.add(relative.as_posix())
    return None


def list_prefix(url: str, options: dict | None = None, exclude: Iterable[Path | str] = ()) -> Listing:
    """The image objects under a URL prefix, by key in sorted order (hidden keys skipped, as hidden files are;
    keys under this run's outputs left out), each with its size and ETag. Object stores list keys, not
    folders: there are no links, loops or FIFOs to guard against."""
    from mv2batch import storage

    fs = storage.filesystem(url, options)
    root = fs._strip_protocol(url).rstrip("/")
    outputs = tuple(fs._strip_protocol(str(path)).rstrip("/") + "/" for path in exclude if storage.is_url(path))
    extensions, listing = image_extensions(), Listing(signatures={})
    for key, info in sorted(fs.find(root, detail=True).items()):
        relative = key[len(root) + 1:] if key.startswith(root + "/") else ""
        if not relative or info.get("type") == "directory" or any(map(_is_hidden, relative.split("/"))):
            continue
        suffix = PurePosixPath(relative).suffix.lower()
        if key.startswith(outputs) and outputs:
            listing.skip(OUTPUTS, relative)
        elif suffix not in extensions:
            listing.skip(NO_DECODER if suffix in OPTIONAL_FORMATS else NOT_IMAGES, relative)
        else:
            listing.ids.append(relative)
            listing.signatures[relative] = f"{info.get('size')}:{info.get('ETag') or info.get('etag') or ''}"
    return listing


def warn_about(listing: Listing, root: Path | str) -> None:
    """Say on the warning line what the listing left out."""
    line = listing.warning(root)
    if line:
        log.warning(line)
