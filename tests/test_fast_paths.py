"""The fast paths (RPCs answered on grpclib's side without a Trio crossing) give exactly the
answers of the Trio paths.

One scenario of FindMissingBlobs, ByteStream Write/Read and GetActionResult calls, good and bad,
runs against two fresh daemons: one with fast paths, one without (`rpc.FAST_PATHS = False`).
Every response (serialized) or error (status and message) must be the same, and the calls the
fast paths exist for must not have crossed into Trio.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from grpclib.exceptions import GRPCError

from reexec import rpc
from reexec.cas import bytestream_service
from reexec.cas.ac_service import ActionCacheService
from reexec.cas.action_cache import ActionKey
from reexec.cas.digest import Digest
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.gen.google import bytestream as bs
from tests.conftest import call, collect, make_config, open_channel, start_daemon
from tests.test_cas_service import sha, upload

Outcome = tuple[str, Any, int]  # (label, response bytes or (status, message), crossings)


class Crossings:
    """Counts crossings into Trio (both places the services take them from)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for module in (rpc, bytestream_service):
            real = module.in_trio

            def counted(fn: Any, *args: Any, _real: Any = real) -> Any:
                self.count += 1
                return _real(fn, *args)

            monkeypatch.setattr(module, "in_trio", counted)


async def run_scenario(nursery, tmp_path, monkeypatch, *, fast: bool) -> list[Outcome]:
    monkeypatch.setattr(rpc, "FAST_PATHS", fast)
    daemon = await start_daemon(nursery, make_config(tmp_path / ("fast" if fast else "slow")))
    channel = await open_channel(daemon.port)
    cas, ac = re.ContentAddressableStorageStub(channel), re.ActionCacheStub(channel)
    stream = bs.ByteStreamStub(channel)
    crossings = Crossings(monkeypatch)
    out: list[Outcome] = []

    async def step(label: str, fn: Callable[[], Awaitable[Any]]) -> None:
        before = crossings.count
        try:
            response = await fn()
            got: Any = (
                [bytes(r) for r in response] if isinstance(response, list) else bytes(response)
            )
        except GRPCError as e:
            got = (e.status, e.message)
        out.append((label, got, crossings.count - before))

    def fmb(*digests: re.Digest) -> Callable[[], Awaitable[Any]]:
        request = re.FindMissingBlobsRequest(blob_digests=list(digests))
        return lambda: call(cas.find_missing_blobs, request)

    def write(name: str, data: bytes, *parts: int) -> Callable[[], Awaitable[Any]]:
        cuts = [0, *parts, len(data)]
        messages = [
            bs.WriteRequest(
                resource_name=name if i == 0 else "",
                write_offset=cuts[i],
                data=data[cuts[i] : cuts[i + 1]],
                finish_write=i == len(cuts) - 2,
            )
            for i in range(len(cuts) - 1)
        ]
        return lambda: call(stream.write, messages)

    def upload_name(digest: re.Digest) -> str:
        return f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

    def read(name: str, offset: int = 0, limit: int = 0) -> Callable[[], Awaitable[Any]]:
        request = bs.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
        return lambda: collect(stream.read, request)

    def gar(action: re.Digest, **inline: Any) -> Callable[[], Awaitable[Any]]:
        request = re.GetActionResultRequest(action_digest=action, **inline)
        return lambda: call(ac.get_action_result, request)

    rand = random.Random(13)  # both runs must send the same bytes
    a, b, big = b"blob a" * 100, rand.randbytes(3000), rand.randbytes(200_000)
    tree = re.Tree(root=re.Directory(files=[re.FileNode(name="f", digest=sha(a))]))
    other = b"never stored"
    try:
        await step("fmb none stored", fmb(sha(a), sha(b), sha(b""), sha(a)))
        await step("write a", write(upload_name(sha(a)), a))
        await step("write a again, other bytes", write(upload_name(sha(a)), a[::-1]))
        await step("write bad hash", write(upload_name(sha(other)), a[: len(other)]))
        await step("write short", write(upload_name(sha(b)), b[:100]))
        await step("write b in parts", write(upload_name(sha(b)), b, 1000, 2000))
        await step("write big", write(upload_name(sha(big)), big))
        await step("write empty", write(upload_name(sha(b"")), b""))
        await step("write bad name", write("uploads/x/blobs/zz/1", b"z"))
        await step("fmb some stored", fmb(sha(a), sha(b), sha(big), sha(other)))
        await step("fmb bad hash", fmb(re.Digest(hash="XYZ", size_bytes=1)))
        await step("fmb negative size", fmb(re.Digest(hash="ab" * 32, size_bytes=-1)))
        await step("read a", read(f"blobs/{sha(a).hash}/{len(a)}"))
        await step("read big", read(f"blobs/{sha(big).hash}/{len(big)}"))
        await step("read a at offset", read(f"blobs/{sha(a).hash}/{len(a)}", 10, 20))
        await step("read missing", read(f"blobs/{sha(other).hash}/{len(other)}"))
        await step("read bad name", read("blobs/nothex/3"))
        await step("read past end", read(f"blobs/{sha(a).hash}/{len(a)}", len(a) + 1))
        await upload(cas, bytes(tree))
        result = re.ActionResult(
            output_files=[re.OutputFile(path="out/a", digest=sha(a))],
            output_directories=[re.OutputDirectory(path="out/d", tree_digest=sha(bytes(tree)))],
            stdout_digest=sha(b),
        )
        action = sha(b"action")
        await step("gar miss", gar(action))
        await step(
            "update",
            lambda: call(
                ac.update_action_result,
                re.UpdateActionResultRequest(action_digest=action, action_result=result),
            ),
        )
        await step("gar hit", gar(action))
        await step("gar hit again", gar(action))
        await step("gar inline", gar(action, inline_stdout=True, inline_output_files=["out/a"]))
        # An entry naming a blob the CAS lacks (put behind the service's back) is a miss.
        service = next(s for s in daemon.services if isinstance(s, ActionCacheService))
        incomplete = re.ActionResult(output_files=[re.OutputFile(path="o", digest=sha(other))])
        broken = sha(b"broken action")
        await service.ac.put(
            ActionKey("", Digest(broken.hash, broken.size_bytes)), bytes(incomplete)
        )
        await step("gar incomplete", gar(broken))
        await step("gar bad digest", gar(re.Digest(hash="short", size_bytes=1)))
    finally:
        channel.close()
    return out


