"""Image URLs in a table (http, https): each fetched within a total deadline and a size cap; what goes wrong is
that row's error, with the reason.

urllib's `timeout` bounds each socket operation, not the fetch: a server sending a byte every 2 s would keep a
run going forever, and a 2 GB body would be read whole into memory. Here a watchdog shuts the connection's
socket when the deadline passes, whatever the fetch is doing (connecting, waiting for headers, reading the
body); a Content-Length over the cap is refused before the body is read, and a body is read in chunks only up
to the cap; a body shorter than its Content-Length, a reset or a refused connection are errors with their
reason. Nothing is retried here: a URL that failed is an error row, which `--retry-errors` runs again.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from mv2batch import storage
from mv2batch.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_URL_TIMEOUT_S
from mv2batch.storage import human_bytes

if TYPE_CHECKING:
    import http.client

CHUNK = 1 << 20


@dataclass(frozen=True)
class UrlLimits:
    """How long one image URL's fetch may take in all (`--url-timeout`), and how many bytes its body may have
    (`--max-image-bytes`)."""

    timeout_s: float = DEFAULT_URL_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES


def is_http(value: object) -> bool:
    return storage.protocol_of(value) in ("http", "https")


@dataclass(frozen=True, eq=False)
class HttpFile(storage.RemoteFile):
    """An image URL, read in a loader worker (several at once: storage.fetched_ahead) within its limits."""

    limits: UrlLimits = field(default_factory=UrlLimits)

    def read(self) -> bytes:
        return fetch(self.url, self.limits)

    def open(self) -> BinaryIO:
        # Segmentation probes headers to group shapes: a URL is fetched once, whole, in the worker instead.
        raise storage.StoreReadError("an image URL is not probed")


class _Deadline:
    """A watchdog over one fetch: when its time is up it shuts every socket the fetch opened (a redirect opens
    another), so that a blocked connect, header or body read returns at once."""

    def __init__(self, seconds: float):
        self.seconds, self.expired, self.received = seconds, False, 0
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)

    def watching(self, kind: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        """kind (an http.client connection class) whose connections report their socket once connected."""
        def connection(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            made = kind(host, **kwargs)
            connect = made.connect

            def connected() -> None:
                connect()
                with self.lock:
                    self.sockets.append(made.sock)
                    if self.expired:
                        _shut(made.sock)
            made.connect = connected
            return made
        return connection

    def message(self) -> str:
        return (f"no whole answer within {self.seconds:g} s (--url-timeout; {human_bytes(self.received)} of the "
                "body had come)")


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


def _watched(base: type[urllib.request.AbstractHTTPHandler],
             deadline: _Deadline) -> urllib.request.AbstractHTTPHandler:
    class Watched(base):
        def do_open(self, http_class: type[http.client.HTTPConnection], request: urllib.request.Request,
                    **kwargs: Any) -> http.client.HTTPResponse:
            return super().do_open(deadline.watching(http_class), request, **kwargs)
    return Watched()


def fetch(url: str, limits: UrlLimits) -> bytes:
    """The body behind an http(s) URL, or StoreReadError saying why not (the server's status, a timeout, a cut
    body, a reset, a body over the cap)."""
    deadline = _Deadline(limits.timeout_s)
    opener = urllib.request.build_opener(_watched(urllib.request.HTTPHandler, deadline),
                                         _watched(urllib.request.HTTPSHandler, deadline))
    try:
        with deadline, opener.open(url, timeout=limits.timeout_s) as response:
            return _body(response, limits, deadline)
    except storage.StoreReadError:
        raise
    except urllib.error.HTTPError as exc:
        raise storage.StoreReadError(f"HTTP {exc.code} {exc.reason}") from None
    except Exception as exc:  # one URL, whatever went wrong (reset, refused, bad URL, TLS): this row's error
        if deadline.expired:
            raise storage.StoreReadError(deadline.message()) from None
        reason = getattr(exc, "reason", None) or exc
        raise storage.StoreReadError(f"{type(exc).__name__}: {reason}" if not isinstance(exc, OSError)
                                     else str(reason)) from None


def _body(response: http.client.HTTPResponse, limits: UrlLimits, deadline: _Deadline) -> bytes:
    """The body, read in chunks as they come (read1: what one socket read gives), up to the cap."""
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None and length.strip().isdigit() else None
    if length is not None and length > limits.max_bytes:
        raise storage.StoreReadError(f"the body is {human_bytes(length)}, over the {human_bytes(limits.max_bytes)}"
                                     " cap (--max-image-bytes): not read")
    chunks: list[bytes] = []
    while chunk := response.read1(CHUNK):
        deadline.received += len(chunk)
        if deadline.received > limits.max_bytes:
            raise storage.StoreReadError(f"the body is over the {human_bytes(limits.max_bytes)} cap "
                                         "(--max-image-bytes): not read further")
        chunks.append(chunk)
    if deadline.expired:
        raise storage.StoreReadError(deadline.message())
    if length is not None and deadline.received < length:
        raise storage.StoreReadError(f"the body ended after {deadline.received:,} of its {length:,} bytes "
                                     "(the connection closed early)")
    return b"".join(chunks)
