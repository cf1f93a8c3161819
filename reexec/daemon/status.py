"""The status endpoint: /status (JSON), /metrics (Prometheus), /healthz, /readyz, /drain, and
the web UI (`reexec/daemon/web/`: /, /operations, /operation/NAME, /action/HASH/SIZE, ...).

An ASGI app served by hypercorn inside the daemon's nursery, on a unix socket (mode 0660 by
default, so access is governed by file permissions) and optionally on TCP, where only the
read-only endpoints exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from reexec import __version__
from reexec.cas.action_cache import ActionCache
from reexec.cas.store import Store
from reexec.daemon.config import StatusConfig
from reexec.daemon.web.pages import Response, WebUI
from reexec.metrics import (
    CAS_BYTES,
    EXECUTION_DURATION,
    QUEUE_WAIT,
    RPC_DURATION,
    SCHEDULER_CAS_CONFLICTS,
    SCHEDULER_CAS_EXHAUSTED,
    STATE_STORE_ERRORS,
    STATE_STORE_LATENCY,
    CollectedCounter,
    Gauge,
    Registry,
)
from reexec.rpc import RpcGate, Service

log = logging.getLogger(__name__)


@dataclass
class StatusSources:
    """What a running daemon exposes to the status endpoint (any part may be absent)."""

    role: str
    listen: list[str] = field(default_factory=list)
    cas: Store | None = None
    ac: ActionCache | None = None
    services: list[Service] = field(default_factory=list)
    scheduler: Any = None  # reexec.sched.scheduler.Scheduler
    agent: Any = None  # reexec.sandbox.agent.WorkerAgent
    gate: RpcGate | None = None
    # Starts a graceful drain of this daemon (in the daemon's own nursery) and returns at once.
    drain_self: Callable[[], None] | None = None
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    # Recent operations for the web UI (a reexec.sched.journal.Journal; schedulers only).
    journal: Any = None
    settings: StatusConfig = field(default_factory=StatusConfig)


def _ac_counts(sources: StatusSources) -> tuple[int, int]:
    for s in sources.services:
        if hasattr(s, "hits") and hasattr(s, "misses"):
            return s.hits, s.misses
    return 0, 0


def collect_status(sources: StatusSources) -> dict[str, Any]:
    now = time.time()
    doc: dict[str, Any] = {
        "role": sources.role,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(now - sources.started_at, 1),
        "draining": sources.draining,
        "listen": sources.listen,
    }
    if sources.cas is not None:
        hits, misses = _ac_counts(sources)
        doc["stores"] = {
            "cas": sources.cas.stats(),
            "action_cache": sources.ac.stats() if sources.ac is not None else {},
        }
        doc["action_cache"] = {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        }
    sched = sources.scheduler
    if sched is not None:
        mono = sched.now()
        workers = []
        for w in sorted(sched.workers.values(), key=lambda w: w.worker_id):
            running = []
            for name, attempt in sorted(w.running):
                op = sched.peek(name)
                running.append(
                    {
                        "operation": name,
                        "attempt": attempt,
                        "action": f"{op.action_key[1]}/{op.action_key[2]}" if op else "",
                        "age_s": round(mono - op.dispatched_at, 1) if op else None,
                    }
                )
            workers.append(
                {
                    "id": w.worker_id,
                    "properties": {k: sorted(v) for k, v in sorted(w.properties.items())},
                    "slots": w.max_inflight,
                    "in_use": len(w.running),
                    "last_keepalive_s": round(mono - w.last_seen, 1),
                    "draining": w.going_away,
                    "running": running,
                }
            )
        st = sched.stats
        doc["scheduler"] = {
            "queues": [
                {"properties": dict(key), "depth": depth}
                for key, depth in sorted(sched.queue_depths().items())
            ],
            "queued": sched.queued(),
            "operations": sched.operations_by_stage(),
            "workers": workers,
            "totals": {
                "executes": st.executes,
                "merged": st.merged,
                "cache_hits": st.cache_hits,
                "dispatched": st.dispatched,
                "retries": st.retries,
                "completed": dict(st.completed),
                "cancelled_unwatched": st.cancelled_unwatched,
                "workers_lost": st.workers_lost,
                "conflicts": st.conflicts,
                "adopted": st.adopted,
                "leases_expired": st.leases_expired,
            },
            "state": _state_view(sched, mono),
        }
    journal = sources.journal
    if journal is not None:
        doc["journal"] = {
            "operations": len(journal),
            "bytes": journal.bytes,
            "evicted": journal.evicted,
        }
    agent = sources.agent
    if agent is not None:
        ex = agent.executor
        doc["worker"] = {
            "id": agent.settings.worker_id,
            "slots": agent.settings.max_inflight,
            # The scheduler of the current session (None while reconnecting), and the list.
            "scheduler": agent.scheduler_url,
            "schedulers": [s.url for s in agent.schedulers],
            "sessions": agent.sessions,
            "held_results": [{"operation": n, "attempt": a} for n, a in agent.pending.keys()],
            "held_results_dropped": agent.pending.dropped,
            "running": [{"operation": n, "attempt": a} for n, a in sorted(agent.running)],
            "draining": agent.draining,
            "completed": agent.completed,
            "declined": agent.declined,
            "cache": ex.cache.stats_dict(),
            "executor": dataclasses.asdict(ex.stats),
        }
    return doc


def _state_view(sched: Any, now: float) -> dict[str, Any]:
    """Where the scheduler's state lives and, when shared, every scheduler's workers."""
    store = sched.store
    view: dict[str, Any] = {
        "type": "redis" if store.shared else "memory",
        "scheduler_id": store.scheduler_id,
    }
    if store.shared:
        view["available"] = sched.view.available
        view["read_s_ago"] = round(now - sched.view.read_at, 1) if sched.view.read_at else None
        view["fleet"] = [
            {
                "id": lease.worker_id,
                "scheduler": lease.scheduler_id or None,  # None: between connections
                "slots": lease.slots,
                "busy": lease.running,
                "lease_left_s": round(lease.until - now, 1),
            }
            for lease in sorted(sched.view.leases.values(), key=lambda lease: lease.worker_id)
        ]
    return view


def metrics_text(sources: StatusSources) -> str:
    reg = Registry()
    for m in (
        RPC_DURATION,
        QUEUE_WAIT,
        EXECUTION_DURATION,
        CAS_BYTES,
        STATE_STORE_LATENCY,
        STATE_STORE_ERRORS,
        SCHEDULER_CAS_CONFLICTS,
        SCHEDULER_CAS_EXHAUSTED,
    ):
        reg.add(m)

    def gauge(
        name: str, help: str, labels: tuple[str, ...], items: list[tuple[tuple[str, ...], float]]
    ) -> None:
        reg.add(Gauge(name, help, labels, collect=lambda: items))

    def counter(
        name: str, help: str, labels: tuple[str, ...], items: list[tuple[tuple[str, ...], float]]
    ) -> None:
        reg.add(CollectedCounter(name, help, labels, collect=lambda: items))

    if sources.gate is not None:
        gauge(
            "reexec_rpcs_in_flight", "gRPC calls being handled", (), [((), sources.gate.inflight)]
        )
    gauge("reexec_draining", "1 while the daemon drains", (), [((), 1 if sources.draining else 0)])
    if sources.cas is not None:
        cas = sources.cas.stats()
        gauge(
            "reexec_cas_bytes",
            "Bytes stored in the CAS",
            (),
            [((), cas.get("bytes", cas.get("slow_bytes", 0)))],
        )
        gauge(
            "reexec_cas_blobs",
            "Blobs stored in the CAS",
            (),
            [((), cas.get("blobs", cas.get("slow_blobs", 0)))],
        )
        counter(
            "reexec_cas_evictions_total",
            "Blobs evicted from the CAS",
            (),
            [((), cas.get("evictions", cas.get("slow_evictions", 0)))],
        )
        hits, misses = _ac_counts(sources)
        counter(
            "reexec_action_cache_requests_total",
            "GetActionResult calls by result",
            ("result",),
            [(("hit",), hits), (("miss",), misses)],
        )
    sched = sources.scheduler
    if sched is not None:
        st = sched.stats
        gauge(
            "reexec_queue_depth",
            "Queued actions per platform queue",
            ("queue",),
            [
                ((",".join(f"{k}={v}" for k, v in key) or "default",), depth)
                for key, depth in sched.queue_depths().items()
            ]
            or [(("default",), 0)],
        )
        gauge(
            "reexec_operations",
            "Operations by stage",
            ("stage",),
            [((stage.lower(),), n) for stage, n in sched.operations_by_stage().items()],
        )
        gauge("reexec_workers_connected", "Connected workers", (), [((), len(sched.workers))])
        gauge(
            "reexec_worker_slots",
            "Worker slots by state",
            ("state",),
            [
                (("total",), sum(w.max_inflight for w in sched.workers.values())),
                (("busy",), sum(len(w.running) for w in sched.workers.values())),
            ],
        )
        counter(
            "reexec_actions_completed_total",
            "Completed operations by outcome",
            ("outcome",),
            [((k.lower(),), v) for k, v in st.completed.items()],
        )
        counter("reexec_actions_executed_total", "Execute requests", (), [((), st.executes)])
        counter(
            "reexec_actions_merged_total",
            "Execute requests merged into an in-flight operation",
            (),
            [((), st.merged)],
        )
        counter(
            "reexec_actions_dispatched_total",
            "Actions handed to workers",
            (),
            [((), st.dispatched)],
        )
        counter(
            "reexec_action_retries_total",
            "Actions requeued after an infrastructure failure",
            (),
            [((), st.retries)],
        )
        counter(
            "reexec_workers_lost_total",
            "Workers dropped (keepalive timeout or disconnect)",
            (),
            [((), st.workers_lost)],
        )
    agent = sources.agent
    if agent is not None:
        ex = agent.executor.stats
        cache = agent.executor.cache
        counter("reexec_worker_actions_total", "Actions run by this worker", (), [((), ex.actions)])
        counter(
            "reexec_worker_input_fetch_bytes_total",
            "Input bytes fetched into the worker cache",
            (),
            [((), cache.stats.fetched_bytes)],
        )
        counter(
            "reexec_worker_input_fetch_seconds_total",
            "Time spent fetching inputs",
            (),
            [((), cache.stats.fetch_seconds)],
        )
        counter(
            "reexec_worker_materialize_seconds_total",
            "Time spent building input roots",
            (),
            [((), ex.materialize_seconds)],
        )
        counter(
            "reexec_worker_hardlinks_total",
            "Input files hardlinked from the cache",
            (),
            [((), ex.links)],
        )
        counter(
            "reexec_worker_hardlink_copy_fallbacks_total",
            "Input files copied because a hardlink failed",
            (),
            [((), ex.copies)],
        )
        counter(
            "reexec_worker_output_upload_bytes_total",
            "Output bytes uploaded",
            (),
            [((), ex.upload_bytes)],
        )
        counter(
            "reexec_worker_output_upload_seconds_total",
            "Time spent uploading outputs",
            (),
            [((), ex.upload_seconds)],
        )
        counter(
            "reexec_worker_tampered_inputs_total",
            "Cache files an action modified (removed)",
            (),
            [((), ex.tampered)],
        )
        gauge(
            "reexec_worker_cache_bytes",
            "Bytes in the worker's local cache",
            (),
            [((), cache.stats_dict()["bytes"])],
        )
        gauge(
            "reexec_worker_running_actions",
            "Actions running on this worker",
            (),
            [((), len(agent.running))],
        )
        gauge(
            "reexec_worker_connected",
            "1 for the scheduler this worker is registered with (none while it reconnects)",
            ("scheduler",),
            [((s.url,), float(s.url == agent.scheduler_url)) for s in agent.schedulers],
        )
        gauge(
            "reexec_worker_held_results",
            "Finished results held until a scheduler takes them",
            (),
            [((), len(agent.pending))],
        )
        counter(
            "reexec_worker_held_results_dropped_total",
            "Held results dropped beyond the bounds (count, bytes)",
            (),
            [((), agent.pending.dropped)],
        )
        counter(
            "reexec_worker_sessions_total",
            "Sessions registered with a scheduler (reconnects and moves included)",
            (),
            [((), agent.sessions)],
        )
    return reg.render()


_JSON = msgspec.json.Encoder()


def _cross_site(scope: dict[str, Any]) -> bool:
    """Whether a browser sent this request from another site's page. The unix socket can be
    forwarded to a local TCP port; a page elsewhere must not be able to drain through it.
    (`reexecd drain` sends no Origin; the web UI's own drain buttons send their own.)"""
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin")
    if origin is None:
        return headers.get(b"sec-fetch-site", b"") == b"cross-site"
    return urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") != headers.get(b"host")


def make_app(sources: StatusSources, *, control: bool) -> Callable[..., Awaitable[None]]:
    """The ASGI app; `control` enables /status and /drain (unix socket only)."""

    web = WebUI(sources, control=control, collect=collect_status)

    async def respond(
        send: Any,
        code: int,
        body: bytes,
        content_type: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-content-type-options", b"nosniff"),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            await respond(send, 200, b"ok\n", "text/plain")
        elif path == "/readyz":
            ready = not sources.draining
            await respond(
                send, 200 if ready else 503, b"ready\n" if ready else b"draining\n", "text/plain"
            )
        elif path == "/metrics":
            await respond(send, 200, metrics_text(sources).encode(), "text/plain; version=0.0.4")
        elif path == "/status" and control:
            await respond(send, 200, _JSON.encode(collect_status(sources)), "application/json")
        elif path == "/drain" and control and method == "POST":
            if _cross_site(scope):
                await respond(send, 403, b"cross-site requests cannot drain\n", "text/plain")
                return
            query = parse_qs(scope.get("query_string", b"").decode())
            worker = (query.get("worker") or [""])[0]
            if worker:
                sched = sources.scheduler
                if sched is None or not sched.drain_worker(worker):
                    await respond(
                        send, 404, f"no connected worker {worker!r}\n".encode(), "text/plain"
                    )
                    return
                await respond(send, 202, f"draining worker {worker}\n".encode(), "text/plain")
            elif sources.drain_self is not None:
                sources.drain_self()
                await respond(send, 202, b"draining this daemon\n", "text/plain")
            else:
                await respond(send, 409, b"this daemon cannot drain itself\n", "text/plain")
        else:
            page: Response | None = await web.handle(
                method, path, parse_qs(scope.get("query_string", b"").decode())
            )
            if page is None:
                await respond(send, 404, b"not found\n", "text/plain")
            else:
                await respond(send, page.status, page.body, page.content_type, page.headers)

    return app


async def run_status_server(
    sources: StatusSources,
    socket_path: str | None,
    socket_mode: int,
    tcp_listen: str = "",
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoint until cancelled."""

    def config(bind: str) -> HypercornConfig:
        c = HypercornConfig()
        c.bind = [bind]
        c.accesslog = None
        c.errorlog = logging.getLogger("reexec.status.http")
        c.graceful_timeout = 1.0
        return c

    async with trio.open_nursery() as nursery:
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
            await nursery.start(
                serve, make_app(sources, control=True), config(f"unix:{socket_path}")
            )
            os.chmod(socket_path, socket_mode)
            log.info("status endpoint on %s", socket_path)
        if tcp_listen:
            await nursery.start(serve, make_app(sources, control=False), config(tcp_listen))
            log.info("metrics endpoint on http://%s", tcp_listen)
        task_status.started()
        await trio.sleep_forever()
