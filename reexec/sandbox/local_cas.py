"""The worker's local CAS cache, assembled from parts that each do one job:

    CacheIndex      cache_index.py     which entries are on disk; leases, busy files, eviction
    InputFetcher    input_fetcher.py   fetches missing inputs from the CAS (merged, batched)
    OutputAdopter   output_adopter.py  moves hashed outputs into the cache
    TamperChecker   tamper_checker.py  proves inputs intact after an action, drops broken ones
The index changes only on the Trio thread; the parts' worker threads do file-system work and
return what they did. Building an input root from the cache is `input_root.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.cas_access import CasAccess
from reexec.sandbox.input_fetcher import FetchStats, InputFetcher, MissingInputs
from reexec.sandbox.output_adopter import OutputAdopter
from reexec.sandbox.tamper_checker import TamperChecker

__all__ = ["Entry", "FetchStats", "LocalCas", "MissingInputs"]


class LocalCas:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int, access: CasAccess) -> None:
        self.access = access
        self.index = CacheIndex(root, max_bytes)
        self.fetcher = InputFetcher(self.index, access)
        self.adopter = OutputAdopter(self.index)
        self.tamper = TamperChecker(self.index, access)

    async def start(self) -> None:
        await self.index.start()

    @property
    def root(self) -> Path:
        return self.index.root

    @property
    def stats(self) -> FetchStats:
        return self.fetcher.stats

    def path(self, entry: Entry) -> Path:
        return self.index.path(entry)

    def path_str(self, entry: Entry) -> str:
        return self.index.path_str(entry)

    def lease(self, entries: Iterable[Entry]) -> AbstractContextManager[None]:
        return self.index.lease(entries)

    async def ensure(self, entries: Iterable[Entry]) -> None:
        await self.fetcher.ensure(entries)

    def stats_dict(self) -> dict[str, int]:
        return self.index.stats() | {
            "fetched_blobs": self.stats.fetched_blobs,
            "fetched_bytes": self.stats.fetched_bytes,
            "repaired": self.tamper.repaired,
        }
