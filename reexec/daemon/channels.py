"""gRPC channels a worker opens to its scheduler (TCP: grpc://, grpcs://; or a unix socket), and
the worker token it presents."""

from __future__ import annotations

import socket

import trio
import trio_asyncio
from grpclib.client import Channel

from reexec.cas.grpc_store import ChannelFactory, channel_factory
from reexec.daemon.config import Config, ConfigError
from reexec.rpc import StatusDetailsCodec


def scheduler_channel_factory(config: Config) -> ChannelFactory:
    """Connects to `worker.scheduler` (grpc:// or grpcs://, verified with `worker.tls_ca`)."""
    url = config.worker.scheduler
    if not url:
        raise ConfigError("worker.scheduler: required for `reexecd worker` (or pass --scheduler)")
    try:
        return channel_factory(url, tls_ca=config.worker.tls_ca)
    except ValueError as e:
        raise ConfigError(f"worker.scheduler: {e}") from None


def unix_channel_factory(path: str) -> ChannelFactory:
    async def make() -> Channel:
        async def inner() -> Channel:
            return Channel(path=path, status_details_codec=StatusDetailsCodec())

        return await trio_asyncio.aio_as_trio(inner)()

    return make


def default_worker_id(suffix: str = "") -> str:
    return socket.gethostname() + suffix


async def read_token(path: str, key: str) -> str:
    """A token from a file (surrounding whitespace ignored); ConfigError naming `key` if unusable."""
    try:
        token = (await trio.Path(path).read_text()).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    if len(token) < 16:
        raise ConfigError(f"{key}: the token in {path} is shorter than 16 characters")
    return token
