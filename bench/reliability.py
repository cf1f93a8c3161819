"""Reliability under load: many clients, uploads, idle connections and bad inputs at once.

  server:   `reexecd serve` (scheduler + local worker, embedded default config unless
            `--slots`) as a subprocess on a free loopback port, throw-away data directory.
  load, all at the same time, over loopback only:
    actions:  `--clients` (100) concurrent clients, each on its own channel (one TCP
              connection), each running `--actions` (60) actions one after the other, as Bazel
              does: FindMissingBlobs -> BatchUpdateBlobs of the missing -> Execute until done.
              Every action has a distinct input file (no cache hits) and runs
              `/bin/cat in.txt`: its stdout must be exactly its own input.
    uploads:  `--uploaders` (32) concurrent ByteStream writers, each writing a distinct blob of
              `--upload-kib` (512) KiB in 64 KiB chunks every `--upload-interval` (3) seconds
              while the actions run (at most `--uploads` (60) each); every blob is read back at
              the end and its SHA-256 checked.
    hogs:     `--hogs` (16) idle connections: 8 raw TCP connections that send the HTTP/2
              preface and nothing more, 8 gRPC channels that make one call and then idle.
    bad:      one client cycling through ~35 malformed requests (bad digests, resource names,
              offsets, undecodable bytes, a zstd bomb, an oversized message, unsafe action
              results, unknown operations, ...) with a short pause between them, for as long
              as the actions run. INTERNAL or UNKNOWN counts as a failure.
  sampled:  the server's RSS every 0.5 s (start, peak, end), server CPU.
  checks:   every action completed, once, with exit 0 and its own stdout, and the server ran
            exactly as many as were asked for (its /metrics on the status socket: actions run
            by the worker, dispatched, retried, before and after the load); every
            upload readable and intact; no bad input answered INTERNAL/UNKNOWN; the daemon
            alive and answering at the end.

Bounded: the whole run stops by itself after `--max-seconds` (360); anything unfinished by then
counts as lost. Defaults take about 2-4 minutes on a loaded 2-core machine. Scale up with e.g.
`--clients 200 --actions 100 --uploaders 64 --uploads 16 --hogs 64`.

Usage: .venv/bin/python bench/reliability.py [--clients 100] [--actions 60] [--uploaders 32]
       [--uploads 60] [--upload-kib 512] [--upload-interval 3] [--hogs 16] [--slots 0]
       [--max-seconds 360]
Exit status: 0 if every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import grpc.aio
import zstandard
from _sched_common import CpuMeter, banner, percentile, reexecd, table

from reexec import fastpb

RE = "/build.bazel.remote.execution.v2."
BS = "/google.bytestream.ByteStream/"
OPS = "/google.longrunning.Operations/"
CHUNK = 64 * 1024
OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.enable_retries", 0),
]
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def sha(data: bytes) -> fastpb.Message:
    return fastpb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class Client:
    """A grpcio.aio channel with raw-bytes methods (requests and responses are bytes)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=OPTIONS)

    def unary(self, path: str):  # type: ignore[no-untyped-def]
        return self.channel.unary_unary(path)

    def stream(self, path: str):  # type: ignore[no-untyped-def]
        return self.channel.unary_stream(path)

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Stats:
    action_latency: list[float] = field(default_factory=list)
    action_errors: list[str] = field(default_factory=list)
    completed: collections.Counter[str] = field(default_factory=collections.Counter)
    upload_latency: list[float] = field(default_factory=list)
    upload_errors: list[str] = field(default_factory=list)
    uploaded: list[fastpb.Message] = field(default_factory=list)
    bad_tried: collections.Counter[str] = field(default_factory=collections.Counter)
    bad_codes: dict[str, collections.Counter[str]] = field(default_factory=dict)
    bad_failures: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    hogs_closed_by_server: int = 0


# -- actions ------------------------------------------------------------------------------------


