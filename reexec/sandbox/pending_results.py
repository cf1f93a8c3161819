"""Finished messages a worker holds while it has no scheduler to send them to.

Pure bookkeeping, oldest first, bounded by count and by serialized bytes: adding beyond either
bound drops the oldest results (the caller logs them). Keyed by (operation name, attempt), so
a result is held once and leaves the list only when the agent has sent it (`remove`).
"""

from __future__ import annotations

from dataclasses import dataclass

from reexec import fastpb

Attempt = tuple[str, int]


@dataclass
class _Held:
    message: fastpb.Message
    size: int


class PendingResults:
    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("the pending results bounds must be positive")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._held: dict[Attempt, _Held] = {}
        self.bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def keys(self) -> list[Attempt]:
        """The held attempts, oldest first."""
        return list(self._held)

    def add(self, key: Attempt, message: fastpb.Message) -> list[Attempt]:
        """Hold `message` (a WorkerMessage with `finished`); returns the attempts dropped to
        stay within the bounds, oldest first (possibly `key` itself, if it alone is larger
        than `max_bytes`). A result already held for `key` is replaced."""
        self.remove(key)
        held = _Held(message, message.ByteSize())
        self._held[key] = held
        self.bytes += held.size
        dropped = []
        while len(self._held) > self.max_count or self.bytes > self.max_bytes:
            oldest = next(iter(self._held))
            self.remove(oldest)
            self.dropped += 1
            dropped.append(oldest)
        return dropped

    def oldest(self) -> tuple[Attempt, fastpb.Message] | None:
        for key, held in self._held.items():
            return key, held.message
        return None

    def remove(self, key: Attempt) -> bool:
        held = self._held.pop(key, None)
        if held is None:
            return False
        self.bytes -= held.size
        return True
