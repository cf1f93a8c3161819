"""Fixtures of the hardening suite: one in-process daemon per module, a raw-bytes gRPC client.

Hypothesis runs each example of an async pytest-trio test in a fresh `trio.run`, which would
start a daemon per example. Instead the daemon (`tests.conftest.start_daemon`, `make_config`)
runs in a background thread with its own Trio run and trio-asyncio loop, once per module, and
the property tests are plain synchronous hypothesis tests. They talk to it with grpcio's generic
client (a different gRPC implementation from the server's grpclib, as real clients are) whose
requests and responses are raw bytes: a test can send any byte string as a message.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import hypothesis
import hypothesis.errors
import pytest
import trio
import trio_asyncio

from reexec import fastpb
from reexec.daemon.app import Daemon
from reexec.daemon.config import Config, SchedulerConfig
from tests.conftest import make_config, open_channel, start_daemon

REAPI = "/build.bazel.remote.execution.v2."
CAS = REAPI + "ContentAddressableStorage/"
AC = REAPI + "ActionCache/"
EXECUTION = REAPI + "Execution/"
CAPABILITIES = REAPI + "Capabilities/GetCapabilities"
BYTESTREAM = "/google.bytestream.ByteStream/"
OPERATIONS = "/google.longrunning.Operations/"

# Statuses that mean "the server did not understand its own failure".
BAD_STATUSES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

# The scheduler of the module daemons knows these properties; the fake worker offers the
# values below, so an action asking for os=other is queued for ever (an operation that stays
# live for the Operations fuzzers).
SUPPORTED_PROPERTIES = {"os": "exact", "pool": "exact", "cores": "minimum"}
WORKER_PLATFORM = {"os": "linux", "cores": "4"}

# A client-side deadline on a request that should be answered at once: a hang.
CALL_TIMEOUT_S = 10.0


def sha(data: bytes) -> Any:
    return fastpb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@dataclass
class Outcome:
    """What one call produced: OK with the response messages, or a status and its message."""

    code: grpc.StatusCode
    details: str = ""
    responses: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details[:300]!r} ({len(self.responses)} responses)"


def _outcome(fn: Callable[[], Iterable[bytes] | bytes]) -> Outcome:
    try:
        got = fn()
        responses = [got] if isinstance(got, bytes) else list(got)
        return Outcome(grpc.StatusCode.OK, responses=responses)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")  # type: ignore[attr-defined]


class RawClient:
    """grpcio with identity (de)serialisers: messages are bytes on both sides."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.enable_retries", 0),
            ],
        )

    def close(self) -> None:
        self.channel.close()

    def unary(self, method: str, request: bytes, timeout: float = CALL_TIMEOUT_S) -> Outcome:
        return _outcome(lambda: self.channel.unary_unary(method)(request, timeout=timeout))

    def server_stream(
        self, method: str, request: bytes, timeout: float = CALL_TIMEOUT_S
    ) -> Outcome:
        return _outcome(lambda: self.channel.unary_stream(method)(request, timeout=timeout))

    def client_stream(
        self, method: str, requests: Iterable[bytes], timeout: float = CALL_TIMEOUT_S
    ) -> Outcome:
        return _outcome(lambda: self.channel.stream_unary(method)(iter(requests), timeout=timeout))

    # -- typed helpers for setting up and checking health ------------------------------------

    def upload(self, *blobs: bytes) -> list[Any]:
        req = fastpb.BatchUpdateBlobsRequest()
        for b in blobs:
            r = req.requests.add(data=b)
            r.digest.CopyFrom(sha(b))
        out = self.unary(CAS + "BatchUpdateBlobs", req.SerializeToString())
        assert out.ok, out
        resp = fastpb.BatchUpdateBlobsResponse.FromString(out.responses[0])
        assert all(r.status.code == 0 for r in resp.responses), resp
        return [sha(b) for b in blobs]

    def find_missing(self, *digests: Any) -> list[str]:
        req = fastpb.FindMissingBlobsRequest()
        for d in digests:
            req.blob_digests.add().CopyFrom(d)
        out = self.unary(CAS + "FindMissingBlobs", req.SerializeToString())
        assert out.ok, out
        return [
            d.hash
            for d in fastpb.FindMissingBlobsResponse.FromString(
                out.responses[0]
            ).missing_blob_digests
        ]

    def read_blob(self, digest: Any) -> bytes:
        req = fastpb.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")
        out = self.server_stream(BYTESTREAM + "Read", req.SerializeToString())
        assert out.ok, out
        return b"".join(fastpb.ReadResponse.FromString(r).data for r in out.responses)

    def action_request(
        self, args: list[str], *, salt: bytes = b"", output_paths: Iterable[str] = ()
    ) -> bytes:
        """Upload a do_not_cache Action running `args` on an empty input root; returns the
        serialised ExecuteRequest."""
        command = fastpb.Command(arguments=args, output_paths=list(output_paths))
        root = fastpb.Directory().SerializeToString()
        action = fastpb.Action(salt=salt, do_not_cache=True)
        action.command_digest.CopyFrom(sha(command.SerializeToString()))
        action.input_root_digest.CopyFrom(sha(root))
        self.upload(command.SerializeToString(), root, action.SerializeToString())
        req = fastpb.ExecuteRequest()
        req.action_digest.CopyFrom(sha(action.SerializeToString()))
        return req.SerializeToString()

    def execute(self, request: bytes, timeout: float = 60) -> Any:
        """Run an Execute stream to the end; returns the ExecuteResponse."""
        out = self.server_stream(EXECUTION + "Execute", request, timeout=timeout)
        assert out.ok, out
        op = fastpb.Operation.FromString(out.responses[-1])
        assert op.done, op
        resp = fastpb.ExecuteResponse()
        op.response.Unpack(resp)
        return resp


