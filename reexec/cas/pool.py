"""Bounded concurrency over a list without a task per item."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

T = TypeVar("T")

CHECKPOINT_EVERY = 32


async def for_each(
    items: Sequence[T], fn: Callable[[int, T], Awaitable[None]], concurrency: int
) -> None:
    """Await `fn(index, item)` for every item, at most `concurrency` at a time.

    Uses `concurrency` tasks that take the next item in turn, not one task per item: a single
    batch request may hold 100,000 entries. The first exception cancels the rest and is raised
    as itself (not wrapped in an ExceptionGroup), so callers and the gRPC edge can map a
    ReexecError or OSError to its status.

    Every CHECKPOINT_EVERY items give other tasks a turn: `fn` may never really suspend (a
    store reads small blobs inline), and 20,000 such reads would hold the event loop ~0.4 s.
    """
    pending = iter(enumerate(items))
    failures: list[Exception] = []

    async with trio.open_nursery() as nursery:

        async def worker() -> None:
            try:
                for i, item in pending:
                    if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                        await trio.lowlevel.checkpoint()
                    await fn(i, item)
            except Exception as e:
                failures.append(e)
                nursery.cancel_scope.cancel()

        for _ in range(min(concurrency, len(items))):
            nursery.start_soon(worker)
    if failures:
        raise failures[0]
