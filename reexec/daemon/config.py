"""Daemon configuration: TOML decoded and validated by msgspec.

Every field's default is the documented default; `reexecd serve` with no file uses exactly
`Config()`. Errors name the file, the key and what is allowed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec

from reexec.cas.config import (
    ActionCacheConfig,
    CompletenessCheckingActionCacheConfig,
    FastSlowStoreConfig,
    FilesystemActionCacheConfig,
    GrpcActionCacheConfig,
    GrpcStoreConfig,
    MemoryActionCacheConfig,
    MemoryStoreConfig,
    ShardStoreConfig,
    StoreConfig,
    default_action_cache,
    default_store,
)
from reexec.cas.fs_shared import MAX_SLOTS
from reexec.cas.grpc_store import channel_factory
from reexec.configtypes import ByteSize, ConfigStruct, parse_size
from reexec.sandbox.config import SchedulerUrlError, WorkerConfig, scheduler_urls
from reexec.sched.config import SchedulerConfig

__all__ = [
    "ByteSize",
    "Config",
    "ConfigError",
    "LogConfig",
    "SchedulerConfig",
    "ServerConfig",
    "StatusConfig",
    "TlsConfig",
    "WorkerConfig",
    "load_config",
    "parse_listen",
    "parse_size",
]

_Base = ConfigStruct


# -- Server -----------------------------------------------------------------------------------


class TlsConfig(_Base):
    cert: str
    key: str
    client_ca: str | None = None
    """PEM bundle; when set, clients must present a certificate signed by it (mTLS)."""


class ServerConfig(_Base):
    listen: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:8980"])
    """host:port addresses for gRPC; port 0 picks a free port."""
    instances: list[str] = msgspec.field(default_factory=list)
    """Instance names served; empty accepts every name."""
    grace_period_s: float = 30.0
    """On SIGINT/SIGTERM, how long in-flight RPCs may run before they are cancelled."""
    max_batch_total_size_bytes: ByteSize = "4032KiB"
    """Advertised in Capabilities. 4 MiB less 64 KiB: gRPC clients refuse messages over 4 MiB by
    default, and a batch carries per-blob digests and statuses on top of its data."""
    max_inline_bytes: ByteSize = "1MiB"
    """GetActionResult: total bytes inlined for inline_stdout/stderr/output_files hints."""
    upload_idle_timeout_s: float = 600.0
    """Resumable ByteStream uploads idle this long are discarded."""
    ac_allow_updates: bool = True
    """Whether clients may call UpdateActionResult."""
    max_receive_message_bytes: ByteSize = 0
    """Largest gRPC message a client may send; a larger one is refused with RESOURCE_EXHAUSTED
    from its length prefix, before it is buffered or decoded. 0 (default): 4 MiB plus
    max_batch_total_size_bytes (8128 KiB with the default batch size)."""
    max_connections: int = 0
    """Client connections served at once (all TCP listen addresses together); one more is
    closed as soon as it is accepted. 0 (default): half of the file-descriptor limit
    (RLIMIT_NOFILE), at least 16 and at most 10,000."""
    connection_idle_timeout_s: float = 300.0
    """A client connection with no RPC in flight for this long is closed; 0 keeps idle
    connections open forever. Default 300 s."""
    max_open_uploads: int = 512
    """Resumable ByteStream uploads open at once in this server; a new one beyond it gets
    RESOURCE_EXHAUSTED (finished and expired uploads free their place). Default 512."""
    allow_list_operations: bool = False
    """Whether gRPC clients may call Operations.ListOperations. Off by default: an operation's
    name is the capability to watch or cancel it, so listing them would hand out every
    client's operations (operators list them on the status socket). Default false."""
    tls: TlsConfig | None = None
    processes: int = 1
    """Serving processes, under one supervisor: they share the listen addresses (SO_REUSEPORT,
    the kernel spreads connections) and the filesystem stores. 1 (default): one process. Only
    roles without a scheduler (`reexecd storage`) may run several for now."""


class LogConfig(_Base):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


# -- Status endpoint --------------------------------------------------------------------------


