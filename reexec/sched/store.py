"""OperationStore: the one place operation records live, written with a version check.

In memory, owned by one scheduler process, and only touched from its Trio thread; the scheduler
never awaits between a `get` and the `compare_and_set` that follows, so today the version check
cannot fail (a failure is a bug). The interface (get / create / compare_and_set / delete, plus
change notification) is the one a store shared by several schedulers has to offer; only then
does the compare-and-set become a real one that can lose a race and be retried. The queues,
worker slots and timers are not in the store: they are the owning process's indexes.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio

from reexec.sched.state import Operation, Stage


class OperationStore:
    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}
        # Dedup index: action key -> name of the live (not completed) operation for it.
        self._live_by_key: dict[tuple[str, str, int, int], str] = {}
        self._changed: dict[str, trio.Event] = {}
        self._live = 0  # records not yet COMPLETED

    @property
    def live(self) -> int:
        """How many operations are not completed (in cache check, queued or executing)."""
        return self._live

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Operation]:
        return iter(list(self._ops.values()))

    def get(self, name: str) -> Operation | None:
        return self._ops.get(name)

    def live_for(self, key: tuple[str, str, int, int]) -> Operation | None:
        name = self._live_by_key.get(key)
        return self._ops.get(name) if name else None

    def create(self, op: Operation, *, mergeable: bool) -> bool:
        """Insert a new record; with `mergeable`, index it for in-flight deduplication."""
        if op.name in self._ops:
            return False
        self._ops[op.name] = op
        self._live += not op.done
        if mergeable and op.action_key not in self._live_by_key:
            self._live_by_key[op.action_key] = op.name
        self._notify(op.name)
        return True

    def compare_and_set(self, expected: Operation, new: Operation) -> bool:
        """Replace `expected` by `new` iff the stored version is still `expected.version`."""
        current = self._ops.get(expected.name)
        if current is None or current.version != expected.version:
            return False
        self._ops[new.name] = new
        self._live += int(not new.done) - int(not current.done)
        if new.stage is Stage.COMPLETED and self._live_by_key.get(new.action_key) == new.name:
            del self._live_by_key[new.action_key]
        self._notify(new.name)
        return True

    def delete(self, op: Operation) -> bool:
        current = self._ops.get(op.name)
        if current is None or current.version != op.version:
            return False
        del self._ops[op.name]
        self._live -= not current.done
        if self._live_by_key.get(op.action_key) == op.name:
            del self._live_by_key[op.action_key]
        self._notify(op.name)
        self._changed.pop(op.name, None)
        return True

    def _notify(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()

    async def wait_changed(self, op: Operation) -> Operation | None:
        """Wait until the record moves past `op.version`; None if it was deleted."""
        current = self._ops.get(op.name)
        while current is not None and current.version == op.version:
            event = self._changed.get(op.name)
            if event is None:
                event = self._changed[op.name] = trio.Event()
            await event.wait()
            current = self._ops.get(op.name)
        return current