# Served without a crossing when fast paths are on (the rest may cross either way).
FAST_STEPS = {
    "fmb none stored",
    "write a",
    "write a again, other bytes",
    "write bad hash",
    "write empty",
    "write bad name",
    "fmb some stored",
    "fmb bad hash",
    "fmb negative size",
    "read a",
    "read missing",
    "read bad name",
    "read past end",
    "gar miss",
    "gar hit",
    "gar hit again",
    "gar incomplete",
    "gar inline",
}


async def test_fast_paths_answer_like_the_trio_paths(nursery, tmp_path, monkeypatch, aio_loop):
    fast = await run_scenario(nursery, tmp_path, monkeypatch, fast=True)
    slow = await run_scenario(nursery, tmp_path, monkeypatch, fast=False)
    assert [(label, got) for label, got, _ in fast] == [(label, got) for label, got, _ in slow]
    crossed = {label for label, _, n in fast if n}
    assert not crossed & FAST_STEPS, f"fast paths crossed into Trio: {crossed & FAST_STEPS}"
    # Without fast paths every one of them crosses.
    assert all(n for label, _, n in slow if label in FAST_STEPS)
    # Sanity: the scenario exercised both successes and errors.
    outcomes = dict((label, got) for label, got, _ in fast)
    assert isinstance(outcomes["gar inline"], bytes)
    assert outcomes["gar incomplete"][0].name == "NOT_FOUND"
    assert outcomes["write bad hash"][0].name == "INVALID_ARGUMENT"