class StatusConfig(_Base):
    socket: str = "reexecd.sock"
    """Unix socket of the status/metrics HTTP endpoint (relative: under data_dir); "" turns it off."""
    socket_mode: str = "0660"
    """Octal file mode of the socket (group members may query and drain)."""
    listen: str = ""
    """Optional host:port serving /metrics, /healthz, /readyz and the read-only web UI over TCP
    (never /drain)."""
    base_url: str = ""
    """URL under which people reach the web UI (e.g. "http://build-host:8080"); when set, the
    ExecuteResponse.message of a failed or timed-out action carries the link to its page."""
    show_blob_contents: bool = False
    """Show blob contents in the web UI (Commands' argv and env, stdout/stderr, files). Off by
    default: they can hold secrets. Digests and sizes are always shown."""
    max_inline_bytes: int = 65536
    """Largest stdout/stderr/file shown inline or downloadable from the web UI."""
    web_drain_buttons: bool = False
    """Offer worker drain buttons in the web UI on the unix socket (never on TCP)."""
    journal_operations: int = 10000
    """Recent operations the web UI remembers (the journal also keeps at most 64 MiB)."""


class Config(_Base):
    data_dir: str = "./reexec-data"
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    cas: StoreConfig = msgspec.field(default_factory=default_store)
    action_cache: ActionCacheConfig = msgspec.field(default_factory=default_action_cache)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)


class ConfigError(Exception):
    """A configuration problem, already phrased for the user (file, key, what is allowed)."""


def load_config(path: str | Path | None) -> Config:
    """Load and validate a TOML file; `None` gives the embedded default."""
    if path is None:
        config = Config()
        source = "<embedded default>"
    else:
        source = str(path)
        try:
            text = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file: {e.strerror}") from None
        try:
            config = msgspec.toml.decode(text, type=Config)
        except msgspec.ValidationError as e:
            raise ConfigError(f"{source}: {explain(str(e), _raw_toml(text))}") from None
        except msgspec.DecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
    check_semantics(config, source)
    return config


