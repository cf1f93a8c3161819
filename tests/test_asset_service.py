"""Remote Asset API v1 (Fetch/Push) against an in-process daemon."""

from __future__ import annotations

import time

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.cas.asset_service import (
    AssetService,
    FetchBlobRequest,
    FetchDirectoryRequest,
    PushBlobRequest,
    PushDirectoryRequest,
)
from reexec.cas.digest import Digest, make_digest
from reexec.cas.memory import MemoryStore
from reexec.gen.build.bazel.remote.asset import v1 as ra
from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call
from tests.test_cas_service import sha, upload


@pytest.fixture
def fetch(channel):
    return ra.FetchStub(channel)


@pytest.fixture
def push(channel):
    return ra.PushStub(channel)


@pytest.fixture
def cas(channel):
    return re.ContentAddressableStorageStub(channel)


def _directory(files: dict[str, bytes], dirs: dict[str, re.Directory] | None = None) -> bytes:
    return bytes(
        re.Directory(
            files=[re.FileNode(name=n, digest=sha(b)) for n, b in sorted(files.items())],
            directories=[
                re.DirectoryNode(name=n, digest=sha(bytes(d)))
                for n, d in sorted((dirs or {}).items())
            ],
        )
    )


async def test_requests_without_uris_are_invalid_argument(fetch, push):
    # BuildStream's probe for the service.
    for rpc, request in (
        (fetch.fetch_blob, ra.FetchBlobRequest()),
        (fetch.fetch_directory, ra.FetchDirectoryRequest()),
        (push.push_blob, ra.PushBlobRequest(blob_digest=sha(b""))),
        (push.push_directory, ra.PushDirectoryRequest(root_directory_digest=sha(b""))),
    ):
        with pytest.raises(GRPCError) as e:
            await call(rpc, request)
        assert e.value.status is Status.INVALID_ARGUMENT, rpc


async def test_repeated_qualifier_name_is_invalid_argument(fetch):
    q = [ra.Qualifier(name="a", value="1"), ra.Qualifier(name="a", value="2")]
    with pytest.raises(GRPCError) as e:
        await call(fetch.fetch_blob, ra.FetchBlobRequest(uris=["urn:x"], qualifiers=q))
    assert e.value.status is Status.INVALID_ARGUMENT


async def test_unknown_asset_is_not_found_in_the_response(fetch):
    resp = await call(fetch.fetch_blob, ra.FetchBlobRequest(uris=["urn:nobody"]))
    assert resp.status.code == Status.NOT_FOUND.value
    assert resp.blob_digest is None


async def test_push_blob_then_fetch_by_any_uri_with_same_qualifiers(fetch, push, cas):
    await upload(cas, b"artifact proto", b"a file")
    q = [ra.Qualifier(name="resource_type", value="buildstream/artifact")]
    await call(
        push.push_blob,
        ra.PushBlobRequest(
            uris=["urn:one", "urn:two"],
            qualifiers=q,
            blob_digest=sha(b"artifact proto"),
            references_blobs=[sha(b"a file")],
        ),
    )
    for uri in ("urn:two", "urn:one"):
        resp = await call(
            fetch.fetch_blob, ra.FetchBlobRequest(uris=["urn:absent", uri], qualifiers=q)
        )
        assert resp.status is None or resp.status.code == 0
        assert resp.uri == uri
        assert resp.blob_digest == sha(b"artifact proto")
        assert resp.digest_function == re.DigestFunctionValue.SHA256
    # Qualifiers are part of the key.
    resp = await call(fetch.fetch_blob, ra.FetchBlobRequest(uris=["urn:one"]))
    assert resp.status.code == Status.NOT_FOUND.value
    # Blobs and directories are separate namespaces.
    resp = await call(
        fetch.fetch_directory, ra.FetchDirectoryRequest(uris=["urn:one"], qualifiers=q)
    )
    assert resp.status.code == Status.NOT_FOUND.value


async def test_push_with_missing_content_is_refused(push, cas):
    await upload(cas, b"present")
    with pytest.raises(GRPCError) as e:
        await call(
            push.push_blob,
            ra.PushBlobRequest(
                uris=["urn:x"], blob_digest=sha(b"present"), references_blobs=[sha(b"absent")]
            ),
        )
    assert e.value.status is Status.FAILED_PRECONDITION
    assert sha(b"absent").hash in e.value.message
    sub = re.Directory(files=[re.FileNode(name="f", digest=sha(b"never uploaded"))])
    root = _directory({}, {"sub": sub})
    await upload(cas, root, bytes(sub))
    with pytest.raises(GRPCError) as e:
        await call(
            push.push_directory,
            ra.PushDirectoryRequest(uris=["urn:d"], root_directory_digest=sha(root)),
        )
    assert e.value.status is Status.FAILED_PRECONDITION
    assert sha(b"never uploaded").hash in e.value.message


async def test_push_directory_then_fetch(fetch, push, cas):
    sub = re.Directory(files=[re.FileNode(name="f", digest=sha(b"deep file"))])
    root = _directory({"top": b"top file"}, {"sub": sub})
    await upload(cas, root, bytes(sub), b"deep file", b"top file")
    await call(
        push.push_directory,
        ra.PushDirectoryRequest(uris=["urn:src"], root_directory_digest=sha(root)),
    )
    resp = await call(fetch.fetch_directory, ra.FetchDirectoryRequest(uris=["urn:src"]))
    assert resp.root_directory_digest == sha(root)


