"""File names made from ids (masks, overlays, a filter's copies): one function keeps every such name inside its
folder, whatever the id.

An id comes from a tar member's name, a table's cell or a file name: it may hold `..`, start with `/`, hold
a newline or a NUL, run to thousands of characters, or be a name Windows reserves. `safe_relative_name` maps
every id to a relative POSIX name that

- has no absolute part and no `.`, `..` or empty component (those become `%2E`, `%2E%2E`, `%`),
- holds no control character, `%` or backslash unescaped (each becomes `%XX`, its UTF-8 bytes),
- keeps each component within MAX_COMPONENT bytes and the whole within MAX_NAME bytes: what must be cut ends
  with `%~` and a hash of what was there (stable: the same id gives the same name in every process),
- is injective: two different ids never share a name (`%` is always escaped, so the markers above cannot
  come from an id's own text); ids differing only in the extension that `suffix` replaces are the exception,
  and `MaskNames` finds those among the names it gives.

Unicode stays readable; the name mirrors the id (its folders kept) wherever the id is already harmless, so
`sub/coffee.jpg` gives `sub/coffee.png`.
"""

from __future__ import annotations

import hashlib
import logging

MAX_COMPONENT = 200  # bytes of one folder or file name, suffix included (NAME_MAX is 255 on most file systems)
MAX_NAME = 480  # bytes of the whole relative name: the folder's own path is added (PATH_MAX; S3 keys: 1,024)
HASH_CHARS = 16
CUT = "%~"  # marks a cut component; never produced by escaping, which writes `%` only before two hex digits
SPECIAL = {"": "%", ".": "%2E", "..": "%2E%2E"}
# Names Windows (and so SMB shares and some sync tools) refuse as a file's stem, in any case.
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}

log = logging.getLogger("mv2batch")


def _escaped_char(char: str) -> str:
    if char in "%\\" or ord(char) < 32 or 127 <= ord(char) < 160 or 0xD800 <= ord(char) < 0xE000:
        # A lone surrogate (a file name's undecodable byte) is written as that byte, others as their code point.
        data = char.encode("utf-8", "surrogateescape" if 0xDC80 <= ord(char) < 0xDD00 else "surrogatepass")
        return "".join(f"%{byte:02X}" for byte in data)
    return char


def _escaped(component: str) -> str:
    """One component with nothing a file system or a shell reads specially."""
    if component in SPECIAL:
        return SPECIAL[component]
    text = "".join(map(_escaped_char, component))
    if text.split(".", 1)[0].upper() in RESERVED:
        text = f"%{ord(text[0]):02X}{text[1:]}"
    return text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _head(text: str, room: int) -> str:
    """text's first room bytes at most, never cut inside a character or a `%XX` escape."""
    head = text.encode("utf-8")[:max(room, 0)].decode("utf-8", "ignore")
    percent = head.rfind("%", max(len(head) - 2, 0))
    return head[:percent] if percent >= 0 else head  # a `%` in the last two characters begins a cut escape


def _cut(text: str, room: int, whole: str) -> str:
    """text cut to fit room bytes, ending with CUT and the hash of whole (what was there before escaping)."""
    return f"{_head(text, room - len(CUT) - HASH_CHARS)}{CUT}{_digest(whole)}"


def _stem(name: str) -> str:
    """The name without its extension, as PurePosixPath.with_suffix drops it (a leading dot is no extension)."""
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def safe_relative_name(item_id: str, suffix: str = "") -> str:
    """The name under a folder for the file made from item_id: its extension replaced by suffix (when suffix is
    given), every component escaped and bounded, the whole bounded (see the module's docstring)."""
    parts = str(item_id).split("/")
    if suffix:
        parts[-1] = _stem(parts[-1])
    names = [_escaped(part) for part in parts]
    names = [name if _size(name) <= MAX_COMPONENT else _cut(name, MAX_COMPONENT, part)
             for name, part in zip(names[:-1], parts[:-1])] + [_last(names[-1], parts[-1], suffix)]
    joined = "/".join(names)
    if _size(joined) <= MAX_NAME:
        return joined
    # Too deep: the folders that fit are kept, and one last name stands for the rest of the id.
    kept, used = [], 0
    room = MAX_NAME - len(CUT) - HASH_CHARS - _size(suffix) - 1
    for name in names[:-1]:
        if used + _size(name) + 1 > room:
            break
        kept.append(name)
        used += _size(name) + 1
    return "/".join([*kept, f"{CUT}{_digest(str(item_id))}{suffix}"])


def _last(name: str, original: str, suffix: str) -> str:
    if _size(name) + _size(suffix) <= MAX_COMPONENT:
        return name + suffix
    return _cut(name, MAX_COMPONENT - _size(suffix), original) + suffix


def distinct_name(item_id: str, suffix: str) -> str:
    """A second name for item_id, when its first is another id's: the hash of the whole id before suffix."""
    first = safe_relative_name(item_id, suffix)
    folder, slash, last = first[: len(first) - len(suffix)].rpartition("/")
    tail = f"{CUT}{_digest(str(item_id))}"
    return f"{folder}{slash}{_head(last, MAX_COMPONENT - len(tail) - _size(suffix))}{tail}{suffix}"


class MaskNames:
    """The names given in one process, so that two ids differing only in the extension that the suffix
    replaces (`x.jpg`, `x.png`: both `x.png`) never write one file: the second gets `distinct_name` and a
    warning says so. (Across processes a run cannot see each other's names: the warning is the only trace.)"""

    def __init__(self) -> None:
        self.given: dict[str, str] = {}

    def name(self, item_id: str, suffix: str) -> str:
        name = safe_relative_name(item_id, suffix)
        holder = self.given.setdefault(name, item_id)
        if holder == item_id:
            return name
        other = distinct_name(item_id, suffix)
        log.warning(f"ids {holder!r} and {item_id!r} both make the file name {name!r}: {item_id!r}'s is {other!r}")
        return other
