"""The web UI's pages rendered in-process (no browser): gating of blob contents, escaping,
filters and paging, links, and speed with thousands of retained operations."""

from __future__ import annotations

import re
import time

from grpclib.const import Status

from reexec import fastpb
from reexec.cas.digest import digest_of
from reexec.cas.memory import MemoryStore
from reexec.daemon.config import StatusConfig
from reexec.daemon.status import StatusSources, collect_status, make_app
from reexec.daemon.web.links import failure_link
from reexec.daemon.web.pages import CSP, WebUI
from reexec.daemon.web.svg import line_chart
from reexec.sched.journal import Journal
from reexec.sched.state import CacheChecked, Dispatched, Finished, Operation, Outcome, transition

EVIL = "<script>alert(1)</script>"


async def _site(*, show: bool, n: int = 1, control: bool = False, **settings):
    cas = MemoryStore(1 << 24)
    command = fastpb.Command(arguments=["/bin/echo", EVIL])
    command.environment_variables.add(name="SECRET", value="hunter2")
    cmd = command.SerializeToString()
    root = fastpb.Directory()
    f = root.files.add(name=EVIL)
    f.digest.hash, f.digest.size_bytes = digest_of(b"x").hash, 1
    root_bytes = root.SerializeToString()
    action = fastpb.Action()
    action.command_digest.hash, action.command_digest.size_bytes = digest_of(cmd).hash, len(cmd)
    action.input_root_digest.hash = digest_of(root_bytes).hash
    action.input_root_digest.size_bytes = len(root_bytes)
    action_bytes = action.SerializeToString()
    for blob in (cmd, root_bytes, action_bytes, b"x"):
        await cas.put_bytes(digest_of(blob), blob)
    ad = digest_of(action_bytes)
    result = fastpb.ActionResult(exit_code=2, stderr_raw=f"oops {EVIL}".encode())
    result.execution_metadata.worker = "w1"
    for field_, t in (
        ("queued_timestamp", 100.0),
        ("worker_start_timestamp", 101.0),
        ("execution_start_timestamp", 101.5),
        ("execution_completed_timestamp", 103.0),
        ("worker_completed_timestamp", 103.2),
    ):
        getattr(result.execution_metadata, field_).FromNanoseconds(int(t * 1e9))
    journal = Journal()
    now = time.time()
    for i in range(n):
        op = Operation(name=f"op-{i:05d}", action_key=("", ad.hash, ad.size, 1), created_at=now)
        steps = [
            CacheChecked(now=now, seq=i),
            Dispatched(worker_id=f"w{i % 2}", now=now + 0.5),
            Finished(
                worker_id=f"w{i % 2}",
                attempt=1,
                now=now + 1,
                seq=i,
                outcome=Outcome(result=result.SerializeToString(), message=f"msg {EVIL}"),
            ),
        ]
        for ev in steps:
            new = transition(op, ev)
            journal.observe(op, new)
            op = new
    sources = StatusSources(
        role="scheduler",
        cas=cas,
        journal=journal,
        settings=StatusConfig(show_blob_contents=show, **settings),
    )
    return WebUI(sources, control=control, collect=collect_status), ad


async def _get(ui: WebUI, path: str, query: str = "") -> tuple[int, str, dict]:
    from urllib.parse import parse_qs

    r = await ui.handle("GET", path, parse_qs(query))
    assert r is not None
    return r.status, r.body.decode(errors="replace"), dict(r.headers)


async def test_contents_shown_only_when_allowed_and_always_escaped():
    ui, ad = await _site(show=True)
    code, html, headers = await _get(ui, "/operation/op-00000")
    assert code == 200 and headers[b"content-security-policy"] == CSP.encode()
    assert "hunter2" in html and "oops &lt;script&gt;" in html
    assert EVIL not in html and "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;</code>" in html  # argv
    assert re.search(r'<div id="timeline"><svg.*?>execution</text>', html, re.S)
    code, html, _ = await _get(ui, f"/action/{ad.hash}/{ad.size}")
    assert code == 200 and "op-00000" in html

    hidden, _ = await _site(show=False)
    code, html, _ = await _get(hidden, "/operation/op-00000")
    assert code == 200 and "hunter2" not in html and "oops" not in html
    assert ad.hash in html and "contents hidden" in html
    code, _, _ = await _get(hidden, f"/blob/{digest_of(b'x').hash}/1")
    assert code == 403


