"""OutputAdopter: moving hashed outputs into the worker cache."""

from __future__ import annotations

from pathlib import Path

from reexec.sandbox.cache_index import CacheIndex, Entry
from reexec.sandbox.input_fetcher import InputFetcher
from reexec.sandbox.output_adopter import OutputAdopter
from tests.sandbox.fakes import FakeAccess, inode, overwrite


async def open_index(root: Path, max_bytes: int = 0) -> CacheIndex:
    index = CacheIndex(root, max_bytes)
    await index.start()
    return index


# -- OutputAdopter ------------------------------------------------------------------------------


async def test_adopter_replaces_a_tampered_entry_and_keeps_an_identical_one(
    tmp_path: Path,
) -> None:
    """Issue 9 item 8: an existing cache file used to be reused as the upload source unchecked."""
    access = FakeAccess()
    index = await open_index(tmp_path / "cache")
    e = Entry(access.put(b"the output"), False)
    await InputFetcher(index, access).ensure([e])
    adopter = OutputAdopter(index)
    kept = inode(index.path(e))

    out = tmp_path / "out"
    out.write_bytes(b"the output")
    adopted = adopter.adopt_sync(out, e)
    assert inode(index.path(e)) == kept and not out.exists()  # proven identical: kept

    overwrite(index.path(e), b"THE OUTPUT")  # an action rewrote the cached copy
    out.write_bytes(b"the output")
    fresh = inode(out)
    adopted = adopter.adopt_sync(out, e)
    assert inode(index.path(e)) == fresh
    assert index.path(e).read_bytes() == b"the output"
    await adopter.register([adopted])
    assert index.recorded_mtime(e) == adopted.mtime_ns
