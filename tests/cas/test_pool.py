"""reexec.cas.pool.for_each: bounded concurrency with a fixed number of tasks."""

from __future__ import annotations

import pytest
import trio

from reexec.cas.pool import for_each


async def test_every_item_once_and_at_most_n_at_a_time():
    running = peak = 0
    seen: list[int] = []

    async def one(i: int, item: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.001)
        seen.append(i)
        assert item == f"x{i}"
        running -= 1

    await for_each([f"x{i}" for i in range(100)], one, 7)
    assert sorted(seen) == list(range(100))
    assert peak == 7


async def test_tasks_do_not_grow_with_the_items():
    tasks = set()

    async def one(i: int, item: int) -> None:
        tasks.add(id(trio.lowlevel.current_task()))
        await trio.lowlevel.checkpoint()

    await for_each(range(10_000), one, 4)
    assert len(tasks) == 4


async def test_first_error_propagates_unwrapped():
    async def one(i: int, item: int) -> None:
        if i == 3:
            raise ValueError("bad item")
        await trio.sleep(0.01)

    with pytest.raises(ValueError, match="bad item"):
        await for_each(range(10), one, 2)


async def test_empty():
    async def one(i: int, item: int) -> None:
        raise AssertionError

    await for_each([], one, 3)


async def test_gives_other_tasks_a_turn_even_if_fn_never_suspends():
    from reexec.cas.pool import CHECKPOINT_EVERY

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async def one(i: int, item: int) -> None:
        pass  # like a store reading a small blob inline: no suspension point

    workers = 16
    n = 100 * workers * CHECKPOINT_EVERY
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        await for_each(range(n), one, workers)
        during = ticks - before
        nursery.cancel_scope.cancel()
    # One scheduling round per workers x CHECKPOINT_EVERY items: ~100 turns (none without).
    assert during >= 50
