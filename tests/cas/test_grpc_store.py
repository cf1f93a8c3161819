"""GrpcStore: the Store contract against a real reexecd (in process), and its failure modes."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio

from reexec.cas.digest import digest_of
from reexec.cas.grpc_store import GrpcStore, channel_factory
from reexec.cas.store import BlobNotFound, Store
from reexec.daemon.config import SchedulerConfig
from reexec.errors import Unavailable
from tests.cas.store_contract import StoreContract, blob, read_all
from tests.conftest import make_config, start_daemon
from tests.e2e.harness import free_port

# The server the current contract test talks to: `make` takes only tmp_path, and pytest-trio
# runs only the async fixtures a test names in its signature, so each contract test is wrapped
# to start its own server (and the asyncio loop grpclib needs) around itself.
_server: dict[str, Any] = {}


def _with_server(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def wrapped(self: StoreContract, *args: Any, **kwargs: Any) -> None:
        tmp_path: Path = kwargs.get("tmp_path") or next(a for a in args if isinstance(a, Path))
        config = make_config(tmp_path / "server", scheduler=SchedulerConfig(enabled=False))
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            daemon = await start_daemon(nursery, config)
            _server["port"] = daemon.port
            _server["stores"] = stores = []
            try:
                await test(self, *args, **kwargs)
            finally:
                for store in stores:
                    await store.aclose()
            nursery.cancel_scope.cancel()

    return wrapped


class TestGrpcStoreContract(StoreContract):
    async def make(self, tmp_path: Path) -> Store:
        url = f"grpc://127.0.0.1:{_server['port']}"
        store = GrpcStore(channel_factory(url), endpoint=url, timeout_s=10)
        _server["stores"].append(store)
        return store


for _name in dir(StoreContract):
    if _name.startswith("test_"):
        setattr(TestGrpcStoreContract, _name, _with_server(getattr(StoreContract, _name)))


async def test_large_blobs_stream_and_reads_are_verified(aio_loop, tmp_path, nursery) -> None:
    config = make_config(tmp_path / "server", scheduler=SchedulerConfig(enabled=False))
    daemon = await start_daemon(nursery, config)
    store = GrpcStore(channel_factory(f"grpc://127.0.0.1:{daemon.port}"), timeout_s=10)
    data = blob(5 << 20, 7)
    d = digest_of(data)
    await store.put_bytes(d, data)  # ByteStream, in 1 MiB messages
    assert await store.get_bytes(d) == data
    assert await read_all(store, d, offset=3 << 20, chunk=300_000) == data[3 << 20 :]
    with pytest.raises(BlobNotFound):
        await store.get_bytes(digest_of(b"never stored"))
    with pytest.raises(BlobNotFound):
        async with store.open_read(digest_of(blob(400_000, 3))):
            pass
    await store.aclose()


async def test_an_unreachable_endpoint_is_unavailable(aio_loop) -> None:
    store = GrpcStore(channel_factory(f"grpc://127.0.0.1:{free_port()}"), timeout_s=5)
    d = digest_of(b"x")
    with pytest.raises(Unavailable):
        await store.find_missing([d])
    with pytest.raises(Unavailable):
        await store.put_bytes(d, b"x")
    await store.aclose()


def test_bad_urls_are_refused() -> None:
    for url in ("http://a:1", "grpc://nohost", "grpc://h:port", "a:1"):
        with pytest.raises(ValueError):
            channel_factory(url)
