"""InputFetcher: fetching inputs into the worker cache (more in test_local_cas.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from reexec.cas.digest import Digest
from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.input_fetcher import InputFetcher, MissingInputs
from tests.sandbox.fakes import FakeAccess


async def open_index(root: Path, max_bytes: int = 0) -> CacheIndex:
    index = CacheIndex(root, max_bytes)
    await index.start()
    return index


# -- InputFetcher -------------------------------------------------------------------------------


async def test_batch_read_finding_a_blob_gone_falls_back_and_reports_it(tmp_path: Path) -> None:
    class Evicting(FakeAccess):
        async def read_small(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
            self.blobs.pop(gone, None)  # evicted between FindMissingBlobs and the read
            return await super().read_small(digests)

    access = Evicting(prefers_batches=True)
    here = access.put(b"here")
    gone = access.put(b"gone")
    index = await open_index(tmp_path / "cache")
    with pytest.raises(MissingInputs) as info:
        await InputFetcher(index, access).ensure([Entry(here, False), Entry(gone, False)])
    assert info.value.missing == [gone]
    assert index.has(Entry(here, False))
    assert list(index.tmp.iterdir()) == []