async def test_cas_browser_lists_a_directory_with_escaped_names():
    ui, _ = await _site(show=True)
    code, html, _ = await _get(ui, "/operation/op-00000")
    root = re.search(r'href="/cas/([0-9a-f]{64})/(\d+)\?as=directory"', html)
    assert root
    code, listing, _ = await _get(ui, f"/cas/{root.group(1)}/{root.group(2)}", "as=directory")
    assert code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;</a>" in listing
    code, _, _ = await _get(ui, "/cas/nothex/1")
    assert code == 400
    code, _, _ = await _get(ui, "/operation/nope")
    assert code == 404


async def test_operations_filters_and_paging_over_ten_thousand_fast():
    ui, _ = await _site(show=False, n=10_000)
    t0 = time.perf_counter()
    code, html, _ = await _get(ui, "/operations", "worker=w1&outcome=failed")
    elapsed = time.perf_counter() - t0
    assert code == 200 and "5000 matching of 10000" in html
    assert html.count('<a href="/operation/') == 50
    assert 'href="/operations?worker=w1&amp;outcome=failed&amp;page=2"' in html
    assert elapsed < 1.0, elapsed
    code, html, _ = await _get(ui, "/operations", "worker=w1&outcome=failed&page=100")
    assert html.count('<a href="/operation/') == 50 and "older" not in html
    code, html, _ = await _get(ui, "/operations", "stage=executing")
    assert "0 matching" in html
    t0 = time.perf_counter()
    code, html, _ = await _get(ui, "/")
    assert code == 200 and time.perf_counter() - t0 < 1.0
    assert html.count('class="chart"') == 4


async def test_drain_buttons_only_on_the_control_socket_when_enabled():
    ui, _ = await _site(show=False, control=True, web_drain_buttons=True)
    worker = {"id": "w9", "properties": {}, "slots": 1, "in_use": 0, "last_keepalive_s": 0.1,
              "draining": False, "running": []}  # fmt: skip

    def collect(sources):
        return {**collect_status(sources), "scheduler": {"workers": [worker], "queues": [],
                "queued": 0}}  # fmt: skip

    ui.collect = collect
    _, html, _ = await _get(ui, "/")
    assert 'action="/drain?worker=w9"' in html
    ui.control = False
    _, html, _ = await _get(ui, "/")
    assert "/drain" not in html
    r = await ui.handle("POST", "/operations", {})
    assert r is not None and r.status == 405


def test_failure_link_only_for_failures():
    link = failure_link("http://ui.example:8080/")
    assert link is not None and failure_link("") is None
    op = Operation(name="n1", action_key=("", "a" * 64, 1, 1))
    ok = Outcome(result=fastpb.ActionResult(exit_code=0).SerializeToString())
    bad = Outcome(result=fastpb.ActionResult(exit_code=1).SerializeToString())
    timeout = Outcome(status=Status.DEADLINE_EXCEEDED, message="timed out")
    assert link(op) == ""
    assert link(Operation(name="n1", action_key=op.action_key, outcome=ok)) == ""
    for outcome in (bad, timeout):
        text = link(Operation(name="n1", action_key=op.action_key, outcome=outcome))
        assert text.endswith("http://ui.example:8080/operation/n1")


def test_line_chart_escapes_labels_and_draws_gaps():
    svg = str(line_chart(EVIL, [(EVIL, [1.0, 2.0, None, 3.0])]))
    assert "<script" not in svg and "&lt;script&gt;" in svg
    assert svg.count("<polyline") == 1 and svg.count("<circle") == 1