def action_blobs(
    run_id: str, client: int, n: int, shared: bool = False
) -> tuple[str, bytes, dict, bytes]:
    """(id, expected stdout, {hash: (digest, data)}, action digest bytes). `shared`: the same
    input and Command for every action, only the Action differs (salt, do_not_cache)."""
    ident = f"{run_id}-c{client}-a{n}"
    content = f"input of {run_id if shared else ident}\n".encode()
    root = fastpb.Directory()
    f = root.files.add(name="in.txt")
    f.digest.CopyFrom(sha(content))
    rb = root.SerializeToString(deterministic=True)
    cmd = fastpb.Command(arguments=["/bin/cat", "in.txt"])
    cb = cmd.SerializeToString()
    action = fastpb.Action(salt=ident.encode() if shared else b"", do_not_cache=shared)
    action.command_digest.CopyFrom(sha(cb))
    action.input_root_digest.CopyFrom(sha(rb))
    ab = action.SerializeToString()
    blobs = {sha(b).hash: (sha(b), b) for b in (content, rb, cb, ab)}
    return ident, content, blobs, sha(ab).SerializeToString()


async def run_action(c: Client, stats: Stats, ident: str, expected: bytes, blobs: dict,
                     action_digest: bytes) -> None:  # fmt: skip
    t0 = time.perf_counter()
    fm = fastpb.FindMissingBlobsRequest()
    for d, _ in blobs.values():
        fm.blob_digests.append(d)
    resp = fastpb.FindMissingBlobsResponse.FromString(
        await c.unary(RE + "ContentAddressableStorage/FindMissingBlobs")(
            fm.SerializeToString(), timeout=120
        )
    )
    if resp.missing_blob_digests:
        up = fastpb.BatchUpdateBlobsRequest()
        for d in resp.missing_blob_digests:
            r = up.requests.add(data=blobs[d.hash][1])
            r.digest.CopyFrom(d)
        ur = fastpb.BatchUpdateBlobsResponse.FromString(
            await c.unary(RE + "ContentAddressableStorage/BatchUpdateBlobs")(
                up.SerializeToString(), timeout=120
            )
        )
        bad = [r.status for r in ur.responses if r.status.code != 0]
        if bad:
            raise RuntimeError(f"upload refused: {bad}")
    req = fastpb.ExecuteRequest()
    req.action_digest.ParseFromString(action_digest)
    last = None
    async for msg in c.stream(RE + "Execution/Execute")(req.SerializeToString(), timeout=300):
        last = fastpb.Operation.FromString(msg)
    if last is None or not last.done:
        raise RuntimeError(f"Execute stream ended before the operation was done: {last}")
    er = fastpb.ExecuteResponse()
    last.response.Unpack(er)
    if er.status.code != 0 or er.result.exit_code != 0:
        raise RuntimeError(
            f"status {er.status.code} {er.status.message!r} exit {er.result.exit_code}"
        )
    stdout = er.result.stdout_raw
    if not stdout and er.result.HasField("stdout_digest"):
        br = fastpb.BatchReadBlobsRequest()
        br.digests.append(er.result.stdout_digest)
        got = fastpb.BatchReadBlobsResponse.FromString(
            await c.unary(RE + "ContentAddressableStorage/BatchReadBlobs")(
                br.SerializeToString(), timeout=120
            )
        )
        stdout = got.responses[0].data
    if stdout != expected:
        raise RuntimeError(f"wrong stdout {stdout[:80]!r}, expected {expected!r}")
    stats.action_latency.append(time.perf_counter() - t0)
    stats.completed[ident] += 1


async def action_client(
    target: str, stats: Stats, run_id: str, i: int, n: int, shared: bool
) -> None:
    c = Client(target)
    try:
        for k in range(n):
            ident, expected, blobs, ad = action_blobs(run_id, i, k, shared)
            try:
                await run_action(c, stats, ident, expected, blobs, ad)
            except Exception as e:
                stats.action_errors.append(f"{ident}: {type(e).__name__}: {str(e)[:300]}")
    finally:
        await c.close()