def note_event(name: str) -> None:
    """A hypothesis event (the mix shows with --hypothesis-show-statistics), if in a test."""
    try:
        hypothesis.event(name)
    except hypothesis.errors.InvalidArgument:
        pass  # called from a fixture, outside any example


def assert_precise(outcome: Outcome, what: object) -> None:
    """The property of the whole suite: success, or a status that names a client's fault."""
    note_event(outcome.code.name)
    assert outcome.code not in BAD_STATUSES, f"{outcome} for {what!r}"
    assert outcome.code is not grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"no answer within {CALL_TIMEOUT_S} s (a hang) for {what!r}"
    )


class ThreadDaemon:
    """An in-process daemon in its own thread (own `trio.run`), optionally with a fake worker
    that finishes every action it is given with exit code 0 and a stdout naming the action, or
    with the real local worker of `reexecd serve`."""

    def __init__(
        self, config: Config, *, fake_worker: bool = False, local_worker: bool = False
    ) -> None:
        self.config = config
        self.fake_worker = fake_worker
        self.local_worker = local_worker
        self.daemon: Daemon | None = None
        self.port = 0
        self.error: BaseException | None = None
        self.finished_actions = 0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._channels: list[Any] = []
        self._thread = threading.Thread(target=self._main, name="hardening-daemon", daemon=True)

    def start(self) -> ThreadDaemon:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the in-process daemon did not start within 60 s")
        if self.error is not None:
            raise RuntimeError("the in-process daemon failed to start") from self.error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as e:
            self.error = e
        finally:
            self._ready.set()

    async def _run(self) -> None:
        async with trio_asyncio.open_loop():
            try:
                await self._serve()
            finally:
                for channel in self._channels:
                    channel.close()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.daemon = await start_daemon(nursery, self.config, self.local_worker)
            self.port = self.daemon.port
            if self.fake_worker:
                await self._start_fake_worker(nursery)
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _start_fake_worker(self, nursery: trio.Nursery) -> None:
        from tests.fake_worker import FakeWorker

        channel = await open_channel(self.port)
        self._channels.append(channel)
        worker = FakeWorker(channel, "hardening-fake", slots=16, platform=WORKER_PLATFORM)
        await nursery.start(worker.run)

        async def finish_everything() -> None:
            while True:
                start = await worker._receive.receive()
                await worker.finish(start, exit_code=0, stdout=start.operation_name.encode())
                self.finished_actions += 1

        nursery.start_soon(finish_everything)

    def run_in_daemon(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an async function inside the daemon's Trio run; returns its result."""
        assert self._token is not None
        return trio.from_thread.run(functools.partial(fn, *args), trio_token=self._token)

    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)  # type: ignore[union-attr]
            except trio.RunFinishedError:
                pass
        self._thread.join(30)
        assert not self._thread.is_alive(), "the in-process daemon did not stop within 30 s"


@pytest.fixture(scope="module")
def thread_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadDaemon]:
    """A scheduler-enabled daemon (default config) with a fake worker that finishes everything."""
    data = tmp_path_factory.mktemp("hardening") / "data"
    sched = SchedulerConfig(supported_platform_properties=dict(SUPPORTED_PROPERTIES))
    d = ThreadDaemon(make_config(data, scheduler=sched), fake_worker=True).start()
    try:
        yield d
    finally:
        d.stop()
        assert d.error is None, f"the daemon's Trio run ended with {d.error!r}"


@pytest.fixture(scope="module")
def raw(thread_daemon: ThreadDaemon) -> Iterator[RawClient]:
    client = RawClient(thread_daemon.port)
    try:
        yield client
    finally:
        client.close()


class Health:
    """A normal request that must keep working whatever came before."""

    def __init__(self, daemon: ThreadDaemon, client: RawClient) -> None:
        self.daemon = daemon
        self.client = client
        self.canary = b"hardening canary blob"
        self.deep_checks = 0
        self.canary_digest = client.upload(self.canary)[0]
        from tests.hardening.strategies import KNOWN_BLOBS

        client.upload(*KNOWN_BLOBS)  # digests drawn by the strategies often name these

    def check(self, after: object = "") -> None:
        assert self.daemon.alive(), f"daemon thread died ({self.daemon.error!r}) after {after!r}"
        req = fastpb.FindMissingBlobsRequest()
        req.blob_digests.add().CopyFrom(self.canary_digest)
        out = self.client.unary(CAS + "FindMissingBlobs", req.SerializeToString(), timeout=10)
        assert out.ok, f"health check failed with {out} after {after!r}"
        missing = fastpb.FindMissingBlobsResponse.FromString(out.responses[0]).missing_blob_digests
        assert not missing, f"the canary blob vanished after {after!r}"

    def deep_check(self) -> None:
        """Upload and read back a fresh blob."""
        self.check("deep check")
        self.deep_checks += 1
        blob = b"fresh blob %d" % self.deep_checks
        (d,) = self.client.upload(blob)
        assert self.client.read_blob(d) == blob


@pytest.fixture(scope="module")
def health(thread_daemon: ThreadDaemon, raw: RawClient) -> Health:
    return Health(thread_daemon, raw)
