"""`reexecd status` and `reexecd drain`: talk to a daemon's status socket."""

from __future__ import annotations

import http.client
import json
import socket
import sys
from pathlib import Path
from typing import Any

from reexec.daemon.config import Config


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class StatusError(Exception):
    pass


def socket_path(config: Config, override: str | None) -> str:
    if override:
        return override
    p = Path(config.status.socket)
    return str(p if p.is_absolute() else Path(config.data_dir) / p)


def request(path: str, method: str, url: str) -> tuple[int, bytes]:
    conn = _UnixConnection(path)
    try:
        conn.request(method, url)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except FileNotFoundError:
        raise StatusError(
            f"no daemon socket at {path}: is reexecd running (with this --data-dir)?"
        ) from None
    except ConnectionRefusedError:
        raise StatusError(
            f"{path} refuses connections: the daemon is not running (stale socket)"
        ) from None
    except PermissionError:
        raise StatusError(
            f"permission denied on {path}: run as the daemon's user or a member of its group"
        ) from None
    except OSError as e:
        raise StatusError(f"cannot talk to {path}: {e}") from None
    finally:
        conn.close()


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"reexecd {doc['role']} {doc['version']} (pid {doc['pid']}), up {_duration(doc['uptime_s'])}"
        + (f", listening on {', '.join(doc['listen'])}" if doc.get("listen") else "")
        + ("  [DRAINING]" if doc.get("draining") else "")
    ]
    stores = doc.get("stores")
    if stores:
        cas = stores["cas"]
        blobs = cas.get("blobs", cas.get("slow_blobs", 0))
        size = cas.get("bytes", cas.get("slow_bytes", 0))
        limit = cas.get("max_bytes", cas.get("slow_max_bytes", 0))
        lines.append(
            f"CAS: {blobs:,} blobs, {_bytes(size)}"
            + (f" of {_bytes(limit)}" if limit else "")
            + f", {cas.get('evictions', cas.get('slow_evictions', 0)):,} evictions"
        )
        ac = doc["action_cache"]
        rate = "n/a" if ac["hit_rate"] is None else f"{ac['hit_rate'] * 100:.1f}%"
        lines.append(
            f"Action cache: {stores['action_cache'].get('entries', 0):,} entries, "
            f"hit rate {rate} ({ac['hits']:,} hits, {ac['misses']:,} misses)"
        )
    sched = doc.get("scheduler")
    if sched:
        state = sched.get("state") or {}
        if state.get("type") == "redis":
            health = "" if state.get("available", True) else " [UNAVAILABLE]"
            lines.append(
                f"State: shared (redis){health}; this scheduler is {state['scheduler_id']}; "
                "queues and operations are the shared view"
            )
        lines.append(f"Queue: {sched['queued']} queued")
        for q in sched["queues"]:
            label = ",".join(f"{k}={v}" for k, v in q["properties"].items()) or "(no properties)"
            lines.append(f"  {label}: {q['depth']}")
        ops = ", ".join(f"{k} {v}" for k, v in sorted(sched["operations"].items())) or "none"
        lines.append(f"Operations: {ops}")
        workers = sched["workers"]
        lines.append(f"Workers ({len(workers)}):")
        if workers:
            rows = [["ID", "SLOTS", "BUSY", "LAST SEEN", "STATE", "PROPERTIES"]]
            for w in workers:
                props = " ".join(f"{k}={','.join(v)}" for k, v in w["properties"].items()) or "-"
                rows.append(
                    [
                        w["id"],
                        str(w["slots"]),
                        str(w["in_use"]),
                        _duration(w["last_keepalive_s"]) + " ago",
                        "draining" if w["draining"] else "active",
                        props,
                    ]
                )
            lines += _table(rows)
        fleet = (state.get("fleet") or []) if state.get("type") == "redis" else []
        if fleet:
            lines.append(f"Fleet ({len(fleet)} workers across all schedulers):")
            rows = [["ID", "SCHEDULER", "SLOTS", "BUSY", "LEASE LEFT"]]
            for f in fleet:
                rows.append(
                    [
                        f["id"],
                        f["scheduler"] or "(reconnecting)",
                        str(f["slots"]),
                        str(f["busy"]),
                        _duration(max(f["lease_left_s"], 0)),
                    ]
                )
            lines += _table(rows)
        running = [(r, w["id"]) for w in workers for r in w["running"]]
        lines.append(f"Running actions ({len(running)}):")
        if running:
            rows = [["OPERATION", "ACTION", "WORKER", "AGE"]]
            for r, wid in sorted(running, key=lambda x: -(x[0]["age_s"] or 0)):
                rows.append([r["operation"], r["action"][:20] + "...", wid, _duration(r["age_s"])])
            lines += _table(rows)
        t = sched["totals"]
        lines.append(
            f"Totals: {t['executes']:,} executes, {t['merged']:,} merged, "
            f"{t['cache_hits']:,} cache hits, {t['dispatched']:,} dispatched, "
            f"{t['retries']:,} retries, {t['workers_lost']:,} workers lost"
            + (f", {t['conflicts']:,} state conflicts" if t.get("conflicts") else "")
        )
    worker = doc.get("worker")
    if worker:
        c = worker["cache"]
        lines.append(
            f"Local worker {worker['id']}: {len(worker['running'])}/{worker['slots']} slots busy"
            + (" [DRAINING]" if worker["draining"] else "")
            + f", {worker['completed']:,} actions done; cache {c['files']:,} files, {_bytes(c['bytes'])}"
        )
        schedulers = worker.get("schedulers") or []
        if len(schedulers) > 1 or worker.get("held_results"):
            lines.append(
                f"  Scheduler: {worker.get('scheduler') or 'none (reconnecting)'}"
                f" (of {len(schedulers)}); {len(worker.get('held_results') or [])} result(s) held"
            )
    return "\n".join(lines)


def status_command(config: Config, sock: str | None, as_json: bool) -> int:
    path = socket_path(config, sock)
    try:
        code, body = request(path, "GET", "/status")
    except StatusError as e:
        print(f"reexecd status: {e}", file=sys.stderr)
        return 1
    if code != 200:
        print(
            f"reexecd status: {path} answered HTTP {code}: {body.decode(errors='replace')}",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(json.dumps(json.loads(body), indent=2))
    else:
        print(render(json.loads(body)))
    return 0


def drain_command(config: Config, sock: str | None, worker: str | None) -> int:
    path = socket_path(config, sock)
    url = f"/drain?worker={worker}" if worker else "/drain"
    try:
        code, body = request(path, "POST", url)
    except StatusError as e:
        print(f"reexecd drain: {e}", file=sys.stderr)
        return 1
    print(body.decode(errors="replace").strip())
    return 0 if code == 202 else 1
