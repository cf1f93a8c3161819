"""Request message size limit and per-request work bounds (issue 9, item 2).

A message longer than `server.max_receive_message_bytes` is RESOURCE_EXHAUSTED from its length
prefix, before it is buffered or decoded; undecodable bytes are INVALID_ARGUMENT (never
INTERNAL); the largest FindMissingBlobs accepted does not stall other RPCs.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.daemon.config import ServerConfig
from reexec.daemon.grpc_server import max_receive_message_bytes
from reexec.rpc import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, StatusDetailsCodec
from tests.conftest import make_config, open_channel, start_daemon

CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage"


class _RawCodec(ProtoCodec):
    """Sends `bytes` requests as they are (to put malformed messages on the wire)."""

    def encode(self, message, message_type):  # type: ignore[no-untyped-def]
        return message if isinstance(message, bytes) else super().encode(message, message_type)


async def unary(channel: Channel, method: str, request, response_type):
    async def run():
        async with channel.request(
            f"{CAS}/{method}", Cardinality.UNARY_UNARY, type(request), response_type
        ) as stream:
            await stream.send_message(request, end=True)
            return await stream.recv_message()

    return await trio_asyncio.aio_as_trio(run)()


def find_missing_request(n: int) -> fastpb.Message:
    req = fastpb.FindMissingBlobsRequest()
    add = req.blob_digests.add
    for i in range(n):
        add(hash=hashlib.sha256(i.to_bytes(8, "big")).hexdigest(), size_bytes=i + 1)
    return req


def test_default_limit_is_4mib_plus_the_batch_size():
    assert max_receive_message_bytes(ServerConfig()) == (4 << 20) + 4032 * 1024
    assert DEFAULT_MAX_RECEIVE_MESSAGE_BYTES == max_receive_message_bytes(ServerConfig())
    assert max_receive_message_bytes(ServerConfig(max_batch_total_size_bytes="1MiB")) == 5 << 20
    assert max_receive_message_bytes(ServerConfig(max_receive_message_bytes="16MiB")) == 16 << 20


async def test_oversized_message_is_resource_exhausted_before_decoding(channel, monkeypatch):
    decoded = []
    real = fastpb.FindMissingBlobsRequest.FromString

    def spy(data):
        decoded.append(len(data))
        return real(data)

    req = find_missing_request(125_000)  # ~9 MiB, over the default ~8 MiB
    assert req.ByteSize() > DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    monkeypatch.setattr(fastpb.FindMissingBlobsRequest, "FromString", spy)
    with pytest.raises(GRPCError) as e:
        await unary(channel, "FindMissingBlobs", req, fastpb.FindMissingBlobsResponse)
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    assert f"over this server's limit of {DEFAULT_MAX_RECEIVE_MESSAGE_BYTES} bytes" in (
        e.value.message
    )
    assert decoded == []
    # The connection is still good for the next call.
    small = find_missing_request(3)
    resp = await unary(channel, "FindMissingBlobs", small, fastpb.FindMissingBlobsResponse)
    assert len(resp.missing_blob_digests) == 3


async def test_configured_limit(aio_loop, tmp_path, nursery):
    daemon = await start_daemon(
        nursery, make_config(tmp_path / "data", max_receive_message_bytes="2KiB")
    )
    channel = await open_channel(daemon.port)
    try:
        ok = find_missing_request(20)  # ~1.5 KiB
        await unary(channel, "FindMissingBlobs", ok, fastpb.FindMissingBlobsResponse)
        with pytest.raises(GRPCError) as e:
            await unary(
                channel,
                "FindMissingBlobs",
                find_missing_request(40),
                fastpb.FindMissingBlobsResponse,
            )
        assert e.value.status is Status.RESOURCE_EXHAUSTED
        assert "limit of 2048 bytes" in e.value.message
        # Streaming RPCs too: a ByteStream Write message over the limit.
        req = fastpb.WriteRequest(
            resource_name=f"uploads/x/blobs/{hashlib.sha256(b'a' * 4096).hexdigest()}/4096",
            data=b"a" * 4096,
            finish_write=True,
        )

        async def write():
            async with channel.request(
                "/google.bytestream.ByteStream/Write",
                Cardinality.STREAM_UNARY,
                fastpb.WriteRequest,
                fastpb.WriteResponse,
            ) as stream:
                await stream.send_message(req, end=True)
                return await stream.recv_message()

        with pytest.raises(GRPCError) as e:
            await trio_asyncio.aio_as_trio(write)()
        assert e.value.status is Status.RESOURCE_EXHAUSTED
    finally:
        channel.close()


async def test_undecodable_message_is_invalid_argument(daemon):
    async def make() -> Channel:
        return Channel(
            "127.0.0.1", daemon.port, codec=_RawCodec(), status_details_codec=StatusDetailsCodec()
        )

    channel = await trio_asyncio.aio_as_trio(make)()
    try:
        with pytest.raises(GRPCError) as e:
            await unary(
                channel, "FindMissingBlobs", b"\xff\xff\xff\xff", fastpb.FindMissingBlobsResponse
            )
        assert e.value.status is Status.INVALID_ARGUMENT
        assert "not a valid" in e.value.message
    finally:
        channel.close()


async def test_largest_find_missing_does_not_stall_other_rpcs(channel):
    # ~7.2 MiB, under the limit: 100,000 digests, but only 100 distinct ones, so the answer is
    # small and the client (in this process, on the same event loop) has little to decode.
    few = find_missing_request(100)
    big = fastpb.FindMissingBlobsRequest()
    for _ in range(1000):
        big.blob_digests.extend(few.blob_digests)
    assert big.ByteSize() < DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    probe = find_missing_request(1)
    latencies: list[float] = []
    done = trio.Event()

    async def prober() -> None:
        while not done.is_set():
            t = time.monotonic()
            await unary(channel, "FindMissingBlobs", probe, fastpb.FindMissingBlobsResponse)
            latencies.append(time.monotonic() - t)
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prober)
        await trio.sleep(0.05)
        resp = await unary(channel, "FindMissingBlobs", big, fastpb.FindMissingBlobsResponse)
        done.set()
    assert len(resp.missing_blob_digests) == 100
    # Loose: this process also encodes the request. The deterministic check is below.
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    print(f"probe latency max {max(latencies):.3f}s over {len(latencies)} calls")


async def test_find_missing_yields_to_other_tasks_between_chunks():
    """The event loop gets a turn at least every FIND_MISSING_CHUNK digests."""
    from reexec.cas.cas_service import FIND_MISSING_CHUNK, CasService
    from reexec.cas.memory import MemoryStore

    service = CasService(MemoryStore(1 << 30), max_batch_total_size_bytes=4 << 20)
    request = find_missing_request(10 * FIND_MISSING_CHUNK + 1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        response = await service.find_missing_blobs(request)
        during = ticks - before
        nursery.cancel_scope.cancel()
    assert len(response.missing_blob_digests) == 10 * FIND_MISSING_CHUNK + 1
    assert during >= 5  # ~one turn per chunk (10 boundaries); 0 without chunking


# -- the receive budget -----------------------------------------------------------------------


async def test_receive_budget_waits_for_room_then_gives_up(aio_loop):
    from reexec.rpc import ReceiveBudget

    budget = ReceiveBudget(100, wait_s=0.3)

    async def scenario() -> list[str]:
        import asyncio

        events = []
        first = await budget.reserve(80)
        events.append(f"first {first}")

        async def second() -> None:
            got = await budget.reserve(50)
            events.append(f"second {got}")
            budget.release(got)

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0.05)
        events.append("releasing")
        budget.release(first)
        await task
        # More than the whole budget is clamped to it; waiting past wait_s gives up.
        whole = await budget.reserve(10_000)
        events.append(f"whole {whole}")
        try:
            await budget.reserve(1)
        except GRPCError as e:
            events.append(e.status.name)
        budget.release(whole)
        return events

    events = await trio_asyncio.aio_as_trio(scenario)()
    assert events == ["first 80", "releasing", "second 50", "whole 100", "RESOURCE_EXHAUSTED"]
    assert budget.used == 0


async def test_large_messages_share_the_budget(daemon, channel):
    budget = daemon.server.servable.receive_limits().budget
    budget.limit = 2 << 20  # room for one ~1.5 MiB message at a time
    req = find_missing_request(20_000)  # ~1.4 MiB: over LARGE_MESSAGE_BYTES
    results = []

    async def one() -> None:
        resp = await unary(channel, "FindMissingBlobs", req, fastpb.FindMissingBlobsResponse)
        results.append(len(resp.missing_blob_digests))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert results == [20_000] * 4
    assert budget.used == 0


async def test_a_trickled_large_message_times_out(daemon, channel):
    budget = daemon.server.servable.receive_limits().budget
    budget.body_timeout_s = 0.5
    body = find_missing_request(20_000).SerializeToString()
    framed = b"\x00" + len(body).to_bytes(4, "big") + body

    async def run():
        async with channel.request(
            f"{CAS}/FindMissingBlobs",
            Cardinality.UNARY_UNARY,
            fastpb.FindMissingBlobsRequest,
            fastpb.FindMissingBlobsResponse,
        ) as stream:
            await stream.send_request()
            # Half the message, then nothing: the server must not hold its budget forever.
            await stream._stream.send_data(framed[: len(framed) // 2])
            return await stream.recv_message()

    started = time.monotonic()
    with pytest.raises(GRPCError) as e:
        with trio.fail_after(10):
            await trio_asyncio.aio_as_trio(run)()
    assert e.value.status is Status.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert budget.used == 0