def check_semantics(config: Config, source: str) -> None:
    """Checks msgspec's types cannot express: sizes, addresses, positive timeouts."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}: {why}")

    for key, value in _sizes(config):
        try:
            parse_size(value)
        except ValueError as e:
            fail(key, str(e))
    for i, addr in enumerate(config.server.listen):
        try:
            parse_listen(addr)
        except ValueError as e:
            fail(f"server.listen[{i}]", str(e))
    if not config.server.listen:
        fail("server.listen", "at least one address is required")
    _check_store("cas", config.cas, fail)
    _check_store("action_cache", config.action_cache, fail)
    if config.worker.cas is not None:
        _check_store("worker.cas", config.worker.cas, fail)
    try:
        scheduler_urls(config.worker.scheduler)
    except SchedulerUrlError as e:
        fail(f"worker.scheduler{e.key}", e.why)
    if not config.worker.scheduler_keepalive_s >= 0:  # NaN too
        fail("worker.scheduler_keepalive_s", "must be 0 (off) or a positive number of seconds")
    state = config.scheduler.state
    if state.type == "redis":
        if not state.url:
            fail("scheduler.state.url", "required for type = 'redis' (redis://HOST:PORT/DB)")
        if not state.url.startswith(("redis://", "rediss://", "unix://")):
            fail(
                "scheduler.state.url",
                f"{state.url!r}: use redis://HOST:PORT/DB, rediss://HOST:PORT/DB or "
                "unix:///path/redis.sock",
            )
    for key in ("timeout_s", "worker_lease_s"):
        if not getattr(state, key) > 0:
            fail(f"scheduler.state.{key}", "must be a positive number of seconds")
    _check_processes(config, fail)
    if config.server.max_connections < 0:
        fail("server.max_connections", "must not be negative (0: derived from the fd limit)")
    if config.server.max_open_uploads < 1:
        fail("server.max_open_uploads", "must be at least 1")
    receive = parse_size(config.server.max_receive_message_bytes)
    batch = parse_size(config.server.max_batch_total_size_bytes)
    if receive and receive < batch:
        fail(
            "server.max_receive_message_bytes",
            f"{receive} bytes is below max_batch_total_size_bytes ({batch}): clients would "
            "send batches of the advertised size that this server refuses",
        )
    for key in ("grace_period_s", "upload_idle_timeout_s", "connection_idle_timeout_s"):
        value = getattr(config.server, key)
        if value != value:  # NaN compares false with everything, so `< 0` would let it pass
            fail(f"server.{key}", "must be a number of seconds, not nan")
        if value < 0:
            fail(f"server.{key}", "must not be negative")


def _check_processes(config: Config, fail: Any) -> None:
    """`server.processes`: in range, and with more than one, only what N processes can share."""
    n = config.server.processes
    if not 1 <= n <= MAX_SLOTS:
        fail("server.processes", f"must be between 1 and {MAX_SLOTS}")
    if n == 1:
        return
    for i, addr in enumerate(config.server.listen):
        if parse_listen(addr)[1] == 0:
            fail(
                f"server.listen[{i}]",
                f"port 0 would give each of the {n} processes its own port; with "
                "server.processes > 1 name the port",
            )
    why = f"is not shared between processes (server.processes = {n})"
    for key, node in _store_nodes("cas", config.cas):
        if isinstance(node, MemoryStoreConfig):
            fail(
                key,
                f"type = 'memory' {why}: blobs stored through one process would be missing in "
                "the others; use 'filesystem' (or memory as the `fast` of a fast_slow store)",
            )
    ac = config.action_cache
    while isinstance(ac, CompletenessCheckingActionCacheConfig):
        ac = ac.inner
    if isinstance(ac, MemoryActionCacheConfig | FilesystemActionCacheConfig):
        fail(
            "action_cache",
            f"type = {ac.__struct_config__.tag!r} {why}: each process would keep its own index "
            "of results; use type = 'redis' (or 'grpc')",
        )


def _store_nodes(prefix: str, node: Any) -> list[tuple[str, Any]]:
    """Every store in a tree with its key, except the per-process `fast` caches of fast_slow
    stores (a cache of the shared `slow` store needs no sharing)."""
    out = [(prefix, node)]
    for child in ("inner", "slow", "small", "large"):
        if hasattr(node, child):
            out += _store_nodes(f"{prefix}.{child}", getattr(node, child))
    if isinstance(node, FastSlowStoreConfig) and not isinstance(node.fast, MemoryStoreConfig):
        out += _store_nodes(f"{prefix}.fast", node.fast)
    for i, shard in enumerate(getattr(node, "shards", ())):
        out += _store_nodes(f"{prefix}.shards[{i}].store", shard.store)
    return out


def check_processes_role(config: Config, role: str) -> None:
    """Several processes only where they can share everything: roles without a scheduler, and
    `reexecd scheduler` with its state on Redis (each process then dispatches to the workers
    connected to it, from the shared queues). `reexecd serve` never: each process would run a
    local worker of its own."""
    n = config.server.processes
    if n <= 1:
        return
    if role == "serve":
        raise ConfigError(
            f"server.processes = {n}: `reexecd serve` runs one local worker per process; use "
            "`reexecd scheduler` with [scheduler.state] type = 'redis' and separate workers"
        )
    if role == "scheduler" and config.scheduler.state.type != "redis":
        raise ConfigError(
            f"server.processes = {n}: the scheduler role needs its operations, queues and "
            "workers shared between the processes: set [scheduler.state] type = 'redis' "
            "(with its url), or use processes = 1"
        )


def _check_store(prefix: str, node: Any, fail: Any) -> None:
    """What msgspec's types cannot say about a store tree: URLs, shard names and weights."""
    if isinstance(node, GrpcStoreConfig | GrpcActionCacheConfig):
        try:
            channel_factory(node.url, tls_ca=node.tls_ca)
        except ValueError as e:
            fail(f"{prefix}.url", str(e))
        if not node.timeout_s > 0:
            fail(f"{prefix}.timeout_s", "must be a positive number of seconds")
    if isinstance(node, ShardStoreConfig):
        if not node.shards:
            fail(f"{prefix}.shards", "at least one shard is required")
        names = [shard.name for shard in node.shards]
        for i, shard in enumerate(node.shards):
            if not shard.name or shard.name in names[:i]:
                fail(f"{prefix}.shards[{i}].name", "shard names must be unique and not empty")
            if not shard.weight > 0:
                fail(f"{prefix}.shards[{i}].weight", "must be a positive number")
            _check_store(f"{prefix}.shards[{i}].store", shard.store, fail)
    for child in ("inner", "fast", "slow", "small", "large"):
        if hasattr(node, child):
            _check_store(f"{prefix}.{child}", getattr(node, child), fail)


