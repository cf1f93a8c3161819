"""Redis connections for every part of reexec that keeps state in Redis (the action cache, the
scheduler's state store): one URL syntax, one set of timeouts, one error type.

URLs: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, `rediss://...` (TLS, verified against the
system's CAs or `tls_ca`, host name checked), `unix:///PATH/TO/redis.sock[?db=N]`.

A coredis client owns an anyio task group (one task per pooled connection), so it is an async
context manager that must be entered by a task that outlives every caller, and exited by the
same task: `async with connect(url, timeout_s=5) as client:` in the owner's `run()`. Other tasks
may then call commands concurrently (they never re-enter the client). Call it only from Trio
code: a grpclib handler crosses into Trio first (an asyncio task calling coredis directly
breaks the pool). `ClientHost` does the entering for objects that are built and closed rather
than run (the action cache).

coredis is imported only when a client is made (importing it takes ~0.3 s, which every
`reexecd` command would pay just to parse its config).

Errors: `redis_errors(what)` turns everything that means "Redis cannot answer now" (refused or
lost connection, timeout, still loading, read-only replica, out of memory) into
`RedisUnavailable`, an `Unavailable` (gRPC UNAVAILABLE, so clients retry). The pool reconnects
on the next command once Redis is back; nothing needs restarting.
"""

from __future__ import annotations

import logging
import math
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from reexec.errors import Unavailable

if TYPE_CHECKING:
    import coredis

log = logging.getLogger(__name__)

DEFAULT_PORT = 6379


