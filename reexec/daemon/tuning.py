"""Process-wide tuning measured to matter (bench/RESULTS.md, "Where the time goes")."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep glibc from mmap/munmap-ing every 1 MiB buffer.

    ByteStream moves data in 1 MiB objects; above glibc's (dynamic) mmap threshold each one is a
    fresh mapping, returned to the kernel on free: ~1,000 page faults per MiB. Raising the mmap
    and trim thresholds made 256 MiB reads 3x faster. Both are needed; either alone was slower.
    Other libcs: nothing happens.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    )


def quiet_frame_repr() -> None:
    """Stop h2 from hex-dumping every received DATA frame.

    h2 formats `repr(frame)` for a trace log on every frame even when nothing logs it, and
    hyperframe's DataFrame repr hexlifies the whole body first: a 32 KiB string per 16 KiB frame.
    """
    try:
        import hyperframe.frame as hf
    except ImportError:
        return
    hf.DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"  # type: ignore[method-assign]


# The cycle collector's generation-0 threshold (CPython's default: 700 allocations). A server
# request can allocate tens of thousands of objects (a 10,000-digest FindMissingBlobs builds two
# Digest records each): at 700 every request is interrupted by dozens of young collections whose
# survivors - the request's own live objects - are promoted until a full collection runs over
# the whole heap (every Digest the CAS index holds). That made every fifth such request take
# 2.5x as long (bench/RESULTS.md). Nothing here relies on prompt cycle collection.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_objects() -> None:
    """Move everything allocated so far (modules, classes, a CAS index read at start-up) out of
    the collector's view: full collections then scan only what the process allocated since.
    Called once the daemon is ready; frozen objects still die by reference counting."""
    gc.collect()
    gc.freeze()


def apply() -> None:
    tuned = tune_malloc()
    tune_gc()
    quiet_frame_repr()
    log.debug("malloc thresholds %s", "raised" if tuned else "unchanged (not glibc)")