def _sizes(config: Config) -> list[tuple[str, int | str]]:
    out: list[tuple[str, int | str]] = [
        ("server.max_batch_total_size_bytes", config.server.max_batch_total_size_bytes),
        ("server.max_inline_bytes", config.server.max_inline_bytes),
        ("server.max_receive_message_bytes", config.server.max_receive_message_bytes),
    ]

    def walk(prefix: str, node: Any) -> None:
        for size_key in ("max_bytes", "threshold"):
            if hasattr(node, size_key):
                out.append((f"{prefix}.{size_key}", getattr(node, size_key)))
        for child in ("inner", "fast", "slow", "small", "large"):
            if hasattr(node, child):
                walk(f"{prefix}.{child}", getattr(node, child))
        for i, shard in enumerate(getattr(node, "shards", ())):
            walk(f"{prefix}.shards[{i}].store", shard.store)

    out.append(("worker.cache_max_bytes", config.worker.cache_max_bytes))
    walk("cas", config.cas)
    if config.worker.cas is not None:
        walk("worker.cas", config.worker.cas)
    walk("action_cache", config.action_cache)
    return out


def parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{addr!r} is not host:port (e.g. '127.0.0.1:8980' or '[::1]:8980')")
    if int(port) > 65535:
        raise ValueError(f"port {port} is out of range")
    return host.strip("[]"), int(port)


# -- error explanations -----------------------------------------------------------------------

_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$")


def _raw_toml(text: bytes) -> Any:
    try:
        return tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


def explain(message: str, raw: Any = None) -> str:
    """Turn msgspec's message into one naming the key and the allowed keys or values."""
    m = _AT.match(message)
    # msgspec omits the ` - at `$...`` suffix for errors at the top level.
    msg, path = (m.group("msg"), m.group("path")) if m else (message, "")
    key = path.lstrip(".") or "(top level)"
    parts = [p for p in re.split(r"\.|\[\d+\]", path) if p]
    owner = _select_by_tag(_type_at(Config, parts), _raw_at(raw, parts))
    unknown = re.match(r"Object contains unknown field `(.+)`", msg)
    if unknown:
        allowed = _fields_of(owner)
        where = key if path else "top level"
        return f"{where}: unknown key {unknown.group(1)!r}; allowed keys: {', '.join(allowed)}"
    if key.endswith(".type") or key == "type":
        parent = _type_at(Config, [p for p in re.split(r"\.|\[\d+\]", path) if p][:-1])
        tags = _tags_of(parent)
        if tags:
            return f"{key}: {msg.lower()}; allowed types: {', '.join(tags)}"
    if msg == "Object missing required field `type`":
        tags = _tags_of(_type_at(Config, parts))
        if tags:
            return f"{key}: missing key 'type'; allowed types: {', '.join(tags)}"
    if msg.startswith("Invalid enum value"):
        values = _literal_values(Config, [p for p in re.split(r"\.|\[\d+\]", path) if p])
        if values:
            return f"{key}: {msg}; allowed values: {', '.join(map(repr, values))}"
    return f"{key}: {msg}"


def _raw_at(raw: Any, parts: list[str]) -> Any:
    for part in parts:
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _select_by_tag(tp: Any, raw: Any) -> Any:
    """Narrow a tagged union to the member the user's `type = ...` names."""
    if isinstance(raw, dict) and "type" in raw:
        for t in _unwrap(tp):
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                if t.__struct_config__.tag == raw["type"]:
                    return t
    return tp


def _unwrap(tp: Any) -> list[Any]:
    if get_origin(tp) is Union or type(tp).__name__ == "UnionType":
        return [t for arg in get_args(tp) for t in _unwrap(arg)]
    if get_origin(tp) is list:
        return _unwrap(get_args(tp)[0])
    return [tp]


def _type_at(tp: Any, parts: list[str]) -> Any:
    """The type (possibly a Union) at a path of field names, following every union member."""
    for part in parts:
        candidates = []
        for t in _unwrap(tp):
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                hints = get_type_hints(t)
                if part in hints:
                    candidates.append(hints[part])
        if not candidates:
            return None
        tp = Union[tuple(candidates)] if len(candidates) > 1 else candidates[0]  # noqa: UP007
    return tp


def _fields_of(tp: Any) -> list[str]:
    names: list[str] = []
    for t in _unwrap(tp):
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            # A tagged struct's tag field (`type`) is a key the user may write too.
            tag_field = t.__struct_config__.tag_field
            fields = ([tag_field] if tag_field else []) + list(t.__struct_fields__)
            names += [f for f in fields if f not in names]
    return names


def _tags_of(tp: Any) -> list[str]:
    return [
        t.__struct_config__.tag
        for t in _unwrap(tp)
        if isinstance(t, type) and issubclass(t, msgspec.Struct) and t.__struct_config__.tag
    ]


def _literal_values(root: Any, parts: list[str]) -> list[Any]:
    tp = _type_at(root, parts)
    return [v for t in _unwrap(tp) if get_origin(t) is Literal for v in get_args(t)]
