"""ContentAddressableStorage RPCs against an in-process daemon: success and error paths."""

from __future__ import annotations

import hashlib

import blake3
import pytest
import zstandard
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call, collect


def sha(data: bytes) -> re.Digest:
    return re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def b3(data: bytes) -> re.Digest:
    return re.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))


EMPTY = sha(b"")


async def upload(stub: re.ContentAddressableStorageStub, *blobs: bytes, fn: int = 0) -> None:
    make = b3 if fn == re.DigestFunctionValue.BLAKE3 else sha
    resp = await call(
        stub.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[re.BatchUpdateBlobsRequestRequest(digest=make(b), data=b) for b in blobs],
            digest_function=re.DigestFunctionValue(fn),
        ),
    )
    assert all(r.status is None or r.status.code == 0 for r in resp.responses), resp


@pytest.fixture
def cas(channel):
    return re.ContentAddressableStorageStub(channel)


async def test_find_missing_reports_only_absent_blobs(cas):
    await upload(cas, b"present")
    req = re.FindMissingBlobsRequest(
        blob_digests=[sha(b"present"), sha(b"absent"), EMPTY, sha(b"absent")]
    )
    resp = await call(cas.find_missing_blobs, req)
    assert [d.hash for d in resp.missing_blob_digests] == [sha(b"absent").hash]


async def test_find_missing_many_digests(cas):
    blobs = [str(i).encode() for i in range(3000)]
    await upload(cas, *blobs[:1500])
    resp = await call(
        cas.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=[sha(b) for b in blobs])
    )
    assert {d.hash for d in resp.missing_blob_digests} == {sha(b).hash for b in blobs[1500:]}


@pytest.mark.parametrize(
    ("digest", "fragment"),
    [
        (re.Digest(hash="xyz", size_bytes=1), "cannot infer the digest function"),
        (re.Digest(hash="A" * 64, size_bytes=1), "lowercase hex"),
        (re.Digest(hash="a" * 64, size_bytes=-1), "negative"),
    ],
)
async def test_find_missing_rejects_malformed_digests(cas, digest, fragment):
    with pytest.raises(GRPCError) as e:
        await call(cas.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=[digest]))
    assert e.value.status is Status.INVALID_ARGUMENT
    assert fragment in e.value.message


async def test_unknown_digest_function_is_invalid_argument(cas):
    req = re.FindMissingBlobsRequest(
        blob_digests=[sha(b"x")], digest_function=re.DigestFunctionValue.MD5
    )
    with pytest.raises(GRPCError) as e:
        await call(cas.find_missing_blobs, req)
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "MD5 is not supported" in e.value.message


async def test_digest_functions_never_collide(cas):
    data = b"same bytes, two functions"
    await upload(cas, data, fn=re.DigestFunctionValue.BLAKE3)
    # A SHA256 digest whose hash equals the BLAKE3 hash must not find the BLAKE3 blob.
    fake = re.Digest(hash=b3(data).hash, size_bytes=len(data))
    resp = await call(cas.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=[fake]))
    assert len(resp.missing_blob_digests) == 1
    resp = await call(
        cas.find_missing_blobs,
        re.FindMissingBlobsRequest(
            blob_digests=[b3(data)], digest_function=re.DigestFunctionValue.BLAKE3
        ),
    )
    assert resp.missing_blob_digests == []


@pytest.mark.parametrize("fn", ["SHA1", "SHA384", "SHA512"])
async def test_other_sha_functions_inferred_from_length(cas, fn):
    data = b"hello " + fn.encode()
    h = hashlib.new(fn.lower(), data).hexdigest()
    d = re.Digest(hash=h, size_bytes=len(data))
    resp = await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[re.BatchUpdateBlobsRequestRequest(digest=d, data=data)]
        ),
    )
    assert resp.responses[0].status.code == 0
    got = await call(cas.batch_read_blobs, re.BatchReadBlobsRequest(digests=[d]))
    assert got.responses[0].data == data


async def test_batch_update_per_blob_statuses(cas):
    good = b"good"
    bad_hash = re.Digest(hash=hashlib.sha256(b"other").hexdigest(), size_bytes=4)
    resp = await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[
                re.BatchUpdateBlobsRequestRequest(digest=sha(good), data=good),
                re.BatchUpdateBlobsRequestRequest(digest=bad_hash, data=b"nope"),
                re.BatchUpdateBlobsRequestRequest(
                    digest=re.Digest(hash=sha(good).hash, size_bytes=99), data=good
                ),
            ]
        ),
    )
    codes = [(r.status.code if r.status else 0) for r in resp.responses]
    assert codes == [0, Status.INVALID_ARGUMENT.value, Status.INVALID_ARGUMENT.value]
    assert "hash mismatch" in resp.responses[1].status.message
    missing = await call(
        cas.find_missing_blobs, re.FindMissingBlobsRequest(blob_digests=[sha(good), bad_hash])
    )
    assert [d.hash for d in missing.missing_blob_digests] == [bad_hash.hash]