async def test_status_app_serves_ui_and_keeps_its_own_routes():
    sources = StatusSources(role="scheduler")
    app = make_app(sources, control=False)
    sent: list[dict] = []

    async def send(msg):
        sent.append(msg)

    async def call(path: str) -> int:
        sent.clear()
        scope = {"type": "http", "path": path, "method": "GET", "query_string": b""}
        await app(scope, None, send)
        return sent[0]["status"]

    assert await call("/healthz") == 200
    assert await call("/") == 200
    assert await call("/static/style.css") == 200
    assert await call("/static/missing.js") == 404
    assert await call("/nothing-here") == 404


async def test_large_stdout_is_truncated_and_output_trees_browse():
    ui, ad = await _site(show=True, max_inline_bytes=1000)
    cas = ui.sources.cas
    log = b"line\n" * 1000
    await cas.put_bytes(digest_of(log), log)
    leaf = fastpb.Directory()
    leaf.files.add(name="deep.txt").digest.hash = digest_of(b"x").hash
    leaf_bytes = leaf.SerializeToString()
    tree = fastpb.Tree()
    sub = tree.root.directories.add(name="sub")
    sub.digest.hash, sub.digest.size_bytes = digest_of(leaf_bytes).hash, len(leaf_bytes)
    tree.children.add().CopyFrom(leaf)
    tree_bytes = tree.SerializeToString()
    await cas.put_bytes(digest_of(tree_bytes), tree_bytes)
    result = fastpb.ActionResult(exit_code=0)
    result.stdout_digest.hash, result.stdout_digest.size_bytes = digest_of(log).hash, len(log)
    out = result.output_directories.add(path="out")
    out.tree_digest.hash, out.tree_digest.size_bytes = digest_of(tree_bytes).hash, len(tree_bytes)
    op = Operation(name="big-log", action_key=("", ad.hash, ad.size, 1))
    done = transition(
        op, CacheChecked(now=1.0, seq=1, hit=Outcome(result=result.SerializeToString()))
    )
    ui.sources.journal.observe(op, done)

    code, html, _ = await _get(ui, "/operation/big-log")
    assert code == 200 and "truncated" in html
    shown = re.search(r'<pre class="output" id="stdout">(.*?)</pre>', html, re.S)
    assert shown and len(shown.group(1)) == 1000
    code, page, _ = await _get(
        ui, f"/cas/{digest_of(tree_bytes).hash}/{len(tree_bytes)}", "as=tree"
    )
    assert code == 200 and "sub/" in page and "deep.txt" in page


async def test_retries_and_their_reasons_are_listed():
    from reexec.sched.state import Requeue

    ui, ad = await _site(show=False)
    op = Operation(name="retried", action_key=("", ad.hash, ad.size, 1))
    steps = [
        CacheChecked(now=1.0, seq=1),
        Dispatched(worker_id="w1", now=2.0),
        Requeue(worker_id="w1", attempt=1, now=3.0, seq=2, reason="worker lost <b>"),
        Dispatched(worker_id="w2", now=4.0),
    ]
    for ev in steps:
        new = transition(op, ev)
        ui.sources.journal.observe(op, new)
        op = new
    code, html, _ = await _get(ui, "/operation/retried")
    assert code == 200 and "<li>attempt 1 on w1: worker lost &lt;b&gt;</li>" in html
    assert "2 (retries 1, declined 0)" in html
    code, html, _ = await _get(ui, "/worker/w2")
    assert code == 200 and "retried" in html


async def test_drain_refuses_cross_site_browser_requests():
    drained: list[bool] = []
    sources = StatusSources(role="serve", drain_self=lambda: drained.append(True))
    app = make_app(sources, control=True)
    sent: list[dict] = []

    async def send(msg):
        sent.append(msg)

    async def post(headers: list[tuple[bytes, bytes]]) -> int:
        sent.clear()
        scope = {
            "type": "http",
            "path": "/drain",
            "method": "POST",
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, None, send)
        return sent[0]["status"]

    assert await post([(b"host", b"localhost:9100"), (b"origin", b"http://evil.example")]) == 403
    assert await post([(b"host", b"localhost:9100"), (b"sec-fetch-site", b"cross-site")]) == 403
    assert not drained
    assert await post([(b"host", b"localhost:9100"), (b"origin", b"http://localhost:9100")]) == 202
    assert await post([]) == 202  # reexecd drain
    assert drained == [True, True]