# -- uploads ------------------------------------------------------------------------------------


async def uploader(
    target: str, stats: Stats, n: int, size: int, interval: float, stop: asyncio.Event
) -> None:
    """Up to `n` uploads, one every `interval` seconds, until the actions are done (`stop`)."""
    c = Client(target)
    try:
        for i in range(n):
            if i:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                if stop.is_set():
                    break
            data = os.urandom(size)
            d = sha(data)
            name = f"uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"

            async def reqs(name: str = name, data: bytes = data):  # type: ignore[no-untyped-def]
                for off in range(0, size, CHUNK):
                    yield fastpb.WriteRequest(
                        resource_name=name if off == 0 else "",
                        write_offset=off,
                        data=data[off : off + CHUNK],
                        finish_write=off + CHUNK >= size,
                    ).SerializeToString()

            t0 = time.perf_counter()
            try:
                resp = fastpb.WriteResponse.FromString(
                    await c.channel.stream_unary(BS + "Write")(reqs(), timeout=300)
                )
                if resp.committed_size != size:
                    raise RuntimeError(f"committed_size {resp.committed_size} != {size}")
                stats.upload_latency.append(time.perf_counter() - t0)
                stats.uploaded.append(d)
            except Exception as e:
                stats.upload_errors.append(f"write {d.hash[:12]}: {type(e).__name__}: {e}"[:300])
    finally:
        await c.close()


async def verify_uploads(target: str, stats: Stats) -> None:
    c = Client(target)
    try:
        for d in stats.uploaded:
            req = fastpb.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}")
            h = hashlib.sha256()
            async for msg in c.stream(BS + "Read")(req.SerializeToString(), timeout=120):
                h.update(fastpb.ReadResponse.FromString(msg).data)
            if h.hexdigest() != d.hash:
                stats.upload_errors.append(f"read back {d.hash[:12]}: content differs")
    except Exception as e:
        stats.upload_errors.append(f"read back: {type(e).__name__}: {e}"[:300])
    finally:
        await c.close()


# -- idle connection hogs ---------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def hogs(target: str, n: int, stop: asyncio.Event, stats: Stats) -> None:
    host, port = target.rsplit(":", 1)
    raw: list[socket.socket] = []
    channels: list[Client] = []
    try:
        for i in range(n):
            if i % 2 == 0:
                s = socket.create_connection((host, int(port)))
                s.sendall(H2_PREFACE)
                s.setblocking(False)
                raw.append(s)
            else:
                c = Client(target)
                await c.unary(RE + "Capabilities/GetCapabilities")(b"", timeout=60)
                channels.append(c)
        await stop.wait()
        for s in raw:  # did the server close any of them?
            try:
                if s.recv(65536) == b"":
                    stats.hogs_closed_by_server += 1
            except BlockingIOError:
                pass
            except OSError:
                stats.hogs_closed_by_server += 1
    finally:
        for s in raw:
            s.close()
        for c in channels:
            await c.close()


# -- bad inputs -------------------------------------------------------------------------------


