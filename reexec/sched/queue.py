"""Platform queues: one priority queue per queue key. Pure bookkeeping.

Ordered by (priority, seq): lower priority values run sooner (REAPI), FIFO within a priority.
Removal is lazy: `discard` forgets a member and its heap entry is skipped when it surfaces.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from reexec.sched.matching import QueueKey


@dataclass(slots=True)
class _Queue:
    heap: list[tuple[int, int, str]] = field(default_factory=list)
    size: int = 0


class PlatformQueues:
    def __init__(self) -> None:
        self._queues: dict[QueueKey, _Queue] = {}
        # name -> (key, priority, seq): the one heap entry that is live for the name.
        self._members: dict[str, tuple[QueueKey, int, int]] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def push(self, key: QueueKey, priority: int, seq: int, name: str) -> None:
        self.discard(name)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue()
        heapq.heappush(q.heap, (priority, seq, name))
        q.size += 1
        self._members[name] = (key, priority, seq)

    def discard(self, name: str) -> bool:
        member = self._members.pop(name, None)
        if member is None:
            return False
        key = member[0]
        q = self._queues[key]
        q.size -= 1
        if q.size == 0:
            del self._queues[key]
        return True

    def head(self, key: QueueKey) -> tuple[int, int, str] | None:
        """The (priority, seq, name) to run next from this queue, dropping stale entries."""
        q = self._queues.get(key)
        if q is None:
            return None
        heap = q.heap
        while heap:
            entry = heap[0]
            member = self._members.get(entry[2])
            if member is not None and member == (key, entry[0], entry[1]):
                return entry
            heapq.heappop(heap)
        return None

    def pop(self, key: QueueKey) -> str | None:
        entry = self.head(key)
        if entry is None:
            return None
        heapq.heappop(self._queues[key].heap)
        self.discard(entry[2])
        return entry[2]

    def keys(self) -> Iterator[QueueKey]:
        return iter(list(self._queues))

    def depths(self) -> dict[QueueKey, int]:
        return {k: q.size for k, q in self._queues.items()}
