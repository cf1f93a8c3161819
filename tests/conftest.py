"""Shared fixtures: an in-process daemon and a grpclib client talking to it over loopback."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel

from reexec.daemon.app import Daemon, run_daemon
from reexec.daemon.config import Config, SchedulerConfig, ServerConfig
from reexec.rpc import StatusDetailsCodec
from tests.redis_server import RedisServer

T = TypeVar("T")


def call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Awaitable[T]:
    """Await an asyncio coroutine function (a grpclib stub method) from a Trio test."""
    return trio_asyncio.aio_as_trio(functools.partial(fn, *args, **kwargs))()


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop():
        yield


def make_config(data_dir: Path, scheduler: SchedulerConfig | None = None, **server: Any) -> Config:
    return Config(
        data_dir=str(data_dir),
        server=ServerConfig(listen=["127.0.0.1:0"], **server),
        scheduler=scheduler or SchedulerConfig(),
    )


async def start_daemon(nursery: trio.Nursery, config: Config, local_worker: bool = False) -> Daemon:
    """An in-process daemon; without a local worker unless asked (tests bring fake workers)."""
    return await nursery.start(
        functools.partial(run_daemon, config, handle_signals=False, local_worker=local_worker)
    )


@pytest.fixture
async def daemon(aio_loop: None, tmp_path: Path, nursery: trio.Nursery) -> Daemon:
    return await start_daemon(nursery, make_config(tmp_path / "data"))


async def open_channel(port: int) -> Channel:
    async def make() -> Channel:
        return Channel("127.0.0.1", port, status_details_codec=StatusDetailsCodec())

    return await trio_asyncio.aio_as_trio(make)()


@pytest.fixture
async def channel(daemon: Daemon) -> AsyncIterator[Channel]:
    ch = await open_channel(daemon.port)
    try:
        yield ch
    finally:
        ch.close()


async def collect(agen_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
    """Drain a server-streaming stub call (an asyncio async generator) from Trio."""

    async def run() -> list[Any]:
        return [item async for item in agen_fn(*args, **kwargs)]

    return await trio_asyncio.aio_as_trio(run)()


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a unix socket in a short temp dir (AF_UNIX paths are short),
    stopped at teardown; `.stop()` / `.start()` restart it on the same socket."""
    directory = Path(tempfile.mkdtemp(prefix="reexec-redis-"))
    server = RedisServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """`unix:///.../redis.sock` of a fresh redis-server."""
    return redis_server.url
