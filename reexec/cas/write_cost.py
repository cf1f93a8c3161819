"""When a small blob's file is cheap enough to write on the event loop.

Writing a 4 KiB blob (create, write, rename) costs ~40 us of kernel time on tmpfs and 0.1-1.2 ms
on some VM disks (bench/RESULTS.md). Done on the event loop, the slow case stalls every other
request for that long; in a worker thread it costs the loop only the hop (~100 us) and another
core does the file system's work. Which one wins depends on the disk and changes with its load,
so the store measures every small write, wherever it ran, and asks this before each one.
"""

from __future__ import annotations

# Inline while the recent average write takes less than this.
INLINE_LIMIT_S = 200e-6
# Weight of each new measurement in the moving average (about the last 20 writes count).
WEIGHT = 0.05


class WriteCost:
    def __init__(self, limit_s: float = INLINE_LIMIT_S, weight: float = WEIGHT) -> None:
        self.limit_s = limit_s
        self.weight = weight
        self.average_s = 0.0

    def note(self, seconds: float) -> None:
        """Record how long one small write took."""
        self.average_s += self.weight * (seconds - self.average_s)

    def inline(self) -> bool:
        """Whether the next small write should run on the event loop."""
        return self.average_s < self.limit_s
