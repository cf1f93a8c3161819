"""The Action and Command bytes that Execute validation read, kept for the StartExecute.

Validation reads both blobs from the CAS; without this table the worker connection's sender
read them again a moment later to build the StartExecute (two more store reads per action, a
thread hop each on some stores, or remote calls with a `grpc` CAS). Validation puts them here
and the sender takes them out (`take`), so the common case reads each blob once.

What the table does not change: an entry is only a copy of what the CAS held when the Execute
was validated (blobs are content-addressed, so a copy is never stale); a miss (evicted from this
table, a retry after the entry was taken, an operation another scheduler validated) reads the
CAS as before. Bounded by entries and bytes, oldest dropped first; pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict

from reexec.cas.digest import Digest

# Enough for every action in flight at the throughputs measured here (a few thousand per
# second, each taken within milliseconds) while bounding what a flood of cache hits (validated,
# never dispatched) can pin.
MAX_ENTRIES = 4096
MAX_BYTES = 8 << 20
# Larger Actions or Commands (a few have very long argument lists) are read again instead.
MAX_ENTRY_BYTES = 256 << 10


class ActionBlobs:
    """Action digest -> (Action bytes, Command bytes), least recently put dropped first."""

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._entries: OrderedDict[Digest, tuple[bytes, bytes]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, digest: Digest, action: bytes, command: bytes) -> None:
        size = len(action) + len(command)
        if size > self.max_entry_bytes or self.max_entries <= 0:
            return
        old = self._entries.pop(digest, None)
        if old is not None:
            self._bytes -= len(old[0]) + len(old[1])
        self._entries[digest] = (action, command)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, (a, c) = self._entries.popitem(last=False)
            self._bytes -= len(a) + len(c)

    def take(self, digest: Digest) -> tuple[bytes, bytes] | None:
        """The entry for `digest`, removed; None if there is none."""
        entry = self._entries.pop(digest, None)
        if entry is None:
            self.misses += 1
            return None
        self._bytes -= len(entry[0]) + len(entry[1])
        self.hits += 1
        return entry