def bad_inputs() -> list[tuple[str, str, str, object]]:
    """(kind, method, cardinality, request bytes or list of bytes)."""
    out: list[tuple[str, str, str, object]] = []

    def add(kind: str, method: str, msg: object, card: str = "unary") -> None:
        if isinstance(msg, list):
            out.append((kind, method, card, [m.SerializeToString() for m in msg]))
        else:
            out.append(
                (kind, method, card, msg if isinstance(msg, bytes) else msg.SerializeToString())
            )  # type: ignore[attr-defined]

    cas = RE + "ContentAddressableStorage/"
    for kind, h, size, fn in [
        ("FindMissing bad hex", "XYZ" * 21 + "a", 1, 0),
        ("FindMissing negative size", "a" * 64, -5, 0),
        ("FindMissing unknown function MD5", "a" * 32, 1, 3),
        ("FindMissing unknown function 99", "a" * 64, 1, 99),
        ("FindMissing empty hash", "", 0, 0),
    ]:
        req = fastpb.FindMissingBlobsRequest(digest_function=fn)
        req.blob_digests.add(hash=h, size_bytes=size)
        add(kind, cas + "FindMissingBlobs", req)
    bu = fastpb.BatchUpdateBlobsRequest()
    r = bu.requests.add(data=b"data")
    r.digest.CopyFrom(sha(b"other data"))
    add("BatchUpdate hash mismatch", cas + "BatchUpdateBlobs", bu)
    bu = fastpb.BatchUpdateBlobsRequest()
    r = bu.requests.add(data=b"data", compressor=7)
    r.digest.CopyFrom(sha(b"data"))
    add("BatchUpdate unknown compressor", cas + "BatchUpdateBlobs", bu)
    br = fastpb.BatchReadBlobsRequest()
    br.digests.add(hash="b" * 64, size_bytes=2**62)
    add("BatchRead huge size", cas + "BatchReadBlobs", br)
    gt = fastpb.GetTreeRequest(page_size=-1)
    gt.root_digest.CopyFrom(sha(b""))
    add("GetTree negative page_size", cas + "GetTree", gt, "stream")
    for kind, name, off in [
        ("Read bad name", "blobs/abc", 0),
        ("Read path traversal", "../../etc/passwd", 0),
        ("Read reserved segment", "uploads/x/blobs/" + "a" * 64 + "/1", 0),
        ("Read negative offset", f"blobs/{sha(b'').hash}/0", -1),
        ("Read missing blob", f"blobs/{'c' * 64}/10", 0),
        ("Read unsupported compressor", f"compressed-blobs/brotli/{'c' * 64}/10", 0),
    ]:
        add(kind, BS + "Read", fastpb.ReadRequest(resource_name=name, read_offset=off), "stream")
    data = b"some data"
    good = f"uploads/{uuid.uuid4()}/blobs/{sha(data).hash}/{len(data)}"
    wrong = f"uploads/{uuid.uuid4()}/blobs/{sha(b'x').hash}/{len(data)}"
    add("Write hash mismatch", BS + "Write",
        [fastpb.WriteRequest(resource_name=wrong, data=data, finish_write=True)], "client")  # fmt: skip
    add("Write bad offset", BS + "Write",
        [fastpb.WriteRequest(resource_name=good, write_offset=5, data=data, finish_write=True)],
        "client")  # fmt: skip
    huge = f"uploads/{uuid.uuid4()}/blobs/{'d' * 64}/{2**40}"
    add("Write declaring 1 TiB", BS + "Write",
        [fastpb.WriteRequest(resource_name=huge, data=b"x" * 1000)], "client")  # fmt: skip
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    bomb_name = f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{sha(b'tiny').hash}/4"
    add(f"Write zstd bomb (64 MiB from {len(bomb)} bytes, declared 4)", BS + "Write",
        [fastpb.WriteRequest(resource_name=bomb_name, data=bomb, finish_write=True)],
        "client")  # fmt: skip
    add("Write no messages", BS + "Write", [], "client")
    qws = fastpb.message_class("google.bytestream.QueryWriteStatusRequest")
    add("QueryWriteStatus garbage", BS + "QueryWriteStatus", qws(resource_name="\x00/..//"))
    ga = fastpb.GetActionResultRequest()
    ga.action_digest.hash = "e" * 63
    add("GetActionResult bad digest", RE + "ActionCache/GetActionResult", ga)
    ua = fastpb.UpdateActionResultRequest()
    ua.action_digest.CopyFrom(sha(b"action"))
    f = ua.action_result.output_files.add(path="../../etc/passwd")
    f.digest.CopyFrom(sha(b""))
    add("UpdateActionResult ../ output path", RE + "ActionCache/UpdateActionResult", ua)
    ex = fastpb.ExecuteRequest()
    ex.action_digest.CopyFrom(sha(b"no such action"))
    add("Execute missing action", RE + "Execution/Execute", ex, "stream")
    ex = fastpb.ExecuteRequest()
    ex.action_digest.CopyFrom(sha(b""))
    add("Execute empty Action", RE + "Execution/Execute", ex, "stream")
    we = fastpb.message_class(f"{RE[1:]}WaitExecutionRequest")(name="no-such-operation")
    add("WaitExecution unknown", RE + "Execution/WaitExecution", we, "stream")
    lro = fastpb.message_class
    add("GetOperation unknown", OPS + "GetOperation",
        lro("google.longrunning.GetOperationRequest")(name="../x"))  # fmt: skip
    add("ListOperations", OPS + "ListOperations",
        lro("google.longrunning.ListOperationsRequest")(page_size=-1))  # fmt: skip
    add("CancelOperation unknown", OPS + "CancelOperation",
        lro("google.longrunning.CancelOperationRequest")(name=""))  # fmt: skip
    add("Capabilities odd instance", RE + "Capabilities/GetCapabilities",
        lro(f"{RE[1:]}GetCapabilitiesRequest")(instance_name="a//b/../c"))  # fmt: skip
    for method in ("ContentAddressableStorage/FindMissingBlobs", "ActionCache/GetActionResult",
                   "Execution/Execute"):  # fmt: skip
        card = "stream" if method.endswith("Execute") else "unary"
        add(f"undecodable bytes to {method.split('/')[1]}", RE + method, b"\x0a\x05ab", card)
    big = fastpb.FindMissingBlobsRequest()
    for i in range(130_000):  # ~9.4 MiB: above the default receive limit
        big.blob_digests.add(hash=hashlib.sha256(str(i).encode()).hexdigest(), size_bytes=i)
    add("FindMissing 9 MiB message", cas + "FindMissingBlobs", big)
    return out