async def test_asset_whose_blobs_were_evicted_is_not_found():
    """Real LRU eviction in a small MemoryStore, the service called directly."""
    store = MemoryStore(max_bytes=400)
    service = AssetService(store)
    sub = re.Directory(files=[re.FileNode(name="f", digest=sha(b"deep file"))])
    root = _directory({}, {"sub": sub})
    for data in (root, bytes(sub), b"deep file", b"blob", b"ref"):
        await store.put_bytes(_digest(sha(data)), data)
    await service.push_directory(
        PushDirectoryRequest(uris=["urn:tree"], root_directory_digest=_wire(sha(root)))
    )
    await service.push_blob(
        PushBlobRequest(
            uris=["urn:blob"],
            blob_digest=_wire(sha(b"blob")),
            references_blobs=[_wire(sha(b"ref"))],
        )
    )
    ok = await service.fetch_directory(FetchDirectoryRequest(uris=["urn:tree"]))
    assert ok.status.code == 0 and ok.root_directory_digest.hash == sha(root).hash
    # Keep the asset blobs themselves recent; the deep file and the reference age out.
    big = b"z" * (400 - len(root) - len(bytes(sub)) - len(b"blob"))
    await store.find_missing([_digest(sha(root)), _digest(sha(bytes(sub))), _digest(sha(b"blob"))])
    await store.put_bytes(_digest(sha(big)), big)
    assert await store.find_missing([_digest(sha(b"deep file")), _digest(sha(b"ref"))])
    assert not await store.find_missing([_digest(sha(root)), _digest(sha(b"blob"))])
    resp = await service.fetch_directory(FetchDirectoryRequest(uris=["urn:tree"]))
    assert resp.status.code == Status.NOT_FOUND.value
    resp = await service.fetch_blob(FetchBlobRequest(uris=["urn:blob"]))
    assert resp.status.code == Status.NOT_FOUND.value
    assert service.index.dropped_incomplete == 2
    # Re-uploading does not resurrect the dropped entries: the client must push again.
    await store.put_bytes(_digest(sha(b"ref")), b"ref")
    resp = await service.fetch_blob(FetchBlobRequest(uris=["urn:blob"]))
    assert resp.status.code == Status.NOT_FOUND.value


def _digest(d: re.Digest) -> Digest:
    return make_digest(d.hash, d.size_bytes)


def _wire(d: re.Digest):
    return fastpb.Digest(hash=d.hash, size_bytes=d.size_bytes)


async def test_expiry_and_oldest_content_accepted(fetch, push, cas):
    await upload(cas, b"soon gone", b"kept")
    now = time.time()
    await call(
        push.push_blob,
        ra.PushBlobRequest(
            uris=["urn:expired"],
            blob_digest=sha(b"soon gone"),
            expire_at=_ts(now - 1),
        ),
    )
    resp = await call(fetch.fetch_blob, ra.FetchBlobRequest(uris=["urn:expired"]))
    assert resp.status.code == Status.NOT_FOUND.value
    await call(
        push.push_blob,
        ra.PushBlobRequest(uris=["urn:kept"], blob_digest=sha(b"kept"), expire_at=_ts(now + 3600)),
    )
    resp = await call(fetch.fetch_blob, ra.FetchBlobRequest(uris=["urn:kept"]))
    assert resp.blob_digest == sha(b"kept")
    assert abs(resp.expires_at.timestamp() - (now + 3600)) < 1
    resp = await call(
        fetch.fetch_blob,
        ra.FetchBlobRequest(uris=["urn:kept"], oldest_content_accepted=_ts(now + 60)),
    )
    assert resp.status.code == Status.NOT_FOUND.value


def _ts(t: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC)


class _CountingStore(MemoryStore):
    """A MemoryStore that also reports "forgotten", so it counts every removal."""

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "forgotten": 0}


async def test_a_complete_tree_is_walked_again_only_after_a_removal():
    store = _CountingStore(max_bytes=400)
    service = AssetService(store)
    sub = re.Directory(files=[re.FileNode(name="f", digest=sha(b"deep file"))])
    root = _directory({}, {"sub": sub})
    for data in (root, bytes(sub), b"deep file"):
        await store.put_bytes(_digest(sha(data)), data)
    await service.push_directory(
        PushDirectoryRequest(uris=["urn:tree"], root_directory_digest=_wire(sha(root)))
    )
    fetch = FetchDirectoryRequest(uris=["urn:tree"])
    assert (await service.fetch_directory(fetch)).status.code == 0
    checks = service.completeness_checks
    assert (await service.fetch_directory(fetch)).status.code == 0
    assert service.completeness_checks == checks  # nothing left the CAS: no walk
    big = b"z" * (400 - len(root) - len(bytes(sub)))
    await store.find_missing([_digest(sha(root)), _digest(sha(bytes(sub)))])
    await store.put_bytes(_digest(sha(big)), big)  # evicts the deep file
    resp = await service.fetch_directory(fetch)
    assert resp.status.code == Status.NOT_FOUND.value
    assert service.completeness_checks == checks + 1
