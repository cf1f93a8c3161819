"""Baseline server: plain grpclib on plain asyncio (no Trio, no trio-asyncio), trivial handlers.

It serves the same RPC shapes as reexecd with the same fastpb message classes, but the handlers
do no work: FindMissingBlobs answers "nothing missing", Write drains its stream and reports the
declared size, Read sends one fixed 4 KiB chunk (or, for a resource name whose size is larger,
that many zero bytes in 1 MiB responses), GetActionResult returns a fixed ActionResult,
GetCapabilities a fixed ServerCapabilities. What it costs per RPC is the framework floor
(h2 + grpclib + asyncio + protobuf) that reexecd's own overhead is compared against.

Usage: python bench/_echo_server.py PORT [asyncio|trio-asyncio|trio-asyncio-cross]
  asyncio             plain asyncio loop (the default; the framework floor)
  trio-asyncio        the same handlers on a trio-asyncio loop inside trio.run, as reexecd hosts
                      grpclib (the hosting tax)
  trio-asyncio-cross  as above, and each handler crosses into Trio once (awaits a Trio no-op with
                      trio_asyncio.trio_as_aio), as reexecd's handlers do (the crossing tax)
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from reexec import fastpb

REAPI = "build.bazel.remote.execution.v2"
ServerCapabilities = fastpb.message_class(f"{REAPI}.ServerCapabilities")
GetCapabilitiesRequest = fastpb.message_class(f"{REAPI}.GetCapabilitiesRequest")

CHUNK = bytes(4096)
BIG_CHUNK_BYTES = 1 << 20
BIG_CHUNK = bytes(BIG_CHUNK_BYTES)


CROSS = False


async def _trio_noop() -> None:
    import trio

    await trio.lowlevel.checkpoint()


async def maybe_cross() -> None:
    if CROSS:
        import trio_asyncio

        await trio_asyncio.trio_as_aio(_trio_noop)()


class Echo:
    def __init__(self) -> None:
        self.caps = ServerCapabilities()
        self.caps.low_api_version.major = 2
        self.caps.high_api_version.major = 2
        self.caps.high_api_version.minor = 3
        self.result = fastpb.ActionResult(exit_code=0)
        self.result.output_files.add(path="out/a.o").digest.hash = "0" * 64

    async def get_capabilities(self, stream: Stream) -> None:
        await stream.recv_message()
        await maybe_cross()
        await stream.send_message(self.caps)

    async def find_missing(self, stream: Stream) -> None:
        await stream.recv_message()
        await maybe_cross()
        await stream.send_message(fastpb.FindMissingBlobsResponse())

    async def write(self, stream: Stream) -> None:
        size = 0
        async for req in stream:
            size += len(req.data)
            if req.finish_write:
                break
        await maybe_cross()
        await stream.send_message(fastpb.WriteResponse(committed_size=size))

    async def read(self, stream: Stream) -> None:
        request = await stream.recv_message()
        await maybe_cross()
        size = int(request.resource_name.rpartition("/")[2] or 0)
        if size <= len(CHUNK):
            await stream.send_message(fastpb.ReadResponse(data=CHUNK))
            return
        # A large blob: `size` bytes of zeros in 1 MiB responses (the floor of a bulk Read: the
        # same stack sending from memory).
        sent = 0
        while sent < size:
            n = min(BIG_CHUNK_BYTES, size - sent)
            await stream.send_message(fastpb.ReadResponse(data=BIG_CHUNK[:n]))
            sent += n

    async def get_action_result(self, stream: Stream) -> None:
        await stream.recv_message()
        await maybe_cross()
        await stream.send_message(self.result)

    def __mapping__(self) -> dict[str, Handler]:
        u, cs, ss = Cardinality.UNARY_UNARY, Cardinality.STREAM_UNARY, Cardinality.UNARY_STREAM
        return {
            f"/{REAPI}.Capabilities/GetCapabilities": Handler(
                self.get_capabilities, u, GetCapabilitiesRequest, ServerCapabilities
            ),
            f"/{REAPI}.ContentAddressableStorage/FindMissingBlobs": Handler(
                self.find_missing,
                u,
                fastpb.FindMissingBlobsRequest,
                fastpb.FindMissingBlobsResponse,
            ),
            "/google.bytestream.ByteStream/Write": Handler(
                self.write, cs, fastpb.WriteRequest, fastpb.WriteResponse
            ),
            "/google.bytestream.ByteStream/Read": Handler(
                self.read, ss, fastpb.ReadRequest, fastpb.ReadResponse
            ),
            f"/{REAPI}.ActionCache/GetActionResult": Handler(
                self.get_action_result, u, fastpb.GetActionResultRequest, fastpb.ActionResult
            ),
        }


async def main(port: int) -> None:
    server = Server([Echo()])
    await server.start("127.0.0.1", port, reuse_address=True)
    try:
        await asyncio.Event().wait()
    finally:
        server.close()


async def main_trio(port: int) -> None:
    import trio
    import trio_asyncio

    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(main)(port)
        await trio.sleep_forever()


if __name__ == "__main__":
    import contextlib
    import signal

    mode = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if mode not in ("asyncio", "trio-asyncio", "trio-asyncio-cross"):
        raise SystemExit(f"unknown mode {mode!r}")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        if mode == "asyncio":
            asyncio.run(main(int(sys.argv[1])))
        else:
            import trio

            CROSS = mode == "trio-asyncio-cross"
            trio.run(main_trio, int(sys.argv[1]))