async def bad_client(target: str, stats: Stats, stop: asyncio.Event, pause: float) -> None:
    inputs = bad_inputs()
    c = Client(target)
    try:
        while not stop.is_set():
            for kind, method, card, req in inputs:
                if stop.is_set():
                    break
                code = "OK"
                try:
                    got = b""
                    if card == "unary":
                        got = await c.unary(method)(req, timeout=30)
                    elif card == "stream":
                        async for _ in c.stream(method)(req, timeout=30):
                            pass
                    else:

                        async def gen(msgs=req):  # type: ignore[no-untyped-def]
                            for m in msgs:  # type: ignore[attr-defined]
                                yield m

                        await c.channel.stream_unary(method)(gen(), timeout=30)
                    if method.endswith("BatchUpdateBlobs"):
                        resp = fastpb.BatchUpdateBlobsResponse.FromString(got)
                        code = "per blob " + grpc.StatusCode.OK.name
                        for r in resp.responses:
                            for sc in grpc.StatusCode:
                                if sc.value[0] == r.status.code:
                                    code = f"per blob {sc.name}"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                    if e.code() in BAD_CODES or e.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                        stats.bad_failures.append(f"{kind}: {code} {e.details()!r}"[:300])
                stats.bad_tried[kind] += 1
                stats.bad_codes.setdefault(kind, collections.Counter())[code] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
    finally:
        await c.close()


# -- server metrics ---------------------------------------------------------------------------


