"""The worker agent: one WorkerApi.Connect stream to a scheduler, actions run concurrently.

    WorkerAgent.run
    └─ actions nursery (outlives connections: an action keeps running while we reconnect)
       ├─ _drain_when_asked      the scheduler's Drain request -> drain()
       ├─ action tasks           ActionExecutor.execute -> Finished, each in its own cancel
       │                         scope (CancelExecute, drain timeout)
       └─ _stay_connected        reconnect loop over the scheduler list, exponential backoff
          └─ session nursery     one per connection, after Register and the held results
             ├─ _keepalive       Keepalive and a Progress per running action every interval
             ├─ _send_held_later a result held during the session (its send failed), again
             └─ _receive         StartExecute -> precondition script -> start an action task

**Several schedulers.** The agent is given a list of schedulers (`worker.scheduler`, one URL
or several sharing their operations' state). It holds one stream at a time; when a session
ends or cannot start (stream error, connection refused, no Registered within
REGISTER_TIMEOUT_S, an HTTP/2 PING unanswered: the channels' keepalive, set by the worker role
from `worker.scheduler_keepalive_s`), it tries the next scheduler in the list, at once, and
sleeps only after a whole round of the list failed (0.2 s, doubling up to `reconnect_max_s`; back to 0.2 s after
any session that registered). `scheduler_url` is the scheduler of the current session.

**Results are held, not dropped.** A Finished that cannot be sent (no connection, or the send
fails) is held in `pending` (`pending_results.py`: oldest first, at most
`max_pending_results` messages and `max_pending_bytes` serialized bytes; beyond either bound
the oldest is dropped with a warning). The action's slot is free once it has ended (its
processes and work directory are gone); only the message waits. The next session's Register
names exactly the attempts still running (`running`, plus `running_operations` for older
schedulers) and the results held (`pending_results`); right after Registered, before the agent
reads any StartExecute, it sends every held result, oldest first, each removed once sent. So a
scheduler that shares the operations' state can adopt the running attempts and complete the
held ones; a scheduler that requeued them when the old connection ended ignores the stale
results and cancels the stale attempts. As no new work is taken while held results wait, held
results rarely outnumber the slots; the bounds guard against large messages. "Sent"
means handed to the stream: a result in flight when the connection breaks is lost, and its
attempt is requeued by the scheduler like any attempt of a lost worker. A result may reach a
scheduler twice (sent, then the stream failed before the send returned); schedulers ignore a
second Finished of an attempt that is no longer running.

`drain` sends GoingAway, lets running actions finish (up to the drain timeout), gives held
results a bounded time to be sent (reconnecting if need be), then stops.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from grpclib.client import Channel
from grpclib.const import Cardinality

from reexec import fastpb
from reexec.grpc_client import aio, open_stream
from reexec.sandbox.executor import ActionExecutor
from reexec.sandbox.pending_results import Attempt, PendingResults
from reexec.worker_protocol import (
    CONNECT,
    WORKER_TOKEN_HEADER,
    LocalLink,
    SchedulerMessage,
    WorkerMessage,
    WorkerStream,
)

log = logging.getLogger(__name__)

ChannelFactory = Callable[[], Awaitable[Channel]]

# A scheduler that accepts the stream but does not answer Register within this long (stalled,
# overloaded) counts as failed: the agent moves to the next one.
REGISTER_TIMEOUT_S = 30.0
_FIRST_DELAY_S = 0.2


@dataclass(frozen=True)
class SchedulerEndpoint:
    """One scheduler the agent may connect to: a name for logs and status, and its channels,
    or (`link`) the in-process stream of a scheduler in this process (`reexecd serve`)."""

    url: str
    connect: ChannelFactory | None = None
    link: LocalLink | None = None


@dataclass
class AgentSettings:
    worker_id: str
    platform: Sequence[tuple[str, str]] = ()
    max_inflight: int = 1
    precondition_script: str | None = None
    drain_timeout_s: float = 300.0
    reconnect_max_s: float = 30.0
    # The scheduler's worker token (sent as WORKER_TOKEN_HEADER), if it requires one.
    token: str | None = None
    # Bounds of the results held while no scheduler can take them (see the module docstring).
    max_pending_results: int = 1000
    max_pending_bytes: int = 64 * 1024 * 1024


# An executor's phase change (fetching, executing, uploading) is reported to the scheduler only
# when the attempt's last report is at least this old. The scheduler keeps only the time of the
# last report (its no-progress timeout, minutes), and the keepalive reports every running
# attempt each interval anyway; a report per phase cost a message and a record write per phase
# (three per action), most of them milliseconds apart.
PHASE_REPORT_MIN_INTERVAL_S = 1.0


@dataclass
class _Running:
    name: str
    attempt: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # When the scheduler last heard of this attempt (its dispatch counts as a report).
    reported_at: float = field(default_factory=trio.current_time)


class WorkerAgent:
    def __init__(
        self,
        settings: AgentSettings,
        executor: ActionExecutor,
        schedulers: Sequence[SchedulerEndpoint] | ChannelFactory | LocalLink,
        *,
        on_connected: Callable[[SchedulerEndpoint], None] | None = None,
    ) -> None:
        """`schedulers`: the list to rotate through, or one channel factory or in-process link
        (`serve`'s local scheduler, named "local"). `on_connected` is called once a session has registered,
        before held results are sent or work is accepted (the worker role points its CAS
        reads at that scheduler)."""
        self.settings = settings
        self.executor = executor
        if isinstance(schedulers, LocalLink):
            schedulers = [SchedulerEndpoint("local", link=schedulers)]
        elif callable(schedulers):
            schedulers = [SchedulerEndpoint("local", schedulers)]
        if not schedulers:
            raise ValueError("a worker needs at least one scheduler")
        self.schedulers: list[SchedulerEndpoint] = list(schedulers)
        self.on_connected = on_connected
        self.scheduler_url: str | None = None
        self.running: dict[Attempt, _Running] = {}
        self.pending = PendingResults(settings.max_pending_results, settings.max_pending_bytes)
        self._all_sent = trio.Event()
        self._all_sent.set()
        self._held = trio.Event()  # set when a result is held; the session sends it
        self.results_held = 0
        self.results_sent_late = 0
        self._stream = None
        self._send_lock = trio.Lock()
        self._going_away = False
        self._drain_asked = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.connected = trio.Event()
        self.stopped = trio.Event()
        self.completed = 0
        self.declined = 0
        self.sessions = 0

    @property
    def draining(self) -> bool:
        return self._going_away

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected (reconnecting with backoff) until cancelled or drained."""
        await self.executor.start()
        task_status.started()
        try:
            async with trio.open_nursery() as actions:
                actions.start_soon(self._drain_when_asked)
                await self._stay_connected(actions)
                actions.cancel_scope.cancel()
        finally:
            self.stopped.set()

    async def _drain_when_asked(self) -> None:
        await self._drain_asked.wait()
        await self.drain()

    def _done(self) -> bool:
        return self._going_away and not self.running and not self.pending

    async def _stay_connected(self, actions: trio.Nursery) -> None:
        """One session at a time, moving to the next scheduler whenever one ends or fails."""
        delay = _FIRST_DELAY_S
        index = 0
        failed = 0  # consecutive failed attempts since the last sleep
        while not self._done():
            endpoint = self.schedulers[index]
            sessions = self.sessions
            problem = "the session ended"
            try:
                await self._session(actions, endpoint)
            except Exception as e:
                problem = _describe(e)
            self.connected = trio.Event()
            if self._done():
                break
            index = (index + 1) % len(self.schedulers)
            if self.sessions > sessions:  # it registered: start over, from the next one
                delay, failed = _FIRST_DELAY_S, 0
                log.warning(
                    "lost the scheduler %s: %s; connecting to %s",
                    endpoint.url,
                    problem,
                    self.schedulers[index].url,
                )
                await trio.sleep(delay)
                continue
            failed += 1
            if failed < len(self.schedulers):
                log.warning(
                    "scheduler %s: %s; trying %s", endpoint.url, problem, self.schedulers[index].url
                )
                continue
            log.warning("scheduler %s: %s; retrying in %.1fs", endpoint.url, problem, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)
            failed = 0

    async def drain(self) -> None:
        """GoingAway: no new work; wait for running actions up to the drain timeout."""
        if self._going_away:  # already draining (asked by the scheduler and by a signal)
            with trio.move_on_after(self.settings.drain_timeout_s + 30):
                await self.stopped.wait()
            return
        self._going_away = True
        await self._send_going_away()
        log.info("draining: %d action(s) running", len(self.running))
        with trio.move_on_after(self.settings.drain_timeout_s):
            await self._wait_idle()
        for r in list(self.running.values()):
            log.warning("drain timeout: cancelling %s", r.name)
            r.scope.cancel()
        with trio.move_on_after(10):
            await self._wait_idle()
        if self.pending:
            log.info("draining: %d result(s) to send", len(self.pending))
            with trio.move_on_after(max(10.0, self.settings.reconnect_max_s)):
                await self._all_sent.wait()
            for name, attempt in self.pending.keys():
                log.warning("drained without sending the result of %s attempt %d", name, attempt)
        # Half-close the stream: every Finished already sent is delivered before the scheduler
        # sees the end, and `run` returns once the scheduler closes its side.
        stream = self._stream
        if stream is not None:
            with trio.move_on_after(5):
                async with self._send_lock:
                    await stream.end()
            with trio.move_on_after(10):
                await self.stopped.wait()

    async def _wait_idle(self) -> None:
        while self.running:
            await self._idle.wait()

    async def _send_going_away(self) -> None:
        msg = WorkerMessage()
        msg.going_away.SetInParent()
        try:
            await self._send(msg)
        except Exception:
            pass

    # -- the connection -------------------------------------------------------------------------

    def _register_message(self) -> fastpb.Message:
        reg = WorkerMessage()
        r = reg.register
        r.worker_id = self.settings.worker_id
        r.max_inflight_tasks = self.settings.max_inflight
        for name, value in self.settings.platform:
            r.platform.properties.add(name=name, value=value)
        for name, attempt in self.running:
            r.running_operations.append(name)
            r.running.add(operation_name=name, attempt=attempt)
        for name, attempt in self.pending.keys():
            r.pending_results.add(operation_name=name, attempt=attempt)
        return reg

    async def _session(self, actions: trio.Nursery, endpoint: SchedulerEndpoint) -> None:
        """Register with `endpoint`, send the held results, then serve until the stream ends
        (raises unless we are going away and the scheduler closed it)."""
        token = self.settings.token
        async with _open_stream(
            endpoint, {WORKER_TOKEN_HEADER: token} if token else None
        ) as stream:
            with trio.fail_after(REGISTER_TIMEOUT_S):
                await stream.send_message(self._register_message())
                hello = await stream.recv_message()
            if hello is None or hello.WhichOneof("kind") != "registered":
                raise ConnectionError("the scheduler did not acknowledge Register")
            interval = hello.registered.keepalive_interval.ToNanoseconds() / 1e9 or 1.0
            self._stream = stream
            self.scheduler_url = endpoint.url
            self.sessions += 1
            log.info(
                "connected to the scheduler %s as %s (%d running, %d result(s) to send)",
                endpoint.url,
                self.settings.worker_id,
                len(self.running),
                len(self.pending),
            )
            if self.on_connected is not None:
                self.on_connected(endpoint)
            self.connected.set()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive, interval)
                    self._held = trio.Event()
                    await self._send_held(endpoint)
                    nursery.start_soon(self._send_held_later, endpoint)
                    if self._going_away:
                        await self._send_going_away()
                    await self._receive(stream, actions)
                    nursery.cancel_scope.cancel()
            finally:
                self._stream = None
                self.scheduler_url = None

    async def _send_held(self, endpoint: SchedulerEndpoint) -> None:
        """Every held result, oldest first, each removed once sent; a result finishing
        meanwhile is held too (see `_deliver`), so it is sent by this loop, in order."""
        while (item := self.pending.oldest()) is not None:
            key, msg = item
            await self._send(msg)
            if self.pending.remove(key):
                self.results_sent_late += 1
                log.info("sent the held result of %s attempt %d to %s", *key, endpoint.url)
        self._all_sent.set()

    async def _send_held_later(self, endpoint: SchedulerEndpoint) -> None:
        """A result held during the session (its send failed: the stream is probably broken)
        is sent again here; if that fails too, the session ends and the next one sends it."""
        while True:
            await self._held.wait()
            self._held = trio.Event()
            await self._send_held(endpoint)

    async def _deliver(self, key: Attempt, msg: fastpb.Message) -> None:
        """Send a result now if connected and no older one waits; otherwise hold it."""
        if self._stream is not None and not self.pending:
            try:
                await self._send(msg)
                return
            except Exception as e:
                log.warning(
                    "result of %s attempt %d not sent (%s): held until a scheduler takes it",
                    *key,
                    e,
                )
        self.results_held += 1
        if self._all_sent.is_set():
            self._all_sent = trio.Event()
        for name, attempt in self.pending.add(key, msg):
            log.warning(
                "result of %s attempt %d dropped: more than %d results or %d bytes held",
                name,
                attempt,
                self.pending.max_count,
                self.pending.max_bytes,
            )
        if not self.pending:
            self._all_sent.set()
        self._held.set()

    async def _send(self, msg: fastpb.Message) -> None:
        stream = self._stream
        if stream is None:
            raise ConnectionError("not connected")
        async with self._send_lock:
            await stream.send_message(msg)

    async def _keepalive(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            ka = WorkerMessage()
            ka.keepalive.SetInParent()
            await self._send(ka)
            for r in list(self.running.values()):
                await self._progress(r, 0)

    async def _progress(self, r: _Running, phase: int) -> None:
        msg = WorkerMessage()
        p = msg.progress
        p.operation_name, p.attempt, p.phase = r.name, r.attempt, phase
        r.reported_at = trio.current_time()
        try:
            await self._send(msg)
        except Exception:
            pass

    async def _receive(self, stream, actions: trio.Nursery) -> None:  # type: ignore[no-untyped-def]
        while (msg := await stream.recv_message()) is not None:
            kind = msg.WhichOneof("kind")
            if kind == "start_execute":
                await self._accept(msg.start_execute, actions)
            elif kind == "drain":
                log.info("the scheduler asks this worker to drain: %s", msg.drain.reason)
                self._drain_asked.set()
            elif kind == "cancel_execute":
                c = msg.cancel_execute
                for (name, attempt), r in list(self.running.items()):
                    if name == c.operation_name and (c.attempt == 0 or attempt == c.attempt):
                        log.info("cancelling %s on the scheduler's request", name)
                        r.scope.cancel()
        if not self._going_away:
            raise ConnectionError("the scheduler closed the stream")

    async def _accept(self, start: fastpb.Message, actions: trio.Nursery) -> None:
        key = (start.operation_name, start.attempt)
        if key in self.running:
            return
        reason = None
        if self._going_away:
            reason = "the worker is draining"
        elif len(self.running) >= self.settings.max_inflight:
            reason = "no free slot"
        elif self.settings.precondition_script:
            reason = await self._precondition()
        if reason is not None:
            self.declined += 1
            msg = WorkerMessage()
            d = msg.declined
            d.operation_name, d.attempt, d.reason = start.operation_name, start.attempt, reason
            await self._send(msg)
            return
        r = self.running[key] = _Running(start.operation_name, start.attempt)
        self._idle = trio.Event()
        actions.start_soon(self._execute, start, r)

    async def _precondition(self) -> str | None:
        script = self.settings.precondition_script
        assert script
        try:
            with trio.fail_after(60):
                proc = await trio.run_process(
                    shlex.split(script), capture_stdout=True, capture_stderr=True, check=False
                )
        except (OSError, trio.TooSlowError) as e:
            return f"precondition script could not run: {e}"
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-200:]
            return f"precondition script exited {proc.returncode}: {tail}"
        return None

    async def _execute(self, start: fastpb.Message, r: _Running) -> None:
        key = (r.name, r.attempt)
        msg = None
        try:
            with r.scope:

                async def progress(phase: int) -> None:
                    if trio.current_time() - r.reported_at >= PHASE_REPORT_MIN_INTERVAL_S:
                        await self._progress(r, phase)

                msg = await self.executor.execute(start, progress)
            if msg is None or r.scope.cancelled_caught:
                msg = WorkerMessage()
                f = msg.finished
                f.operation_name, f.attempt = r.name, r.attempt
                f.retryable = self._going_away
                f.status.code = 1  # CANCELLED
                f.status.message = "cancelled on the worker"
            self.completed += 1
            # Sent (or held, without waiting, if there is no connection) before the slot is
            # freed, so a drain that waits for idle half-closes the stream after it.
            await self._deliver(key, msg)
        finally:
            del self.running[key]
            if not self.running:
                self._idle.set()


