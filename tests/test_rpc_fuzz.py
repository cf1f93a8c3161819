"""Random and mutated request bytes to every client RPC: never INTERNAL or UNKNOWN (issue 9).

Seeded, so a failure reproduces; a few hundred calls in all, to keep the suite fast.
"""

from __future__ import annotations

import hashlib
import random

import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError

from reexec import fastpb
from reexec.rpc import StatusDetailsCodec

m = fastpb.message_class
RE = "build.bazel.remote.execution.v2"
U, S, C = Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM, Cardinality.STREAM_UNARY

# path, cardinality, response type
METHODS = [
    (f"/{RE}.ContentAddressableStorage/FindMissingBlobs", U, fastpb.FindMissingBlobsResponse),
    (f"/{RE}.ContentAddressableStorage/BatchUpdateBlobs", U, fastpb.BatchUpdateBlobsResponse),
    (f"/{RE}.ContentAddressableStorage/BatchReadBlobs", U, fastpb.BatchReadBlobsResponse),
    (f"/{RE}.ContentAddressableStorage/GetTree", S, fastpb.GetTreeResponse),
    ("/google.bytestream.ByteStream/Read", S, fastpb.ReadResponse),
    ("/google.bytestream.ByteStream/Write", C, fastpb.WriteResponse),
    (
        "/google.bytestream.ByteStream/QueryWriteStatus",
        U,
        m("google.bytestream.QueryWriteStatusResponse"),
    ),
    (f"/{RE}.ActionCache/GetActionResult", U, fastpb.ActionResult),
    (f"/{RE}.ActionCache/UpdateActionResult", U, fastpb.ActionResult),
    (f"/{RE}.Capabilities/GetCapabilities", U, m(f"{RE}.ServerCapabilities")),
    (f"/{RE}.Execution/Execute", S, fastpb.Operation),
    (f"/{RE}.Execution/WaitExecution", S, fastpb.Operation),
    ("/google.longrunning.Operations/GetOperation", U, fastpb.Operation),
    (
        "/google.longrunning.Operations/ListOperations",
        U,
        m("google.longrunning.ListOperationsResponse"),
    ),
    ("/google.longrunning.Operations/CancelOperation", U, m("google.protobuf.Empty")),
    ("/google.longrunning.Operations/DeleteOperation", U, m("google.protobuf.Empty")),
    ("/google.longrunning.Operations/WaitOperation", U, fastpb.Operation),
]

BAD = {Status.INTERNAL, Status.UNKNOWN}


class _RawCodec(ProtoCodec):
    def encode(self, message, message_type):  # type: ignore[no-untyped-def]
        return message


def _seeds() -> list[bytes]:
    """Valid requests of several kinds, to mutate."""
    h = hashlib.sha256(b"x").hexdigest()
    fm = fastpb.FindMissingBlobsRequest()
    fm.blob_digests.add(hash=h, size_bytes=1)
    up = fastpb.BatchUpdateBlobsRequest()
    r = up.requests.add(data=b"x")
    r.digest.hash, r.digest.size_bytes = h, 1
    w = fastpb.WriteRequest(resource_name=f"uploads/u/blobs/{h}/1", data=b"x", finish_write=True)
    rd = fastpb.ReadRequest(resource_name=f"blobs/{h}/1")
    ex = fastpb.ExecuteRequest()
    ex.action_digest.hash, ex.action_digest.size_bytes = h, 1
    tree = fastpb.GetTreeRequest(page_size=2, page_token="1")
    tree.root_digest.hash, tree.root_digest.size_bytes = h, 1
    return [x.SerializeToString() for x in (fm, up, w, rd, ex, tree)]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)) :]
        elif op == 2:
            b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randint(1, 8))
        elif b:
            i = rng.randrange(len(b))
            b[i] ^= 0x80
    return bytes(b)


def _payloads(n: int) -> list[bytes]:
    rng = random.Random(9)
    seeds = _seeds()
    out = [b"", b"\x00", b"\xff" * 8, b"\x0a\xff\xff\xff\xff\x0f"]
    while len(out) < n:
        if rng.random() < 0.3:
            out.append(rng.randbytes(rng.randint(1, 64)))
        else:
            out.append(_mutate(rng, rng.choice(seeds)))
    return out


async def _call(channel: Channel, path: str, cardinality, response_type, payload: bytes):
    async def run():
        async with channel.request(path, cardinality, bytes, response_type, timeout=5) as stream:
            await stream.send_message(payload, end=True)
            while await stream.recv_message() is not None:
                if cardinality is not Cardinality.UNARY_STREAM:
                    break

    await trio_asyncio.aio_as_trio(run)()


async def test_random_and_mutated_requests_never_fail_internally(daemon):
    async def make() -> Channel:
        return Channel(
            "127.0.0.1", daemon.port, codec=_RawCodec(), status_details_codec=StatusDetailsCodec()
        )

    channel = await trio_asyncio.aio_as_trio(make)()
    failures = []
    seen: dict[str, int] = {}
    try:
        payloads = _payloads(24)
        for path, cardinality, response_type in METHODS:
            for payload in payloads:
                try:
                    with trio.fail_after(10):
                        await _call(channel, path, cardinality, response_type, payload)
                    seen["OK"] = seen.get("OK", 0) + 1
                except GRPCError as e:
                    seen[e.status.name] = seen.get(e.status.name, 0) + 1
                    if e.status in BAD:
                        failures.append((path, payload, e.status, e.message))
                except (StreamTerminatedError, TimeoutError, trio.TooSlowError):
                    # Execute of a valid-looking action may wait for a worker: not a failure.
                    pass
    finally:
        channel.close()
    assert not failures, failures[:5]
    # Both outcomes occur: the mutations reach the services' own checks.
    assert seen.get("OK") and seen.get("INVALID_ARGUMENT"), seen
    print("fuzz outcomes:", seen)
