"""The worker agent: one WorkerApi.Connect stream to the scheduler, actions run concurrently.

    WorkerAgent.run
    └─ actions nursery (outlives connections: an action keeps running while we reconnect)
       ├─ _drain_when_asked      the scheduler's Drain request -> drain()
       ├─ action tasks           ActionExecutor.execute -> Finished, each in its own cancel
       │                         scope (CancelExecute, drain timeout)
       └─ _stay_connected        reconnect loop with exponential backoff
          └─ session nursery     one per connection
             ├─ _keepalive       Keepalive and a Progress per running action every interval
             └─ _receive         StartExecute -> precondition script -> start an action task

A result that finishes while the connection is down is dropped: the scheduler requeued that
attempt when the connection ended, and on Register it cancels what the worker still runs.
`drain` sends GoingAway, lets running actions finish (up to the drain timeout), then stops.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
from grpclib.client import Channel
from grpclib.const import Cardinality

from reexec import fastpb
from reexec.grpc_client import aio, open_stream
from reexec.sandbox.executor import ActionExecutor
from reexec.worker_protocol import (
    CONNECT,
    WORKER_TOKEN_HEADER,
    SchedulerMessage,
    WorkerMessage,
)

log = logging.getLogger(__name__)


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


@dataclass
class _Running:
    name: str
    attempt: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class WorkerAgent:
    def __init__(
        self,
        settings: AgentSettings,
        executor: ActionExecutor,
        channel_factory: Callable[[], Awaitable[Channel]],
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.channel_factory = channel_factory
        self.running: dict[tuple[str, int], _Running] = {}
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

    async def _stay_connected(self, actions: trio.Nursery) -> None:
        delay = 0.2
        while not (self._going_away and not self.running):
            try:
                await self._session(actions)
                delay = 0.2
            except Exception as e:
                log.warning("scheduler connection failed: %s; retrying in %.1fs", e, delay)
            self.connected = trio.Event()
            if self._going_away and not self.running:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)

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
        # Half-close the stream: every Finished already sent is delivered before the scheduler
        # sees the end, and `run` returns once the scheduler closes its side.
        stream = self._stream
        if stream is not None:
            with trio.move_on_after(5):
                async with self._send_lock:
                    await aio(stream.end)
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

    async def _session(self, actions: trio.Nursery) -> None:
        channel = await self.channel_factory()
        try:
            token = self.settings.token
            async with open_stream(
                channel,
                CONNECT,
                Cardinality.STREAM_STREAM,
                WorkerMessage,
                SchedulerMessage,
                metadata={WORKER_TOKEN_HEADER: token} if token else None,
            ) as stream:
                reg = WorkerMessage()
                r = reg.register
                r.worker_id = self.settings.worker_id
                r.max_inflight_tasks = self.settings.max_inflight
                for name, value in self.settings.platform:
                    r.platform.properties.add(name=name, value=value)
                r.running_operations.extend(name for name, _ in self.running)
                await aio(stream.send_message, reg)
                hello = await aio(stream.recv_message)
                if hello is None or hello.WhichOneof("kind") != "registered":
                    raise ConnectionError("the scheduler did not acknowledge Register")
                interval = hello.registered.keepalive_interval.ToNanoseconds() / 1e9 or 1.0
                self._stream = stream
                self.sessions += 1
                log.info("connected to the scheduler as %s", self.settings.worker_id)
                self.connected.set()
                try:
                    if self._going_away:
                        await self._send_going_away()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._keepalive, interval)
                        await self._receive(stream, actions)
                        nursery.cancel_scope.cancel()
                finally:
                    self._stream = None
        finally:
            close = getattr(channel, "close", None)
            if close is not None:
                close()

    async def _send(self, msg: fastpb.Message) -> None:
        stream = self._stream
        if stream is None:
            raise ConnectionError("not connected")
        async with self._send_lock:
            await aio(stream.send_message, msg)

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
        try:
            await self._send(msg)
        except Exception:
            pass

    async def _receive(self, stream, actions: trio.Nursery) -> None:  # type: ignore[no-untyped-def]
        while (msg := await aio(stream.recv_message)) is not None:
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
            try:
                await self._send(msg)
            except Exception as e:
                # The scheduler requeued this attempt when the connection ended (see above).
                log.warning("result of %s attempt %d not delivered: %s", r.name, r.attempt, e)
        finally:
            del self.running[key]
            if not self.running:
                self._idle.set()
