"""VerifyingStore: the Store contract, and nothing reaches the inner store on a mismatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from reexec.cas.digest import Digest, DigestFunction, digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.memory import MemoryStore
from reexec.cas.store import Store
from reexec.cas.verify import INLINE_HASH_LIMIT, VerifyingStore
from reexec.errors import InvalidArgument
from tests.cas.store_contract import ALL_FUNCTIONS, StoreContract, blob


class TestVerifyOverMemoryContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        return VerifyingStore(MemoryStore(0))


class TestVerifyOverFilesystemContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        fs = FilesystemStore(tmp_path / "cas", 0)
        await fs.start()
        return VerifyingStore(fs)

    async def inspect(self, store: Store, digest: Digest) -> bool:
        assert isinstance(store, VerifyingStore)
        inner = store.inner
        assert isinstance(inner, FilesystemStore)
        assert list((inner.root / "tmp").iterdir()) == []
        return inner.blob_path(digest).exists()


@pytest.fixture(params=["memory", "filesystem"])
async def verifying(request: pytest.FixtureRequest, tmp_path: Path) -> VerifyingStore:
    if request.param == "memory":
        return VerifyingStore(MemoryStore(0))
    fs = FilesystemStore(tmp_path / "cas", 0)
    await fs.start()
    return VerifyingStore(fs)


async def assert_inner_empty(store: VerifyingStore, *digests: Digest) -> None:
    assert await store.inner.find_missing(list(digests)) == list(digests)
    assert store.inner.stats().get("blobs", 0) == 0
    if isinstance(store.inner, FilesystemStore):
        root = store.inner.root
        assert list((root / "tmp").iterdir()) == []
        assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []


def wrong_digest(data: bytes, fn: DigestFunction) -> Digest:
    """A well-formed digest of the right size and function but for other content."""
    return Digest(digest_of(b"not " + data, fn).hash, len(data), fn)


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
@pytest.mark.parametrize("n", [10, INLINE_HASH_LIMIT + 1])  # inline and threaded hashing
async def test_put_bytes_hash_mismatch(
    verifying: VerifyingStore, fn: DigestFunction, n: int
) -> None:
    data = blob(n, 4)
    bad = wrong_digest(data, fn)
    with pytest.raises(InvalidArgument) as e:
        await verifying.put_bytes(bad, data)
    assert f"hash mismatch for {bad.blob_path}" in e.value.message
    assert f"the data's {fn.name} is {digest_of(data, fn).hash}" in e.value.message
    await assert_inner_empty(verifying, bad, digest_of(data, fn))


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
async def test_streaming_hash_mismatch(verifying: VerifyingStore, fn: DigestFunction) -> None:
    data = blob(200_000, 5)
    bad = wrong_digest(data, fn)
    writer = await verifying.open_write(bad)
    for i in range(0, len(data), 70_000):
        await writer.write(data[i : i + 70_000])
    assert writer.committed_size == len(data)
    with pytest.raises(InvalidArgument, match="hash mismatch"):
        await writer.commit()
    await writer.abort()  # what callers do after any failure; must be harmless
    await assert_inner_empty(verifying, bad, digest_of(data, fn))


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
async def test_correct_data_accepted_for_every_function(
    verifying: VerifyingStore, fn: DigestFunction
) -> None:
    data = blob(1000, 6)
    d = digest_of(data, fn)
    await verifying.put_bytes(d, data)
    streamed = blob(1001, 7)
    ds = digest_of(streamed, fn)
    writer = await verifying.open_write(ds)
    await writer.write(streamed[:500])
    await writer.write(streamed[500:])
    await writer.commit()
    assert await verifying.inner.get_bytes(d) == data
    assert await verifying.inner.get_bytes(ds) == streamed


async def test_size_mismatch(verifying: VerifyingStore) -> None:
    data = blob(100)
    d = digest_of(data)
    with pytest.raises(InvalidArgument, match=r"size mismatch .* got 99 bytes"):
        await verifying.put_bytes(d, data[:99])
    writer = await verifying.open_write(d)
    with pytest.raises(InvalidArgument, match="more than 100 bytes"):
        await writer.write(data + b"!")
    await writer.write(data[:50])
    with pytest.raises(InvalidArgument, match="got 50 bytes"):
        await writer.commit()
    await writer.abort()
    await assert_inner_empty(verifying, d)


async def test_empty_blob_with_wrong_hash_is_rejected(verifying: VerifyingStore) -> None:
    bad = Digest("0" * 64, 0)
    with pytest.raises(InvalidArgument, match="hash mismatch"):
        await verifying.put_bytes(bad, b"")
