"""gRPC channels a worker opens to its scheduler (TCP: grpc://, grpcs://; or a unix socket), and
the worker token it presents."""

from __future__ import annotations

import socket

import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration

from reexec.cas.grpc_store import ChannelFactory, channel_factory
from reexec.daemon.config import Config, ConfigError
from reexec.rpc import StatusDetailsCodec
from reexec.sandbox.agent import SchedulerEndpoint
from reexec.sandbox.config import SchedulerUrlError, scheduler_urls


def scheduler_endpoints(config: Config) -> list[SchedulerEndpoint]:
    """The schedulers `worker.scheduler` names, in order (grpc:// or grpcs://, verified with
    `worker.tls_ca`); ConfigError if there are none or one is malformed."""
    try:
        urls = scheduler_urls(config.worker.scheduler)
    except SchedulerUrlError as e:
        raise ConfigError(str(e)) from None
    if not urls:
        raise ConfigError("worker.scheduler: required for `reexecd worker` (or pass --scheduler)")
    keepalive = _keepalive(config.worker.scheduler_keepalive_s)
    endpoints = []
    for url in urls:
        try:
            endpoints.append(
                SchedulerEndpoint(
                    url, channel_factory(url, tls_ca=config.worker.tls_ca, config=keepalive)
                )
            )
        except ValueError as e:
            raise ConfigError(f"worker.scheduler: {e}") from None
        except OSError as e:
            raise ConfigError(f"worker.tls_ca: cannot load {config.worker.tls_ca}: {e}") from None
    return endpoints


def _keepalive(interval_s: float) -> Configuration | None:
    """grpclib's client keepalive: a PING every `interval_s` while a stream is open (the
    worker's Connect stream always is), the connection closed if one is not answered within
    `interval_s`. (grpclib names these options with a leading underscore; its server answers
    pings however often they come.)"""
    if not interval_s > 0:
        return None
    return Configuration(
        _keepalive_time=interval_s,
        _keepalive_timeout=interval_s,
        _keepalive_permit_without_calls=False,
        _http2_max_pings_without_data=0,
        _http2_min_sent_ping_interval_without_data=interval_s,
    )


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