@asynccontextmanager
async def _open_stream(
    endpoint: SchedulerEndpoint, metadata: dict[str, str] | None
) -> AsyncIterator[WorkerStream]:
    """A Connect stream to `endpoint`: over its in-process link, or gRPC on a new channel
    (closed with the stream)."""
    if endpoint.link is not None:
        async with endpoint.link.connect(metadata) as local:
            yield local
        return
    assert endpoint.connect is not None
    channel = await endpoint.connect()
    try:
        async with open_stream(
            channel,
            CONNECT,
            Cardinality.STREAM_STREAM,
            WorkerMessage,
            SchedulerMessage,
            metadata=metadata,
        ) as stream:
            yield _GrpcWorkerStream(stream)
    finally:
        close = getattr(channel, "close", None)
        if close is not None:
            close()


class _GrpcWorkerStream:
    """A grpclib client stream as a WorkerStream: each call crosses into asyncio."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.metadata: dict[str, str] = {}

    async def send_message(self, msg: Any) -> None:
        await aio(self._stream.send_message, msg)

    async def send_messages(self, msgs: Sequence[Any]) -> None:
        for msg in msgs:
            await self.send_message(msg)

    async def recv_message(self) -> Any:
        return await aio(self._stream.recv_message)

    async def end(self) -> None:
        await aio(self._stream.end)


def _describe(e: BaseException) -> str:
    """The first error inside nested exception groups, as a log line can say it."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
