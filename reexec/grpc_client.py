"""Client-side gRPC calls from Trio code (grpclib runs on the trio-asyncio loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality

STREAM_CLOSE_TIMEOUT_S = 10.0


def aio(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Await an asyncio coroutine function from Trio."""

    async def run() -> Any:
        return await fn(*args, **kwargs)

    return trio_asyncio.aio_as_trio(run)()


@asynccontextmanager
async def open_stream(
    channel: Channel,
    path: str,
    cardinality: Cardinality,
    request_type: type,
    response_type: type,
    metadata: dict[str, str] | None = None,
) -> AsyncIterator[Stream]:
    """A grpclib client stream used from Trio; leaving with an exception resets the stream."""
    cm = channel.request(path, cardinality, request_type, response_type, metadata=metadata)
    stream = await trio_asyncio.aio_as_trio(cm.__aenter__)()
    failure: BaseException | None = None
    try:
        yield stream
    except BaseException as e:
        failure = e
        raise
    finally:
        # Closing (or resetting) the stream is a few frames; bounded, so a peer that stopped
        # reading cannot hold a cancelled caller forever.
        with trio.move_on_after(STREAM_CLOSE_TIMEOUT_S, shield=True):
            await trio_asyncio.aio_as_trio(cm.__aexit__)(
                type(failure) if failure else None, failure, None
            )


async def unary(
    channel: Channel,
    path: str,
    request: Any,
    response_type: type,
    deadline_s: float | None = None,
    metadata: dict[str, str] | None = None,
) -> Any:
    async def run() -> Any:
        async with channel.request(
            path,
            Cardinality.UNARY_UNARY,
            type(request),
            response_type,
            timeout=deadline_s,
            metadata=metadata,
        ) as stream:
            await stream.send_message(request, end=True)
            return await stream.recv_message()

    return await trio_asyncio.aio_as_trio(run)()
