"""What several processes serving one FilesystemStore share: a ledger of bytes, and its lock.

With `[server] processes = N`, N processes serve the same `blobs/` directory. Each keeps its own
in-memory LRU index (a cache of what exists, and in what order it was last used here); the
file system is the truth about which blobs exist, and this ledger is the truth about how many
bytes are stored and reserved, so the store's `max_bytes` holds across all of them.

    root/ledger   run id (16 bytes) | stored bytes | evictions | reserved bytes of slot 0..63

Every field is an int64 (little-endian). `flock(LOCK_EX)` on the ledger file is the store's
cross-process lock: it is held around every ledger update, every install of a blob into
`blobs/` and every eviction, so an evictor can never unlink a blob that another process has
just installed or re-used (see `FilesystemStore._evict_shared`).

Bytes are counted by the one process whose rename(2) installed a blob (under the lock, and
only if the blob is not there: a second installer of the same digest counts nothing) and
uncounted by the one whose unlink(2) removed it, so the count is exact. Each update is ordered so that a process killed between the
count and the file operation leaves the count too high, never too low: the bound still holds.

A process is one `slot` (0..N-1) of one supervisor `run`: the first process of a new run to
join resets the ledger from its scan of the directory; a process restarted into a slot clears
the reservations its dead predecessor left there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MAX_SLOTS = 64

_HEADER = struct.Struct("<16sqq")
_SLOT = struct.Struct("<q")
_SIZE = _HEADER.size + MAX_SLOTS * _SLOT.size


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among the N processes a supervisor runs (see daemon/supervisor.py)."""

    slot: int
    run_id: str

    SLOT_ENV = "REEXEC_PROCESS_SLOT"
    RUN_ENV = "REEXEC_PROCESS_RUN"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProcessShare | None:
        """The share the supervisor gave this process, or None when it runs alone."""
        env = os.environ if environ is None else environ
        slot, run = env.get(cls.SLOT_ENV), env.get(cls.RUN_ENV)
        if slot is None or not run:
            return None
        n = int(slot)
        if not 0 <= n < MAX_SLOTS:
            raise ValueError(f"{cls.SLOT_ENV}={slot} is outside 0..{MAX_SLOTS - 1}")
        return cls(n, run)

    def environment(self) -> dict[str, str]:
        return {self.SLOT_ENV: str(self.slot), self.RUN_ENV: self.run_id}


@dataclass(frozen=True)
class LedgerState:
    stored: int
    evictions: int
    reserved: tuple[int, ...]

    @property
    def reserved_total(self) -> int:
        return sum(self.reserved)


class Ledger:
    """The shared counters of one store. Every method but `try_lock`/`lock` expects the
    caller to hold the lock (the in-process `trio.Lock` too: flock is per open file, so two
    tasks of one process would both "hold" it)."""

    def __init__(self, path: str | os.PathLike[str], share: ProcessShare) -> None:
        self.path = Path(path)
        self.share = share
        self._run = share.run_id.encode()[:16].ljust(16, b"\0")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    # -- the lock -----------------------------------------------------------------------

    def try_lock(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def lock(self) -> None:
        """Blocks until held: call from a thread, never on the event loop."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- the counters (lock held) -------------------------------------------------------

    def read(self) -> LedgerState:
        data = os.pread(self._fd, _SIZE, 0).ljust(_SIZE, b"\0")
        _, stored, evictions = _HEADER.unpack_from(data)
        reserved = struct.unpack_from(f"<{MAX_SLOTS}q", data, _HEADER.size)
        return LedgerState(stored, evictions, reserved)

    def join(self, scanned_bytes: int) -> bool:
        """Join this run: the first joiner resets the ledger to `scanned_bytes` (returns True),
        later ones clear only their own slot's reservations (a restarted process's leftovers)."""
        run = os.pread(self._fd, 16, 0)
        if run != self._run:
            os.pwrite(
                self._fd, _HEADER.pack(self._run, scanned_bytes, 0) + bytes(_SIZE - _HEADER.size), 0
            )
            return True
        os.pwrite(self._fd, _SLOT.pack(0), self._slot_offset())
        return False

    def add_stored(self, delta: int) -> None:
        self._add(16, delta)

    def add_evictions(self, n: int) -> None:
        self._add(24, n)

    def add_reserved(self, delta: int) -> None:
        self._add(self._slot_offset(), delta)

    def _slot_offset(self) -> int:
        return _HEADER.size + self.share.slot * _SLOT.size

    def _add(self, offset: int, delta: int) -> None:
        (value,) = _SLOT.unpack(os.pread(self._fd, 8, offset).ljust(8, b"\0"))
        os.pwrite(self._fd, _SLOT.pack(value + delta), offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
