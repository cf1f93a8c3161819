"""Issue 9 on the worker: missing inputs at any stage, output limits, final vs retryable errors,
one action's outputs never evicting each other from the CAS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from grpclib.const import Status

from reexec import fastpb
from reexec.cas.digest import Digest, digest_of
from reexec.cas.store import BlobNotFound
from tests.sandbox.test_executor import DATA, SCRIPT, make_env


def violations(f: fastpb.Message) -> list[tuple[str, str]]:
    pf = fastpb.PreconditionFailure()
    assert f.status.details[0].Unpack(pf)
    return [(v.type, v.subject) for v in pf.violations]


def subject(d: Digest) -> str:
    return f"blobs/{d.hash}/{d.size}"


# -- item 7: a blob evicted after FindMissingBlobs ------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
async def test_input_gone_at_read_time_is_missing_not_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    env = await make_env(tmp_path)
    root = await env.tree()
    files = {digest_of(DATA), digest_of(SCRIPT)}
    real_read_small = env.access.read_small

    async def no_local(digests: Sequence[Digest]) -> dict[Digest, str]:
        return {}

    async def evicted(digest: Digest, path: Path) -> None:
        raise BlobNotFound(digest)  # FindMissingBlobs said present; the read finds it gone

    async def read_small(digests: Sequence[Digest]) -> dict[Digest, bytes]:
        for d in digests:
            if d in files:
                raise BlobNotFound(d)
        return await real_read_small(digests)

    monkeypatch.setattr(env.access, "local_sources", no_local)
    monkeypatch.setattr(env.access, "fetch_to", evicted)
    monkeypatch.setattr(env.access, "read_small", read_small)
    monkeypatch.setattr(env.access, "prefers_batches", batched)
    f = await env.run(await env.start(root))
    assert f.status.code == Status.FAILED_PRECONDITION.value and not f.retryable
    assert sorted(violations(f)) == sorted(("MISSING", subject(d)) for d in files)


async def test_directory_gone_at_read_time_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await make_env(tmp_path)
    root = await env.tree()
    real = env.access.read_small

    async def read_small(digests: Sequence[Digest]) -> dict[Digest, bytes]:
        if root not in digests:
            raise BlobNotFound(digests[0])  # the sub-directory, evicted since
        return await real(digests)

    monkeypatch.setattr(env.access, "read_small", read_small)
    f = await env.run(await env.start(root))
    assert f.status.code == Status.FAILED_PRECONDITION.value and not f.retryable
    ((kind, subj),) = violations(f)
    assert kind == "MISSING" and subj != subject(root)


# -- item 4: output limits ----------------------------------------------------------------------


async def test_huge_sparse_output_fails_fast_and_evicts_nothing(tmp_path: Path) -> None:
    env = await make_env(tmp_path, cas_max_bytes=64 << 20, max_output_bytes=1 << 30)
    other = await env.put(b"another client's blob")
    script = b"#!/bin/sh\nmkdir -p out\ntruncate -s 12G out/result.txt\n"
    t0 = trio.current_time()
    f = await env.run(await env.start(await env.tree(script)))
    assert trio.current_time() - t0 < 10  # measured by size, never read
    assert f.status.code == Status.RESOURCE_EXHAUSTED.value and not f.retryable
    assert "output file 'out/result.txt' is 12884901888 bytes" in f.status.message
    assert "the CAS accepts for one blob" in f.status.message
    assert await env.fs.find_missing([other]) == []
    assert env.fs.stats()["evictions"] == 0
    assert env.work_is_clean()


async def test_total_output_limit(tmp_path: Path) -> None:
    env = await make_env(tmp_path, max_output_bytes=10_000)
    script = b"#!/bin/sh\nmkdir -p out gen\nhead -c 6000 /dev/zero > gen/a\nhead -c 6000 /dev/zero > gen/b\n"
    f = await env.run(await env.start(await env.tree(script)))
    assert f.status.code == Status.RESOURCE_EXHAUSTED.value and not f.retryable
    assert "worker.max_output_bytes" in f.status.message and "'gen/b'" in f.status.message


async def test_stdout_limit(tmp_path: Path) -> None:
    env = await make_env(tmp_path, max_stdio_bytes=1000)
    script = b"#!/bin/sh\nhead -c 2000 /dev/zero\n"
    f = await env.run(await env.start(await env.tree(script)))
    assert f.status.code == Status.RESOURCE_EXHAUSTED.value and not f.retryable
    assert "stdout is 2000 bytes" in f.status.message
    assert "worker.max_stdio_bytes" in f.status.message


async def test_runaway_stdout_is_killed_while_it_runs(tmp_path: Path) -> None:
    env = await make_env(tmp_path, max_stdio_bytes=100_000)
    t0 = trio.current_time()
    f = await env.run(await env.start(await env.tree(b"#!/bin/sh\nexec yes\n"), timeout_s=30))
    assert trio.current_time() - t0 < 5  # not the action's 30 s timeout
    assert f.status.code == Status.RESOURCE_EXHAUSTED.value and not f.retryable
    assert "stdout passed the worker's limit of 100000 bytes" in f.status.message
    assert env.work_is_clean()


async def test_outputs_of_one_action_do_not_evict_each_other(tmp_path: Path) -> None:
    env = await make_env(tmp_path, cas_max_bytes=250_000)
    script = (
        b"#!/bin/sh\nhead -c 100000 /dev/urandom\nmkdir -p gen\n"
        b"for i in 1 2 3; do head -c 100000 /dev/urandom > gen/$i; done\n"
    )
    f = await env.run(await env.start(await env.tree(script)))
    assert f.status.code == 0, f.status.message
    tree = fastpb.Tree.FromString(await env.read(f.result.output_directories[0].tree_digest))
    wanted = [Digest(f.result.stdout_digest.hash, f.result.stdout_digest.size_bytes)]
    wanted += [Digest(x.digest.hash, x.digest.size_bytes) for x in tree.root.files]
    assert len(wanted) == 4
    # Held while the action uploads: everything it reports is there when it reports it.
    assert await env.fs.find_missing(wanted) == []


# -- item 9: a user error is final ----------------------------------------------------------------


async def test_non_utf8_output_name_is_a_final_precise_error(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    script = b"#!/bin/sh\nmkdir -p gen\necho x > \"gen/$(printf 'bad\\377name')\"\n"
    f = await env.run(await env.start(await env.tree(script)))
    assert f.status.code == Status.INVALID_ARGUMENT.value and not f.retryable
    assert "output directory 'gen' holds b'bad\\xffname'" in f.status.message
    assert "not valid UTF-8" in f.status.message
    assert env.work_is_clean()
