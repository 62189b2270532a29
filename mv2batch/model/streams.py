"""Parallel streams on the CPU: micro-batches side by side on threads that each run their share of the cores.

speed.use_micro_batches runs a model's micro-batches on a pool made here; the batch loop starts whole batches'
parts on it and keeps one piece of work ahead (one_ahead), so that no stream idles while the slowest finishes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")
R = TypeVar("R")

_STREAM_THREAD = threading.local()  # .active is set in the stream threads: they never wait on their own pool


def stream_pool(streams: int) -> ThreadPoolExecutor:
    """Threads that each run torch ops with their share of the intra-op threads (OpenMP settings are per thread).

    torch.set_num_threads also sets the default for threads created later, so the caller's value is put back
    once every stream thread has taken its own.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    total = torch.get_num_threads()
    per_stream = max(1, total // streams)
    started = threading.Barrier(streams + 1)

    def start() -> None:
        torch.set_num_threads(per_stream)
        # ATen sets a thread's OpenMP team size lazily, at its first parallel op, from the process-wide value,
        # which the caller puts back below: without this first call each stream would run a team of `total`.
        torch.get_num_threads()
        _STREAM_THREAD.active = True
        started.wait()

    pool = ThreadPoolExecutor(streams, thread_name_prefix="mv2batch-stream", initializer=start)
    for _ in range(streams):
        pool.submit(lambda: None)
    started.wait()
    torch.set_num_threads(total)
    return pool


def start_in_streams(pool: ThreadPoolExecutor | None, function: Callable[[T], R], items: list[T]
                     ) -> Callable[[], list[R]]:
    """Start [function(item) for item in items] side by side on the pool and return at once; calling the result
    waits for the list (and raises the work's errors).

    Without a pool (None), or from inside one of its own threads, the work is done here, before returning.
    See one_ahead for starting the next piece of work before collecting this one.
    """
    if pool is None or not items or getattr(_STREAM_THREAD, "active", False):
        results = [function(item) for item in items]
        return lambda: results
    pending = pool.map(in_callers_mode(function), items)  # every item is submitted now
    return lambda: list(pending)


def one_ahead(started: Iterable[T], ahead: bool) -> Iterator[T]:
    """Pass on started work in order, each piece only once the next one has been started, where the work goes on
    in the background (ahead: on parallel streams, so that no stream idles while the slowest finishes a piece;
    or queued on a GPU, which computes the next batch while this one's results are read and written).
    Otherwise a started piece is already done and is passed on at once, so that its results (and a progress
    update) are not held back a piece.
    """
    pending: list[T] = []
    for piece in started:
        pending.append(piece)
        if not ahead or len(pending) > 1:
            yield pending.pop(0)
    yield from pending


def in_callers_mode(function: Callable[[T], R]) -> Callable[[T], R]:
    """function wrapped in the calling thread's grad / inference mode, which other threads do not inherit."""
    import torch

    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(item: T) -> R:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(item)

    return call