async def test_batch_update_zstd(cas):
    data = b"compress me " * 100
    resp = await call(
        cas.batch_update_blobs,
        re.BatchUpdateBlobsRequest(
            requests=[
                re.BatchUpdateBlobsRequestRequest(
                    digest=sha(data),
                    data=zstandard.ZstdCompressor().compress(data),
                    compressor=re.CompressorValue.ZSTD,
                )
            ]
        ),
    )
    assert resp.responses[0].status is None or resp.responses[0].status.code == 0
    got = await call(cas.batch_read_blobs, re.BatchReadBlobsRequest(digests=[sha(data)]))
    assert got.responses[0].data == data


async def test_batch_over_limit(cas):
    big = b"x" * (4032 * 1024 + 1)
    with pytest.raises(GRPCError) as e:
        await call(
            cas.batch_update_blobs,
            re.BatchUpdateBlobsRequest(
                requests=[re.BatchUpdateBlobsRequestRequest(digest=sha(big), data=big)]
            ),
        )
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "max_batch_total_size_bytes" in e.value.message
    with pytest.raises(GRPCError) as e:
        await call(cas.batch_read_blobs, re.BatchReadBlobsRequest(digests=[sha(big)]))
    assert e.value.status is Status.INVALID_ARGUMENT


async def test_batch_read_per_blob_statuses(cas):
    await upload(cas, b"one")
    resp = await call(
        cas.batch_read_blobs,
        re.BatchReadBlobsRequest(digests=[sha(b"one"), sha(b"missing"), EMPTY]),
    )
    assert resp.responses[0].data == b"one"
    assert resp.responses[1].status.code == Status.NOT_FOUND.value
    assert resp.responses[2].status is None or resp.responses[2].status.code == 0
    assert resp.responses[2].data == b""


def directory(files: dict[str, bytes] = {}, dirs: dict[str, re.Directory] = {}) -> re.Directory:  # noqa: B006
    return re.Directory(
        files=[re.FileNode(name=n, digest=sha(d)) for n, d in sorted(files.items())],
        directories=[
            re.DirectoryNode(name=n, digest=sha(bytes(d))) for n, d in sorted(dirs.items())
        ],
    )


async def test_get_tree_pages_and_tokens(cas):
    leaves = {f"d{i}": directory({f"f{i}": f"content {i}".encode()}) for i in range(5)}
    shared = directory({"same": b"same"})
    mid = directory(dirs={"x": shared, "y": shared})
    root = directory(dirs={**leaves, "mid": mid})
    await upload(cas, *(bytes(d) for d in [*leaves.values(), shared, mid, root]))

    pages = await collect(
        cas.get_tree, re.GetTreeRequest(root_digest=sha(bytes(root)), page_size=3)
    )
    dirs = [d for p in pages for d in p.directories]
    # root, 6 children (shared subtree listed once), then `shared`
    assert len(dirs) == 1 + 6 + 1
    assert bytes(dirs[0]) == bytes(root)
    assert [len(p.directories) for p in pages] == [3, 3, 2]
    assert pages[-1].next_page_token == ""
    token = pages[0].next_page_token
    resumed = await collect(
        cas.get_tree,
        re.GetTreeRequest(root_digest=sha(bytes(root)), page_size=3, page_token=token),
    )
    assert [bytes(d) for p in resumed for d in p.directories] == [bytes(d) for d in dirs[3:]]


async def test_get_tree_missing_subtree_is_omitted_missing_root_is_not_found(cas):
    absent = directory({"gone": b"gone"})
    root = directory(dirs={"a": absent})
    await upload(cas, bytes(root))
    pages = await collect(cas.get_tree, re.GetTreeRequest(root_digest=sha(bytes(root))))
    assert [bytes(d) for p in pages for d in p.directories] == [bytes(root)]
    with pytest.raises(GRPCError) as e:
        await collect(cas.get_tree, re.GetTreeRequest(root_digest=sha(bytes(absent))))
    assert e.value.status is Status.NOT_FOUND


async def test_get_tree_bad_token(cas):
    root = directory()
    await upload(cas, bytes(root))
    with pytest.raises(GRPCError) as e:
        await collect(
            cas.get_tree, re.GetTreeRequest(root_digest=sha(bytes(root)), page_token="zz")
        )
    assert e.value.status is Status.INVALID_ARGUMENT
