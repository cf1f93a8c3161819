"""A byte-bounded LRU index with pinning, shared by the stores.

Pure bookkeeping: it never touches data. Stores call `add`/`touch` and delete whatever
`take_evictions` returns. Pinned keys (blobs being read, or held by an in-flight action) are
never returned for eviction; a key may be pinned before it is added, so a blob an action is
about to write is protected from the moment it lands. Reserved bytes (uploads in progress) count
against `max_bytes` like stored ones, so partial uploads cannot overfill the store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LruIndex(Generic[K]):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self.reserved_bytes = 0
        self.evictions = 0
        self._sizes: OrderedDict[K, int] = OrderedDict()
        self._pins: dict[K, int] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def touch(self, key: K) -> bool:
        """Mark `key` most recently used. Returns whether it is present."""
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return True
        return False

    def touch_missing(self, keys: Iterable[K]) -> list[K]:
        """`touch` each of `keys`; returns those absent, in order, without duplicates.

        The bulk form of `touch` (FindMissingBlobs asks about thousands at once): one pass in a
        comprehension instead of a method call per key, duplicates removed among the absent
        ones only."""
        sizes = self._sizes
        move = sizes.move_to_end  # returns None: a present key is touched and left out
        absent = [k for k in keys if k not in sizes or move(k)]
        return list(dict.fromkeys(absent)) if absent else absent

    def size_of(self, key: K) -> int | None:
        return self._sizes.get(key)

    def add(self, key: K, size: int) -> bool:
        """Record `key` as most recently used. Returns False if it was already present."""
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return False
        self._sizes[key] = size
        self.total_bytes += size
        return True

    def remove(self, key: K) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total_bytes -= size
        return size

    def pin(self, key: K) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: K) -> None:
        n = self._pins[key] - 1
        if n:
            self._pins[key] = n
        else:
            del self._pins[key]

    @contextmanager
    def pinned(self, keys: Iterable[K]) -> Iterator[None]:
        """Pin each of `keys` (once, duplicates ignored) for the duration of the context."""
        held = list(dict.fromkeys(keys))
        for key in held:
            self.pin(key)
        try:
            yield
        finally:
            for key in held:
                self.unpin(key)

    def is_pinned(self, key: K) -> bool:
        return key in self._pins

    def try_reserve(self, size: int) -> bool:
        """Count `size` bytes of an upload in progress against `max_bytes`.

        False (nothing reserved) if uploads in progress already hold so much that `size` more
        could not fit even in an empty store. The caller evicts with `take_evictions` after a
        successful reservation and must `release` exactly once.
        """
        if self.max_bytes > 0 and self.reserved_bytes + size > self.max_bytes:
            return False
        self.reserved_bytes += size
        return True

    def release(self, size: int) -> None:
        self.reserved_bytes -= size

    def over_capacity(self, incoming: int = 0) -> bool:
        """Whether `take_evictions(incoming)` would have anything to do."""
        used = self.total_bytes + self.reserved_bytes + incoming
        return self.max_bytes > 0 and used > self.max_bytes

    def take_evictions(self, incoming: int = 0) -> list[K]:
        """Remove and return least recently used unpinned keys until `incoming` more bytes fit
        beside the stored and reserved ones."""
        extra = incoming + self.reserved_bytes
        if self.max_bytes <= 0 or self.total_bytes + extra <= self.max_bytes:
            return []
        victims: list[K] = []
        skipped: list[K] = []
        while self.total_bytes + extra > self.max_bytes and self._sizes:
            key, size = self._sizes.popitem(last=False)
            if key in self._pins:
                skipped.append(key)
                self._sizes[key] = size  # goes to the MRU end; restored below
                if len(skipped) >= len(self._sizes):
                    break
                continue
            self.total_bytes -= size
            victims.append(key)
        for key in reversed(skipped):
            self._sizes.move_to_end(key, last=False)
        self.evictions += len(victims)
        return victims

    def take_oldest(self, nbytes: int, max_keys: int) -> list[tuple[K, int]]:
        """Remove and return the least recently used unpinned keys with their sizes, until
        they add up to `nbytes` or `max_keys` are taken.

        For a caller that decides per key whether it really goes (a store shared by several
        processes, which checks each file first): a key it keeps goes back with `add`, now
        the most recently used. Not counted as evictions; the caller counts what it removed.
        """
        keys: list[K] = []
        found = 0
        for key, size in self._sizes.items():  # from the oldest; stops early, no copy
            if found >= nbytes or len(keys) >= max_keys:
                break
            if key not in self._pins:
                keys.append(key)
                found += size
        taken = [(key, self._sizes.pop(key)) for key in keys]
        self.total_bytes -= sum(size for _, size in taken)
        return taken

    def replace(self, entries: Iterable[tuple[K, int]]) -> None:
        """Forget every key and record `entries`, oldest first (pins and reservations stay)."""
        self._sizes = OrderedDict(entries)
        self.total_bytes = sum(self._sizes.values())

    def keys_oldest_first(self) -> list[K]:
        return list(self._sizes)
