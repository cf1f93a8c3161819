"""The web UI: HTML pages rendered with Jinja2 (autoescape on for every template).

`WebUI.handle` answers GET requests for the UI's paths and returns None for any other path, so
the status endpoint keeps its own routes. Everything a client sent (argv, env, stdout, names)
reaches the page only through autoescaped templates or `svg.py`'s escaped strings; the pages'
Content-Security-Policy allows only the UI's own static script and stylesheet, so even a missed
escape could not run a script.

Blob contents (Command, Directory listings, stdout/stderr, files) are read from the CAS only
when `[status] show_blob_contents` is true; digests and sizes are always shown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import jinja2

from reexec.cas.action_cache import ActionKey
from reexec.cas.digest import Digest, DigestFunction, make_digest
from reexec.daemon.web import data, svg
from reexec.daemon.web.links import action_path, operation_path
from reexec.errors import InvalidArgument
from reexec.sched.journal import Entry, percentile
from reexec.sched.state import Stage

PAGE_SIZE = 50
# Downloads are for logs and small outputs, not a second ByteStream.
MAX_DOWNLOAD_BYTES = 16 << 20

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HTML = "text/html; charset=utf-8"

_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = HTML
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reexec.daemon.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["optime"] = _clock
    env.filters["ago"] = _ago
    env.filters["size"] = _size
    env.filters["dur"] = _dur
    env.globals["operation_path"] = operation_path
    env.globals["action_path"] = action_path
    env.globals["quote"] = lambda s: quote(str(s), safe="")
    return env


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _ago(t: float) -> str:
    return _dur(time.time() - t) + " ago" if t else "-"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _static_files() -> dict[str, bytes]:
    root = resources.files("reexec.daemon.web") / "static"
    return {p.name: p.read_bytes() for p in root.iterdir() if p.name[0] != "."}


class WebUI:
    def __init__(
        self, sources: Any, *, control: bool, collect: Callable[[Any], dict[str, Any]]
    ) -> None:
        self.sources = sources  # reexec.daemon.status.StatusSources
        # reexec.daemon.status.collect_status, passed in so the two modules import one way.
        self.collect = collect
        self.control = control
        self.env = _env()
        self.static = _static_files()

    @property
    def settings(self) -> Any:
        return self.sources.settings

    # -- routing --------------------------------------------------------------------------------

    async def handle(self, method: str, path: str, query: dict[str, list[str]]) -> Response | None:
        """The response for a UI path, or None if `path` is not the UI's."""
        # ASGI's `path` is already percent-decoded; names may contain "/" (joined again below).
        parts = path.strip("/").split("/") if path != "/" else []
        head = parts[0] if parts else ""
        routes = {
            "": self.overview,
            "live": self.live,
            "operations": self.operations,
            "operation": self.operation,
            "action": self.action,
            "worker": self.worker,
            "cas": self.cas,
            "blob": self.blob,
            "static": self.static_file,
        }
        route = routes.get(head)
        if route is None:
            return None
        if method not in ("GET", "HEAD"):
            return Response(405, b"the web UI is read-only\n", "text/plain")
        q = {k: v[0] for k, v in query.items() if v}
        try:
            return await route(parts[1:], q)
        except _NotFound as e:
            return self._page("error.html", {"title": "Not found", "message": str(e)}, 404)
        except (ValueError, InvalidArgument) as e:
            return self._page("error.html", {"title": "Bad request", "message": str(e)}, 400)

    def _page(self, template: str, ctx: dict[str, Any], status: int = 200) -> Response:
        body = self.env.get_template(template).render(
            control=self.control,
            show_contents=self.settings.show_blob_contents,
            role=self.sources.role,
            **ctx,
        )
        return Response(status, body.encode(), HTML, [(b"content-security-policy", CSP.encode())])

    # -- overview -------------------------------------------------------------------------------

    async def overview(self, rest: list[str], q: dict[str, str]) -> Response:
        return self._page("overview.html", {"title": "Overview", **self._overview()})

    async def live(self, rest: list[str], q: dict[str, str]) -> Response:
        """The overview's changing part, fetched every few seconds by static/live.js."""
        return self._page("_overview_live.html", self._overview())

    def _overview(self) -> dict[str, Any]:
        doc = self.collect(self.sources)
        journal = self.sources.journal
        running: list[Entry] = []
        failures: list[Entry] = []
        charts: list[Any] = []
        if journal is not None:
            for e in journal.newest_first():
                if e.stage is Stage.EXECUTING and len(running) < 100:
                    running.append(e)
                elif e.failed and len(failures) < 10:
                    failures.append(e)
            charts = self._charts(journal)
        return {
            "doc": doc,
            "running": running,
            "failures": failures,
            "charts": charts,
            "drain_buttons": self.control and self.settings.web_drain_buttons,
            "now": time.time(),
        }

    def _charts(self, journal: Any) -> list[Any]:
        buckets = journal.buckets(time.time())
        return [
            svg.line_chart(
                "Queue depth (max per minute)", [("depth", [float(b.max_depth) for b in buckets])]
            ),
            svg.line_chart(
                "Executions per minute", [("executed", [float(b.executed) for b in buckets])]
            ),
            svg.line_chart(
                "Queue wait",
                [
                    ("p50", [percentile(b.queue_waits, 50) for b in buckets]),
                    ("p99", [percentile(b.queue_waits, 99) for b in buckets]),
                ],
                unit=" s",
            ),
            svg.line_chart(
                "Execution time",
                [
                    ("p50", [percentile(b.exec_times, 50) for b in buckets]),
                    ("p99", [percentile(b.exec_times, 99) for b in buckets]),
                ],
                unit=" s",
            ),
        ]

    # -- operations list ------------------------------------------------------------------------

    async def operations(self, rest: list[str], q: dict[str, str]) -> Response:
        journal = self.sources.journal
        page = max(1, int(q.get("page", "1") or 1))
        stage = q.get("stage", "").upper()
        outcome = q.get("outcome", "")
        worker = q.get("worker", "")
        instance = q.get("instance")
        since_min = float(q.get("since", "0") or 0)
        horizon = time.time() - since_min * 60 if since_min > 0 else 0.0
        matched: list[Entry] = []
        total = 0
        skip = (page - 1) * PAGE_SIZE
        for e in journal.newest_first() if journal is not None else ():
            if stage and e.stage.name != stage:
                continue
            if outcome and e.outcome != outcome:
                continue
            if worker and e.last_worker_id != worker:
                continue
            if instance is not None and instance != "" and e.instance != instance:
                continue
            if horizon and (e.created_at or e.queued_at) < horizon:
                continue
            total += 1
            if skip < total <= skip + PAGE_SIZE:
                matched.append(e)
        filters = {k: v for k, v in q.items() if k != "page" and v}

        def page_url(n: int) -> str:
            return "/operations?" + urlencode({**filters, "page": n})

        return self._page(
            "operations.html",
            {
                "title": "Operations",
                "entries": matched,
                "total": total,
                "page": page,
                "prev_url": page_url(page - 1) if page > 1 else "",
                "next_url": page_url(page + 1) if total > page * PAGE_SIZE else "",
                "q": {k: q.get(k, "") for k in ("stage", "outcome", "worker", "instance", "since")},
                "stages": [s.name.lower() for s in Stage if s is not Stage.UNKNOWN],
                "outcomes": ["running", "ok", "failed", "error", "cached"],
                "retained": len(journal) if journal is not None else 0,
            },
        )

    # -- action pages ---------------------------------------------------------------------------

    async def operation(self, rest: list[str], q: dict[str, str]) -> Response:
        name = "/".join(rest)
        journal = self.sources.journal
        entry = journal.get(name) if journal is not None else None
        if entry is None:
            raise _NotFound(f"operation {name!r} is not among the recent operations")
        fn = DigestFunction(entry.digest_function or DigestFunction.SHA256)
        digest = make_digest(entry.action_hash, entry.action_size, fn)
        return await self._action_page(digest, entry)

    async def action(self, rest: list[str], q: dict[str, str]) -> Response:
        if len(rest) != 2:
            raise ValueError("expected /action/<hash>/<size>")
        journal = self.sources.journal
        size = int(rest[1])
        entries = journal.by_action(rest[0], size) if journal is not None else []
        fn = DigestFunction(entries[0].digest_function) if entries else 0
        digest = make_digest(rest[0], size, int(fn))
        return await self._action_page(digest, entries[0] if entries else None, q.get("instance"))

    async def _action_page(
        self, digest: Digest, entry: Entry | None, instance: str | None = None
    ) -> Response:
        s = self.settings
        cas = self.sources.cas
        show = s.show_blob_contents
        ctx: dict[str, Any] = {
            "title": f"Action {digest.hash[:12]}",
            "digest": digest,
            "entry": entry,
            "others": [],
            "action": None,
            "action_error": "",
            "command": None,
            "command_error": "",
            "result": None,
            "result_note": "",
            "stdout": None,
            "stderr": None,
            "timeline": "",
        }
        journal = self.sources.journal
        if journal is not None:
            ctx["others"] = [
                e for e in journal.by_action(digest.hash, digest.size) if e is not entry
            ][:20]
        raw, why = await data.fetch(cas, digest, 1 << 20)
        if raw is not None:
            ctx["action"] = action = data.decode_action(raw)
            if show:
                cmd = action["command"]
                cdigest = make_digest(cmd["hash"], cmd["size"], int(digest.function))
                craw, cwhy = await data.fetch(cas, cdigest, 4 << 20)
                if craw is not None:
                    ctx["command"] = data.decode_command(craw)
                ctx["command_error"] = cwhy
        else:
            ctx["action_error"] = why
        result_bytes = entry.result if entry is not None else b""
        if entry is None and self.sources.ac is not None:
            key = ActionKey(instance or "", digest)
            result_bytes = await self.sources.ac.get(key) or b""
            if result_bytes:
                ctx["result_note"] = "from the action cache"
        if entry is not None and entry.result_dropped:
            ctx["result_note"] = "the ActionResult was too large to keep in the journal"
        if result_bytes:
            ctx["result"] = result = data.decode_result(result_bytes)
            for stream in ("stdout", "stderr"):
                ctx[stream] = await self._output(result, stream, digest.function)
            ctx["timeline"] = svg.timeline(result["phases"])
        if not ctx["timeline"] and entry is not None:
            ctx["timeline"] = svg.timeline(_entry_phases(entry))
        return self._page("action.html", ctx)

    async def _output(
        self, result: dict[str, Any], stream: str, fn: DigestFunction
    ) -> dict[str, Any] | None:
        """stdout/stderr: its size and digest, and its text when contents may be shown."""
        raw = result[f"{stream}_raw"]
        ref = result[stream]
        if not raw and ref is None:
            return None
        out: dict[str, Any] = {"digest": ref, "size": len(raw) if raw else ref["size"]}
        out["text"] = None
        out["note"] = ""
        if not self.settings.show_blob_contents:
            return out
        cap = self.settings.max_inline_bytes
        if raw:
            out["text"] = data.as_text(raw[:cap])
            out["truncated"] = len(raw) > cap
            return out
        digest = make_digest(ref["hash"], ref["size"], int(fn))
        cas = self.sources.cas
        blob, why = await data.fetch(cas, digest, cap)
        if blob is None and cas is not None and digest.size > cap:
            blob, why = await data.fetch_head(cas, digest, cap)
            out["truncated"] = True
        out["text"] = data.as_text(blob) if blob is not None else None
        out["note"] = why
        return out

    # -- worker ---------------------------------------------------------------------------------

    async def worker(self, rest: list[str], q: dict[str, str]) -> Response:
        worker_id = "/".join(rest)
        doc = self.collect(self.sources)
        workers = doc.get("scheduler", {}).get("workers", [])
        info = next((w for w in workers if w["id"] == worker_id), None)
        journal = self.sources.journal
        recent = []
        if journal is not None:
            for e in journal.newest_first():
                if e.last_worker_id == worker_id:
                    recent.append(e)
                    if len(recent) >= PAGE_SIZE:
                        break
        if info is None and not recent:
            raise _NotFound(f"no worker {worker_id!r} is connected or seen recently")
        return self._page(
            "worker.html",
            {
                "title": f"Worker {worker_id}",
                "worker_id": worker_id,
                "info": info,
                "recent": recent,
                "drain_buttons": self.control and self.settings.web_drain_buttons,
            },
        )

    # -- CAS browser ----------------------------------------------------------------------------

    async def cas(self, rest: list[str], q: dict[str, str]) -> Response:
        if len(rest) != 2:
            raise ValueError("expected /cas/<hash>/<size>")
        digest = make_digest(rest[0], int(rest[1]), int(q.get("fn", "0") or 0))
        kind = q.get("as", "blob")
        if kind not in ("blob", "directory", "tree"):
            raise ValueError("as= must be blob, directory or tree")
        ctx: dict[str, Any] = {
            "title": f"CAS {digest.hash[:12]}",
            "digest": digest,
            "kind": kind,
            "listing": None,
            "tree": None,
            "text": None,
            "error": "",
            "name": q.get("name", ""),
        }
        if self.settings.show_blob_contents:
            limit = self.settings.max_inline_bytes if kind == "blob" else 4 << 20
            raw, why = await data.fetch(self.sources.cas, digest, limit)
            ctx["error"] = why
            if raw is not None:
                try:
                    if kind == "directory":
                        ctx["listing"] = data.decode_directory(raw)
                    elif kind == "tree":
                        ctx["tree"] = data.decode_tree(raw, digest.function)
                    else:
                        ctx["text"] = data.as_text(raw)
                except Exception:
                    ctx["error"] = f"this blob is not a {kind} message"
        return self._page("cas.html", ctx)

    async def blob(self, rest: list[str], q: dict[str, str]) -> Response:
        if len(rest) != 2:
            raise ValueError("expected /blob/<hash>/<size>")
        if not self.settings.show_blob_contents:
            return Response(
                403, b"blob contents are not shown here (show_blob_contents)\n", "text/plain"
            )
        digest = make_digest(rest[0], int(rest[1]), int(q.get("fn", "0") or 0))
        raw, why = await data.fetch(self.sources.cas, digest, MAX_DOWNLOAD_BYTES)
        if raw is None:
            raise _NotFound(why)
        name = "".join(c for c in q.get("name", "") if c.isalnum() or c in "._-") or digest.hash
        return Response(
            200,
            raw,
            "application/octet-stream",
            [
                (b"content-disposition", f'attachment; filename="{name}"'.encode()),
                (b"x-content-type-options", b"nosniff"),
            ],
        )

    async def static_file(self, rest: list[str], q: dict[str, str]) -> Response:
        name = "/".join(rest)
        body = self.static.get(name)
        if body is None:
            raise _NotFound(f"no static file {name!r}")
        ext = name[name.rfind(".") :]
        return Response(
            200,
            body,
            _STATIC_TYPES.get(ext, "application/octet-stream"),
            [(b"cache-control", b"max-age=300")],
        )


def _entry_phases(e: Entry) -> list[tuple[str, float, float]]:
    """A coarse timeline from the scheduler's own times, when no ActionResult has one."""
    phases = []
    if e.queued_at and e.dispatched_at:
        phases.append(("queued", e.queued_at, e.dispatched_at))
    if e.dispatched_at and e.completed_at and e.completed_at >= e.dispatched_at:
        phases.append(("on worker", e.dispatched_at, e.completed_at))
    return phases


class _NotFound(Exception):
    pass


__all__ = ["CSP", "Response", "WebUI"]
