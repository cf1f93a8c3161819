"""Configuration of a worker: its identity, slots, directories and action sandbox.

`reexec/sandbox/factory.py` builds the worker from it; the daemon only loads it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from reexec.cas.config import StoreConfig
from reexec.cas.grpc_store import channel_factory
from reexec.configtypes import ByteSize, ConfigStruct


class SandboxConfig(ConfigStruct):
    confinement: Literal["host", "input_root", "off"] = "host"
    """How actions are confined (bubblewrap: own mount, PID, IPC, UTS, network and user
    namespaces, never host root). `host`: the host read-only, only the exec root and a private
    /tmp writable (Bazel). `input_root`: the input root is `/` (BuildStream). `off`: actions
    run on the host as the worker's user (or `run_as`); the worker refuses to start confined
    where the kernel allows no namespaces, and says why."""
    input_root_ro_binds: list[str] = msgspec.field(default_factory=list)
    """`input_root` mode: host paths bound read-only inside, as "SRC" or "SRC:DEST"."""
    run_as: str | None = None
    """Run actions as this user (name or uid); the worker itself runs as root then. Confined
    actions run bwrap as this user (default: nobody when the worker is root)."""
    network: bool = False
    """A private network namespace (loopback only) for every action. Confined actions always
    get one unless they ask for `network=on`; true refuses them that."""
    pid: bool = False
    """A private PID namespace for every action (confinement "off" only: confined actions
    always have one)."""
    private_tmp: bool = False
    """A private, empty /tmp for every action (confinement "off" only: confined actions always
    have one)."""
    allow_absolute_symlinks: bool = False
    """Accept input symlinks with absolute targets."""
    kill_grace_s: float = 5.0
    """On timeout or cancel: SIGTERM to the action's process group, SIGKILL this much later."""


class WorkerConfig(ConfigStruct):
    enabled: bool = True
    """`reexecd serve` runs a local worker (ignored by `reexecd scheduler` and `worker`)."""
    scheduler: str | list[str] = ""
    """grpc://host:port or grpcs://host:port of the scheduler (`reexecd worker`), or a list of
    them (schedulers sharing their state): the worker holds one stream at a time and moves to
    the next scheduler in the list when its scheduler goes away, carrying its running actions
    and the results it holds (`reexec/sandbox/agent.py`). They must serve the same CAS."""
    instance_name: str = ""
    """Instance name used for the worker's own CAS reads and writes."""
    worker_id: str = ""
    """Stable id; default: the host name (plus the data directory in `serve`)."""
    platform: dict[str, str | list[str]] = msgspec.field(default_factory=dict)
    """Platform properties offered to the scheduler (a list gives several values)."""
    max_inflight_tasks: int = 0
    """Concurrent actions; 0 means one per CPU."""
    work_directory: str = "work"
    """Where input roots are built; must be on the cache's file system for hardlinks."""
    cache_directory: str = "worker-cache"
    cache_max_bytes: ByteSize = "10GiB"
    upload_timeout_s: float = 600.0
    max_output_bytes: ByteSize = "4GiB"
    """The most one action may produce: output files, stdout and stderr together. Beyond it (or
    beyond the CAS's largest blob) the action fails with RESOURCE_EXHAUSTED, not retried,
    naming the output; files are measured before they are read. 0 means no limit."""
    max_stdio_bytes: ByteSize = "256MiB"
    """The most an action may write to stdout, and to stderr (each): checked while it runs
    (every 0.25 s; the action is killed) and again at the end; same failure. 0: none."""
    drain_timeout_s: float = 300.0
    """On SIGTERM, how long running actions may finish before they are cancelled."""
    precondition_script: str | None = None
    """Run before accepting each action; a non-zero exit declines it (offered elsewhere)."""
    scheduler_keepalive_s: float = 10.0
    """While connected, an HTTP/2 PING to the scheduler this often; one unanswered for as long
    ends the connection (a host gone silent, a stopped process), and the worker moves to the
    next scheduler. 0: off (a vanished host is then noticed only by TCP, after minutes)."""
    tls_ca: str | None = None
    """CA bundle to verify a grpcs:// scheduler."""
    token_file: str | None = None
    """A file holding the scheduler's worker token (its `scheduler.worker_token_file`)."""
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)
    cas: StoreConfig | None = None
    """`reexecd worker`: the store it reads inputs from and writes outputs to, e.g. a `shard`
    of `grpc` stores on the storage nodes. Default: the scheduler's CAS (`worker.scheduler`).
    It must hold the same blobs the scheduler's CAS does."""


class SchedulerUrlError(ValueError):
    """A bad `worker.scheduler`: `key` is the suffix naming the entry ("" or "[i]")."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"worker.scheduler{key}: {why}")
        self.key = key
        self.why = why


def scheduler_urls(value: str | list[str]) -> list[str]:
    """The schedulers `worker.scheduler` names, in order: [] when unset (the empty string), or
    SchedulerUrlError for an empty list, an entry that is not grpc://HOST:PORT or
    grpcs://HOST:PORT, or an entry listed twice."""
    if isinstance(value, str):
        urls, index = ([value] if value else []), False
    else:
        urls, index = list(value), True
        if not urls:
            raise SchedulerUrlError(
                "", "the list is empty; name at least one grpc://HOST:PORT or grpcs://HOST:PORT"
            )
    for i, url in enumerate(urls):
        key = f"[{i}]" if index else ""
        try:
            channel_factory(url)
        except ValueError as e:
            raise SchedulerUrlError(key, str(e)) from None
        if url in urls[:i]:
            raise SchedulerUrlError(key, f"{url!r} is listed twice")
    return urls


def platform_pairs(platform: dict[str, str | list[str]]) -> list[tuple[str, str]]:
    """The (name, value) pairs a worker registers with; a list value gives several pairs."""
    out = []
    for name, value in sorted(platform.items()):
        for v in [value] if isinstance(value, str) else value:
            out.append((name, v))
    return out
