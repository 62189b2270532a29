"""Decoding: raw file or bytes to an upright RGB PIL image, exactly as transformers' load_image does."""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from mv2batch.config import DEFAULT_MAX_PIXELS
from mv2batch.inputs.listing import register_plugins
from mv2batch.inputs.urls import HttpFile, is_http
from mv2batch.storage import RemoteFile, StoreReadError

if TYPE_CHECKING:
    from mv2batch.loading.preprocess import ResizeCrop


class DecodeError(Exception):
    """One image could not be decoded; the message becomes the row's `error`."""


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image and its size after EXIF orientation."""

    image: Image.Image
    width: int
    height: int
    sha256: str | None = None  # of the encoded bytes: byte-identical files share it


def _read(raw: str | Path | bytes | RemoteFile) -> bytes:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    if isinstance(raw, RemoteFile):
        try:
            return raw.read()
        except StoreReadError as exc:
            raise DecodeError(f"cannot read {raw.url}: {exc}") from None
    if isinstance(raw, str) and is_http(raw):  # a URL as a plain string: fetched within the default limits
        return _read(HttpFile(raw))
    try:
        return Path(raw).read_bytes()
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    # Pillow warns above its limit and refuses above twice it; _check_pixels applies ours instead, so a
    # --max-pixels above Pillow's default is honoured. Decoding runs in one thread per process.
    register_plugins()
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


def decode_image(raw: str | Path | bytes | RemoteFile, max_pixels: int = DEFAULT_MAX_PIXELS,
                 fast: ResizeCrop | None = None) -> Decoded:
    """Open, EXIF-transpose and convert to RGB; any failure becomes a DecodeError with a short message.

    fast (`--decode fast`: the protocol's preprocess.ResizeCrop): a JPEG is decoded by libjpeg at the smallest
    DCT scale (1/2, 1/4, 1/8) whose image still covers the resize target, then resized to the size the exact
    path resizes to, with the protocol's filter; width and height stay the original's. Other formats: exact.
    """
    data = _read(raw)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    _check_boxes(data)
    try:
        image = _open(data, max_pixels)
        _check_pixels(image, max_pixels)
        if fast is not None:
            size = _upright_size(image)  # before the draft shrinks the image
            _draft(image, fast)
        # The same two steps, in the same order, as transformers.image_utils.load_image, without the copies
        # of the whole image those calls make when there is nothing to rotate or convert (same pixels).
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if fast is None:
            size = image.size
        elif image.size != size:  # drafted: to the exact path's resized size, so shapes and crops are the same
            image = image.resize(fast.output_size(*size), resample=fast.resample)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:  # Pillow's message names a memory address: not reproducible
        raise DecodeError("cannot identify image file: not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"over Pillow's decompression-bomb limit: {exc}") from None
    except Exception as exc:  # Pillow raises many types for corrupt data; each becomes an error row.
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    # Hashing is cheap beside decoding (about 1 GB/s on one core against tens of MB/s for JPEG decoding).
    return Decoded(image=image, width=size[0], height=size[1], sha256=hashlib.sha256(data).hexdigest())


def _check_boxes(data: bytes) -> None:
    """A HEIF / AVIF file (ISO base media boxes) shorter than its boxes say: libheif decodes what is there and
    paints the missing tiles black, without a word, so the cut is found here."""
    if data[4:8] != b"ftyp":
        return
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "big")
        if size == 1 and offset + 16 <= len(data):  # a 64-bit size follows the type
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        elif size == 0:  # the last box runs to the end of the file
            return
        if size < 8:
            raise DecodeError(f"corrupt HEIF / AVIF file: a box of {size} bytes at byte {offset}")
        offset += size
    if offset > len(data):
        raise DecodeError(f"HEIF / AVIF file cut short: its boxes need {offset} bytes, it has {len(data)}")


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112, 1) in TRANSPOSED_ORIENTATIONS else (width, height)


def _draft(image: Image.Image, resize: ResizeCrop) -> None:
    """Ask libjpeg for a reduced decode that still covers the resize target on the short side."""
    if image.format != "JPEG" or not resize.shortest_edge:
        return
    width, height = image.size
    scale = resize.shortest_edge / min(width, height)
    if scale <= 0.5:  # libjpeg scales by 1/2, 1/4 or 1/8: any of them keeps the short side >= the target
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def probe_size(raw: str | Path | bytes | RemoteFile) -> tuple[int, int] | None:
    """(width, height) after EXIF orientation from the header alone (an object: its first ranges); None when
    the header is unreadable."""
    register_plugins()
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