def scrape(socket_path: str) -> dict[str, float]:
    """The daemon's Prometheus text from /metrics on its status socket, as {series: value}."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(socket_path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: reexecd\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    body = b"".join(chunks).partition(b"\r\n\r\n")[2].decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# -- RSS --------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def sample_rss(pid: int, stats: Stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            stats.rss_kib.append(rss_kib(pid))
        except OSError:
            return
        await asyncio.sleep(0.5)


# -- main -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> int:
    banner("reliability under load: reexecd serve, loopback")
    run_id = os.urandom(4).hex()
    config = f"[worker]\nmax_inflight_tasks = {args.slots}\n" if args.slots else ""
    stats = Stats()
    with reexecd("serve", config, name="reliability") as server:
        metrics_socket = str(server.data_dir / "reexecd.sock")
        target = server.target
        stop = asyncio.Event()
        ok_before = await Client(target).unary(RE + "Capabilities/GetCapabilities")(b"", timeout=30)
        assert ok_before is not None
        await asyncio.sleep(1.0)
        rss_start = rss_kib(server.pid)
        metrics_before = scrape(metrics_socket)
        background = [
            asyncio.create_task(sample_rss(server.pid, stats, stop)),
            asyncio.create_task(hogs(target, args.hogs, stop, stats)),
            asyncio.create_task(bad_client(target, stats, stop, args.bad_pause)),
        ]
        total = args.clients * args.actions
        print(f"{args.clients} clients x {args.actions} actions = {total} actions; "
              f"{args.uploaders} uploaders x <= {args.uploads} x {args.upload_kib} KiB; "
              f"{args.hogs} idle connections; 1 bad-input client", flush=True)  # fmt: skip
        with CpuMeter(server) as m:
            work = [
                *(
                    action_client(target, stats, run_id, i, args.actions, args.shared_input)
                    for i in range(args.clients)
                ),
            ]
            tasks = [asyncio.create_task(w) for w in work]
            actions_done = asyncio.Event()
            uploads = [
                asyncio.create_task(
                    uploader(
                        target,
                        stats,
                        args.uploads,
                        args.upload_kib << 10,
                        args.upload_interval,
                        actions_done,
                    )
                )
                for _ in range(args.uploaders)
            ]

            async def progress() -> None:
                while True:
                    await asyncio.sleep(15)
                    print(f"  {time.strftime('%H:%M:%S')} actions done {sum(stats.completed.values())}"
                          f"/{total}, errors {len(stats.action_errors)}, uploads "
                          f"{len(stats.uploaded)}, bad inputs {sum(stats.bad_tried.values())}, "
                          f"RSS {stats.rss_kib[-1] // 1024 if stats.rss_kib else 0} MiB",
                          flush=True)  # fmt: skip

            prog = asyncio.create_task(progress())
            deadline = time.monotonic() + args.max_seconds
            _, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
            actions_done.set()
            if uploads:
                _, pending_uploads = await asyncio.wait(
                    uploads, timeout=max(1.0, deadline - time.monotonic())
                )
                pending |= pending_uploads
            prog.cancel()
            for t in pending:
                t.cancel()
            timed_out = bool(pending)
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await verify_uploads(target, stats)
        # Still alive and answering after everything?
        alive = server.proc.poll() is None
        after = Client(target)
        try:
            await after.unary(RE + "Capabilities/GetCapabilities")(b"", timeout=30)
            answering = True
        except grpc.aio.AioRpcError:
            answering = False
        finally:
            await after.close()
        rss_end = rss_kib(server.pid) if alive else 0
        metrics_after = scrape(metrics_socket)

    def delta(name: str) -> float:
        return metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0)

    missing_series = [
        n
        for n in ("reexec_worker_actions_total", "reexec_actions_dispatched_total",
                  "reexec_action_retries_total")
        if n not in metrics_after
    ]  # fmt: skip
    if missing_series:
        print(f"the daemon's /metrics lacks {missing_series}: cannot count executions")
    ran = delta("reexec_worker_actions_total")
    dispatched = delta("reexec_actions_dispatched_total")
    retried = delta("reexec_action_retries_total")

    expected = {f"{run_id}-c{i}-a{k}" for i in range(args.clients) for k in range(args.actions)}
    never_done = expected - set(stats.completed)
    twice_reported = [k for k, v in stats.completed.items() if v != 1]
    exactly_once = ran == dispatched == total and not retried and not missing_series
    lat = stats.action_latency
    up = stats.upload_latency
    rss_peak = max([*stats.rss_kib, rss_end])
    bad_total = sum(stats.bad_tried.values())

    print()
    print(f"wall {m.wall:.1f} s; {m.summary()}")
    print(table(
        ["figure", "value"],
        [
            ["actions completed (client saw exit 0 + own stdout)", f"{len(stats.completed)}/{total}"],
            ["actions/s over the run", f"{len(lat) / m.wall:.1f}"],
            ["action latency p50 / p99 / max (s)",
             f"{percentile(lat, 50):.2f} / {percentile(lat, 99):.2f} / {max(lat, default=0):.2f}"],
            ["action errors", len(stats.action_errors)],
            ["executions run by the worker / dispatched / retried (server metrics)",
             f"{ran:.0f} / {dispatched:.0f} / {retried:.0f} (expected {total} / {total} / 0)"],
            ["uploads done and intact (read back, SHA-256)", f"{len(stats.uploaded)}"],
            ["upload latency p50 / p99 (s)", f"{percentile(up, 50):.2f} / {percentile(up, 99):.2f}"],
            ["upload errors", len(stats.upload_errors)],
            ["bad inputs tried (kinds)", f"{bad_total} ({len(stats.bad_tried)})"],
            ["bad inputs answered INTERNAL/UNKNOWN/hang", len(stats.bad_failures)],
            ["idle connections held / closed by the server", f"{args.hogs} / {stats.hogs_closed_by_server}"],
            ["server RSS start / peak / end (MiB)",
             f"{rss_start / 1024:.0f} / {rss_peak / 1024:.0f} / {rss_end / 1024:.0f}"],
            ["server alive and answering at the end", "yes" if alive and answering else "NO"],
            ["stopped by the time limit", "YES" if timed_out else "no"],
        ],
    ))  # fmt: skip
    step = max(1, len(stats.rss_kib) // 10)
    timeline = " ".join(str(k // 1024) for k in stats.rss_kib[::step])
    print(
        f"\nserver RSS over the run, MiB, every {step * 0.5:.0f} s: {timeline} (end {rss_end // 1024})"
    )
    print("\nbad inputs, status seen per kind:")
    for kind in stats.bad_tried:
        codes = ", ".join(f"{c} x{n}" for c, n in stats.bad_codes[kind].most_common())
        print(f"  {kind}: {codes}")
    for title, items in [("action errors", stats.action_errors),
                         ("upload errors", stats.upload_errors),
                         ("bad inputs answered badly", sorted(set(stats.bad_failures))),
                         ("reported done twice", twice_reported),
                         ("never completed", sorted(never_done))]:  # fmt: skip
        if items:
            print(f"\n{title} ({len(items)}), first 10:")
            for item in list(items)[:10]:
                print(f"  {item}")
    failed = bool(
        never_done or twice_reported or not exactly_once or stats.action_errors
        or stats.upload_errors or len(stats.uploaded) < args.uploaders
        or stats.bad_failures or not (alive and answering) or timed_out
    )  # fmt: skip
    print(f"\nresult: {'FAILED' if failed else 'all checks passed'}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--actions", type=int, default=60, help="actions per client")
    p.add_argument("--uploaders", type=int, default=32)
    p.add_argument("--uploads", type=int, default=60, help="at most this many blobs per uploader")
    p.add_argument("--upload-kib", type=int, default=512)
    p.add_argument("--upload-interval", type=float, default=3.0, help="seconds between uploads")
    p.add_argument("--hogs", type=int, default=16)
    p.add_argument("--bad-pause", type=float, default=0.05, help="seconds between bad inputs")
    p.add_argument("--slots", type=int, default=0, help="worker slots (0: the default config)")
    p.add_argument("--max-seconds", type=float, default=360.0)
    p.add_argument(
        "--shared-input",
        action="store_true",
        help="every action has the same input and Command (do_not_cache, distinct salt): one "
        "new blob per action instead of four, to tell memory per action from memory per blob",
    )
    return asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