class RedisUnavailable(Unavailable):
    """Redis could not answer (down, unreachable, too slow, loading, read-only, out of memory)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL. `where` is safe to log (never the password)."""

    scheme: str
    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def where(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis URL; ValueError names the part that is wrong."""
    if not isinstance(url, str) or not url:
        raise ValueError("empty Redis URL (expected redis://HOST:PORT/DB or unix:///PATH)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"bad Redis URL {url!r}: scheme must be redis://, rediss:// or unix://, not {scheme!r}"
        )
    if parts.fragment:
        raise ValueError(f"bad Redis URL {url!r}: no #fragment allowed")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ValueError(f"bad Redis URL {url!r}: unknown parameter(s) {', '.join(unknown)}")
    if len(query.get("db", [])) > 1:
        raise ValueError(f"bad Redis URL {url!r}: db given more than once")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    query_db = query["db"][0] if "db" in query else None

    if scheme == "unix":
        if parts.netloc.rpartition("@")[2]:
            raise ValueError(
                f"bad Redis URL {url!r}: a unix:// URL has no host (unix:///absolute/path.sock)"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError(f"bad Redis URL {url!r}: the socket path must be absolute")
        return RedisTarget(
            scheme,
            path=path,
            db=_db(url, query_db),
            username=username,
            password=password,
        )

    if not parts.hostname:
        raise ValueError(f"bad Redis URL {url!r}: no host")
    path_db = parts.path.lstrip("/")
    if "/" in path_db:
        raise ValueError(f"bad Redis URL {url!r}: the path must be /DB (a database number)")
    if path_db and query_db is not None:
        raise ValueError(f"bad Redis URL {url!r}: db given both as /DB and as ?db=")
    if port == 0:
        raise ValueError(f"bad Redis URL {url!r}: port 0")
    return RedisTarget(
        scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        db=_db(url, path_db or query_db),
        username=username,
        password=password,
    )


def _db(url: str, text: str | None) -> int:
    if text is None or text == "":
        return 0
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"bad Redis URL {url!r}: database {text!r} is not a number >= 0")
    return int(text)


def connect(
    url: str,
    *,
    timeout_s: float,
    tls_ca: str | None = None,
    max_connections: int | None = None,
    client_name: str | None = None,
) -> coredis.Redis[bytes]:
    """A client (bytes in, bytes out) for `url`; enter it with `async with` before use.

    `timeout_s` bounds connecting, waiting for a pooled connection and waiting for each reply.
    A command whose pooled connection turns out to be dead (Redis restarted) is retried once on
    a fresh connection; nothing else is retried here, so a caller waits at most about
    2 x `timeout_s` before `RedisUnavailable`. ValueError for a bad URL or timeout.
    """
    import coredis
    from coredis.exceptions import ConnectionError as RedisConnectionError
    from coredis.retry import ConstantRetryPolicy

    target = parse_url(url)
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"Redis timeout must be > 0 seconds, not {timeout_s!r}")
    kwargs: dict[str, Any] = {
        "db": target.db,
        "username": target.username,
        "password": target.password,
        "connect_timeout": timeout_s,
        "stream_timeout": timeout_s,
        "pool_timeout": timeout_s,
        "max_connections": max_connections,
        "client_name": client_name,
        "decode_responses": False,
        # Only a dead connection is retried (at once, on a new one): a timeout is not, or
        # each caller would wait several timeouts while Redis hangs.
        "retry_policy": ConstantRetryPolicy((RedisConnectionError,), retries=1, delay=0),
    }
    if target.path is not None:
        return coredis.Redis(unix_socket_path=target.path, **kwargs)
    if target.tls:
        # Our own context: coredis's default for ssl=True checks neither the certificate
        # chain strictly nor the host name.
        kwargs["ssl_context"] = ssl.create_default_context(cafile=tls_ca)
    return coredis.Redis(host=target.host, port=target.port, **kwargs)


# Error replies that mean "not now" rather than "wrong command" (coredis keeps the code in the
# message of a ResponseError when it has no class for it).
_UNAVAILABLE_REPLIES = ("OOM ", "MISCONF ", "MASTERDOWN ", "LOADING ", "BUSY ", "TRYAGAIN ")


def is_unavailable(e: BaseException) -> bool:
    """True if `e` means Redis could not answer now (as opposed to a bug in the command).

    coredis.ConnectionError covers refused, lost and timed-out connects, protocol errors and
    LOADING; TimeoutError (the builtin) is a reply that did not come within the timeout;
    ReadOnlyError a replica after a failover.
    """
    if isinstance(
        e,
        TimeoutError
        | OSError
        | trio.TooSlowError
        | trio.BrokenResourceError
        | trio.ClosedResourceError,
    ):
        return True
    if "coredis" not in sys.modules:
        return False
    from coredis.exceptions import ConnectionError, ReadOnlyError, ResponseError

    if isinstance(e, ConnectionError | ReadOnlyError):
        return True
    return isinstance(e, ResponseError) and str(e).startswith(_UNAVAILABLE_REPLIES)


def describe(e: BaseException) -> str:
    """`e`'s message and its root cause's: coredis wraps "connection refused", "no such file"
    and "certificate verify failed" in one "Unable to establish a connection"."""
    text = str(e) or type(e).__name__
    root = e
    while root.__cause__ is not None and len(text) < 500:
        root = root.__cause__
    if root is not e:
        why = str(root) or type(root).__name__
        if why not in text:
            text = f"{text} ({why})"
    return text


@contextmanager
def redis_errors(what: str, where: str = "") -> Iterator[None]:
    """Re-raise "Redis cannot answer now" errors as `RedisUnavailable("{what}: ...")`.

    Other Redis errors (a wrong command, a Lua error) propagate unchanged: they are bugs.
    """
    try:
        yield
    except Exception as e:
        if not is_unavailable(e):
            raise
        at = f" at {where}" if where else ""
        raise RedisUnavailable(f"{what}: Redis{at} unavailable: {describe(e)}") from e


class ClientHost:
    """Keeps one entered coredis client alive between `start()` and `aclose()`, for objects
    that are built and closed rather than run (stores and action caches have no `run()`).

    The client's task group must be exited by the task that entered it, and entering it in the
    builder's task would tie it to that task's cancel-scope nesting. So the client lives in a
    Trio system task owned by this object: `start()` returns once it is entered, `aclose()`
    exits it and waits for the task (bounded by the caller's cancel scope). A run that ends
    without `aclose()` cancels the system task, which also closes the client.
    """

    def __init__(self, client: coredis.Redis[bytes], *, what: str = "redis") -> None:
        self.client = client
        self._what = what
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def start(self) -> coredis.Redis[bytes]:
        started = trio.Event()
        failure: list[BaseException] = []

        async def host() -> None:
            try:
                async with self.client:
                    started.set()
                    await self._stop.wait()
            except Exception as e:  # a system task must not raise
                failure.append(e)
                log.warning("%s: Redis client closed with an error: %r", self._what, e)
            finally:
                started.set()
                self._stopped.set()

        trio.lowlevel.spawn_system_task(host, name=f"{self._what} Redis client")
        await started.wait()
        if failure:
            raise failure[0]
        return self.client

    async def aclose(self) -> None:
        self._stop.set()
        await self._stopped.wait()
