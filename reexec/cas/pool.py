"""Bounded concurrency over a list without a task per item."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

T = TypeVar("T")

# Each worker gives other tasks a turn after this many items. Trio runs every runnable worker
# once per scheduling round, so a round holds up to `concurrency` x this many items (16 x 8).
CHECKPOINT_EVERY = 8


async def for_each(
    items: Sequence[T], fn: Callable[[int, T], Awaitable[None]], concurrency: int
) -> None:
    """Await `fn(index, item)` for every item, at most `concurrency` at a time.

    Uses `concurrency` tasks that take the next item in turn, not one task per item: a single
    batch request may hold 100,000 entries. The first exception cancels the rest and is raised
    as itself (not wrapped in an ExceptionGroup), so callers and the gRPC edge can map a
    ReexecError or OSError to its status.

    Each worker gives other tasks a turn every CHECKPOINT_EVERY items: `fn` may never really
    suspend (a store reads small blobs inline), and 20,000 such reads would hold the event loop
    ~0.4 s.
    """
    pending = iter(enumerate(items))
    failures: list[Exception] = []

    async with trio.open_nursery() as nursery:

        async def worker() -> None:
            try:
                done = 0
                for i, item in pending:
                    await fn(i, item)
                    done += 1
                    if done % CHECKPOINT_EVERY == 0:
                        await trio.lowlevel.checkpoint()
            except Exception as e:
                failures.append(e)
                nursery.cancel_scope.cancel()

        for _ in range(min(concurrency, len(items))):
            nursery.start_soon(worker)
    if failures:
        raise failures[0]
