"""Decoding: raw file or bytes to an upright RGB PIL image, exactly as transformers' load_image does."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from .storage import RemoteFile, StoreReadError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class DecodeError(Exception):
    """One image could not be decoded; the message becomes the row's `error`."""


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image and its size after EXIF orientation."""

    image: Image.Image
    width: int
    height: int


URL_TIMEOUT_S = 60


def _read(raw: str | Path | bytes | RemoteFile) -> bytes:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    if isinstance(raw, RemoteFile):
        try:
            return raw.read()
        except StoreReadError as exc:
            raise DecodeError(f"cannot read {raw.url}: {exc}") from None
    if isinstance(raw, str) and raw.startswith(("http://", "https://")):
        return _fetch(raw)
    try:
        return Path(raw).read_bytes()
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None


def _fetch(url: str) -> bytes:
    """An image named by an http(s) URL in a table; a failure is this image's error, with the server's reason."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise DecodeError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DecodeError(f"cannot fetch {url}: {getattr(exc, 'reason', None) or exc}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    # Pillow warns above its limit and refuses above twice it; _check_pixels applies ours instead, so a
    # --max-pixels above Pillow's default is honoured. Decoding runs in one thread per process.
    default = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, default or 0) if default else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = default


def megapixels(value: int, limit: int) -> tuple[str, str]:
    """Both counts in Mpx with the fewest decimals (at least one) that tell them apart."""
    for digits in range(1, 7):
        shown = f"{value / 1e6:.{digits}f}", f"{limit / 1e6:.{digits}f}"
        if shown[0] != shown[1]:
            return shown
    return f"{value / 1e6}", f"{limit / 1e6}"


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        size, limit = megapixels(width * height, max_pixels)
        raise DecodeError(
            f"image is {width}x{height} = {size} Mpx, over the decompression-bomb limit of {limit} Mpx "
            "(see --max-pixels)"
        )


def decode_image(raw: str | Path | bytes | RemoteFile, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Open, EXIF-transpose and convert to RGB; any failure becomes a DecodeError with a short message."""
    data = _read(raw)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = _open(data, max_pixels)
        _check_pixels(image, max_pixels)
        # The same two steps, in the same order, as transformers.image_utils.load_image, without the copies
        # of the whole image those calls make when there is nothing to rotate or convert (same pixels).
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode != "RGB":
            image = image.convert("RGB")
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:  # Pillow's message names a memory address: not reproducible
        raise DecodeError("cannot identify image file: not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"over Pillow's decompression-bomb limit: {exc}") from None
    except Exception as exc:  # Pillow raises many types for corrupt data; each becomes an error row.
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    return Decoded(image=image, width=image.width, height=image.height)


TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def probe_size(raw: str | Path | bytes | RemoteFile) -> tuple[int, int] | None:
    """(width, height) after EXIF orientation from the header alone (an object: its first ranges); None when
    the header is unreadable."""
    try:
        source = io.BytesIO(raw) if isinstance(raw, (bytes, bytearray)) else raw.open() if isinstance(
            raw, RemoteFile) else raw
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
    except Exception:  # the worker will record the real error
        return None
    return (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)
