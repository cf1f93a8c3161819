"""The web UI in headless Chromium against a running `reexecd serve` (issue 14's acceptance).

One daemon for the module: a failing action whose argv, env and stderr carry `<script>`, and a
long action (with a short timeout) that is running while the overview is looked at and then
times out. Screenshots go to $REEXEC_WEB_SCREENSHOTS (docs/ when refreshing the README's
pictures), else to a temporary directory.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reexec import fastpb
from tests.e2e.harness import ReexecdProcess, free_port
from tests.hardening.conftest import EXECUTION, RawClient, sha
from tests.web.browser import chromium, dump_dom, require_chromium, screenshot

PATH = "/usr/local/bin:/usr/bin:/bin"
EVIL = "<script>alert('x')</script>"
STDERR_MARK = "WEBUI-STDERR"


def _action(client: RawClient, args: list[str], env: dict[str, str], timeout_s: int = 0) -> bytes:
    command = fastpb.Command(arguments=args)
    for k, v in sorted({"PATH": PATH, **env}.items()):
        command.environment_variables.add(name=k, value=v)
    root = fastpb.Directory().SerializeToString()
    action = fastpb.Action(do_not_cache=True, salt=str(time.time()).encode())
    if timeout_s:
        action.timeout.seconds = timeout_s
    action.command_digest.CopyFrom(sha(command.SerializeToString()))
    action.input_root_digest.CopyFrom(sha(root))
    client.upload(command.SerializeToString(), root, action.SerializeToString())
    req = fastpb.ExecuteRequest()
    req.action_digest.CopyFrom(sha(action.SerializeToString()))
    return req.SerializeToString()


@dataclass
class Background:
    """An Execute stream read in a thread: `.operations` as they arrive."""

    operations: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    call: Any = None

    def start(self, client: RawClient, request: bytes) -> Background:
        self.call = client.channel.unary_stream(EXECUTION + "Execute")(request, timeout=120)

        def run() -> None:
            try:
                for raw in self.call:
                    self.operations.append(fastpb.Operation.FromString(raw))
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def response(self, timeout: float) -> Any:
        assert self.thread is not None
        self.thread.join(timeout)
        assert self.error is None and self.operations and self.operations[-1].done
        resp = fastpb.ExecuteResponse()
        self.operations[-1].response.Unpack(resp)
        return resp


@dataclass
class Site:
    base: str
    daemon: ReexecdProcess
    client: RawClient
    failed: Any  # ExecuteResponse
    failed_name: str
    shots: Path

    def start_sleeper(self, seconds: int, timeout_s: int = 0) -> tuple[Background, str]:
        """A running action, once the UI lists it as executing."""
        request = _action(self.client, ["/bin/sh", "-c", f"sleep {seconds}"], {}, timeout_s)
        call = Background().start(self.client, request)
        _wait(lambda: call.operations)
        name = call.operations[0].name
        _wait(lambda: name in self.get("/operations?stage=executing")[1])
        return call, name

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=20) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            assert e.code != 500, self.daemon.log_text()[-4000:]
            return e.code, e.read().decode()


def _wait(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("web")
    port, status_port = free_port(), free_port()
    base = f"http://127.0.0.1:{status_port}"
    cfg = tmp / "reexecd.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
        f'[status]\nlisten = "127.0.0.1:{status_port}"\nbase_url = "{base}"\n'
        "show_blob_contents = true\n"
        "[worker]\ndrain_timeout_s = 2\n"
    )
    daemon = ReexecdProcess(
        tmp / "data",
        port=port,
        args=["serve", "--config", str(cfg), "--data-dir", str(tmp / "data")],
        log_dir=tmp / "log",
    )
    shots = Path(os.environ.get("REEXEC_WEB_SCREENSHOTS") or tmp / "shots")
    with daemon:
        client = RawClient(port)
        try:
            failing = _action(
                client,
                ["/bin/sh", "-c", f'echo "{STDERR_MARK} {EVIL}" >&2; echo built; exit 3'],
                {"EVIL": EVIL},
            )
            failed_call = Background().start(client, failing)
            failed = failed_call.response(60)
            # Some successful work too, queued together, for the plots and lists.
            batch = [
                Background().start(
                    client, _action(client, ["/bin/sh", "-c", f"sleep 0.{i}; echo ok {i}"], {})
                )
                for i in range(6)
            ]
            for call in batch:
                assert call.response(60).result.exit_code == 0
            s = Site(base, daemon, client, failed, failed_call.operations[0].name, shots)
            yield s
        finally:
            client.close()


def test_failed_action_message_carries_its_page_url(site: Site) -> None:
    assert site.failed.result.exit_code == 3
    url = f"{site.base}/operation/{site.failed_name}"
    assert url in site.failed.message, site.failed.message
    code, html = site.get(url[len(site.base) :])
    assert code == 200
    assert STDERR_MARK in html
    # Escaped as text, never markup.
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert EVIL not in html


def test_overview_shows_the_local_worker_a_running_action_and_plots(site: Site) -> None:
    require_chromium()
    sleeper, name = site.start_sleeper(20)
    # Five seconds of virtual time: live.js has replaced the section at least once.
    dom = dump_dom(site.base + "/", wait_ms=5000)
    workers = re.search(r'<table id="workers">(.*?)</table>', dom, re.S)
    assert workers and "-local" in workers.group(1), dom[:3000]
    running = re.search(r'<table id="running">(.*?)</table>', dom, re.S)
    assert running and name[:13] in running.group(1)
    charts = re.findall(r'<svg[^>]*class="chart".*?</svg>', dom, re.S)
    assert len(charts) == 4
    assert all("<polyline" in c or "<circle" in c for c in charts), charts[0]
    assert re.search(r"id=\"live-state\"[^>]*>live<", dom), re.findall(
        r"<h1.*?</h1>", dom
    )  # polled
    screenshot(site.base + "/", site.shots / "web-overview.png", size=(1280, 1150))
    sleeper.call.cancel()  # the scheduler cancels the unwatched action


def test_failed_action_page_shows_stderr_timeline_and_script_as_text(site: Site) -> None:
    require_chromium()
    url = f"{site.base}/operation/{site.failed_name}"
    dom = dump_dom(url)
    stderr = re.search(r'<pre class="output" id="stderr">(.*?)</pre>', dom, re.S)
    assert stderr and f"{STDERR_MARK} &lt;script&gt;" in stderr.group(1)
    assert re.search(r'<div id="timeline"><svg.*?<rect', dom, re.S)
    for phase in ("queued", "input fetch", "execution", "output upload"):
        assert f">{phase}</text>" in dom
    # argv and env show the string as text; the page has no script element at all.
    assert "&lt;script&gt;alert('x')&lt;/script&gt;</code>" in dom
    assert "<script" not in dom
    screenshot(url, site.shots / "web-action.png", size=(1280, 1500))


def test_operations_list_filters_and_pages(site: Site) -> None:
    code, html = site.get("/operations?outcome=failed")
    assert code == 200 and site.failed_name[:13] in html
    code, html = site.get("/operations?outcome=ok")
    assert code == 200 and site.failed_name[:13] not in html
    code, html = site.get("/operations?stage=completed&since=5")
    assert site.failed_name[:13] in html
    code, html = site.get("/operations?worker=nobody")
    assert "no operation matches" in html
    if chromium():
        screenshot(site.base + "/operations", site.shots / "web-operations.png", size=(1280, 600))


def test_worker_and_cas_pages(site: Site) -> None:
    code, html = site.get("/")
    worker = re.search(r'href="/worker/([^"]+)"', html)
    assert worker
    code, page = site.get(f"/worker/{worker.group(1)}")
    assert code == 200 and site.failed_name[:13] in page
    if chromium():
        screenshot(
            f"{site.base}/worker/{worker.group(1)}", site.shots / "web-worker.png", size=(1280, 600)
        )
    stderr = site.failed.result.stderr_digest
    if stderr.hash:
        code, blob = site.get(f"/blob/{stderr.hash}/{stderr.size_bytes}")
        assert code == 200 and STDERR_MARK in blob
    code, _ = site.get("/cas/" + "0" * 64 + "/5?as=directory")
    assert code == 200  # a page saying the blob is missing
    code, _ = site.get("/cas/xyz/5")
    assert code == 400


def test_tcp_listener_is_read_only(site: Site) -> None:
    req = urllib.request.Request(site.base + "/drain", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404
    req = urllib.request.Request(site.base + "/operations", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
    code, _ = site.get("/status")
    assert code == 404


def test_timed_out_action_message_carries_its_page_url(site: Site) -> None:
    call, name = site.start_sleeper(30, timeout_s=2)
    resp = call.response(60)
    assert resp.status.code == 4, resp  # DEADLINE_EXCEEDED
    assert f"{site.base}/operation/{name}" in resp.message
    assert "did not finish within its timeout" in resp.message
    code, html = site.get(f"/operation/{name}")
    assert code == 200 and "did not finish within its timeout" in html


def test_unix_socket_serves_the_ui(site: Site) -> None:
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(site.daemon.data_dir / "reexecd.sock"))

    conn = UnixConnection("localhost", timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    html = resp.read().decode()
    assert resp.status == 200 and "read-only" not in html and 'id="workers"' in html
    assert "/drain" not in html  # web_drain_buttons is off by default
    conn.close()
