"""ActionCache and Capabilities RPCs against an in-process daemon."""

from __future__ import annotations

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call, make_config, open_channel, start_daemon
from tests.test_cas_service import sha, upload


@pytest.fixture
def ac(channel):
    return re.ActionCacheStub(channel)


@pytest.fixture
def cas(channel):
    return re.ContentAddressableStorageStub(channel)


ACTION = sha(b"an action")


def result_with(out: bytes, stdout: bytes, tree: re.Tree | None = None) -> re.ActionResult:
    return re.ActionResult(
        output_files=[re.OutputFile(path="out/file", digest=sha(out), is_executable=True)],
        output_directories=[re.OutputDirectory(path="out/dir", tree_digest=sha(bytes(tree)))]
        if tree
        else [],
        stdout_digest=sha(stdout),
        exit_code=0,
    )


async def test_update_then_get(ac, cas):
    await upload(cas, b"output", b"stdout text")
    result = result_with(b"output", b"stdout text")
    stored = await call(
        ac.update_action_result,
        re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
    )
    assert stored.output_files[0].path == "out/file"
    got = await call(ac.get_action_result, re.GetActionResultRequest(action_digest=ACTION))
    assert bytes(got) == bytes(result)


async def test_get_miss_is_not_found(ac):
    with pytest.raises(GRPCError) as e:
        await call(ac.get_action_result, re.GetActionResultRequest(action_digest=sha(b"nope")))
    assert e.value.status is Status.NOT_FOUND


async def test_update_with_missing_blobs_is_failed_precondition(ac, cas):
    await upload(cas, b"output")
    result = result_with(b"output", b"stdout never uploaded")
    with pytest.raises(GRPCError) as e:
        await call(
            ac.update_action_result,
            re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
        )
    assert e.value.status is Status.FAILED_PRECONDITION
    [failure] = e.value.details
    assert isinstance(failure, fastpb.PreconditionFailure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{sha(b'stdout never uploaded').hash}/21")
    ]


async def test_missing_file_inside_tree_hides_entry_and_refuses_update(ac, cas):
    tree = re.Tree(root=re.Directory(files=[re.FileNode(name="f", digest=sha(b"in tree"))]))
    await upload(cas, b"output", b"out", bytes(tree))
    result = result_with(b"output", b"out", tree)
    with pytest.raises(GRPCError) as e:
        await call(
            ac.update_action_result,
            re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
        )
    assert e.value.status is Status.FAILED_PRECONDITION
    await upload(cas, b"in tree")
    await call(
        ac.update_action_result,
        re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
    )
    assert await call(ac.get_action_result, re.GetActionResultRequest(action_digest=ACTION))


async def test_completeness_check_hides_entries_whose_blobs_were_evicted(daemon, ac, cas):
    await upload(cas, b"output", b"out")
    await call(
        ac.update_action_result,
        re.UpdateActionResultRequest(
            action_digest=ACTION, action_result=result_with(b"output", b"out")
        ),
    )
    # Evict the output behind the server's back, as LRU eviction would.
    fs = daemon.cas.inner
    from reexec.cas.digest import Digest

    gone = Digest(sha(b"output").hash, 6)
    fs.blob_path(gone).unlink()
    fs._lru.remove(gone)
    with pytest.raises(GRPCError) as e:
        await call(ac.get_action_result, re.GetActionResultRequest(action_digest=ACTION))
    assert e.value.status is Status.NOT_FOUND


async def test_repeated_hits_skip_the_check_until_a_referenced_blob_is_evicted(daemon, ac, cas):
    await upload(cas, b"output", b"out")
    result = result_with(b"output", b"out")
    await call(
        ac.update_action_result,
        re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
    )
    request = re.GetActionResultRequest(action_digest=ACTION)
    first = await call(ac.get_action_result, request)
    assert daemon.ac.skipped == 0
    again = await call(ac.get_action_result, request)
    assert daemon.ac.skipped == 1  # the check was skipped; same answer
    assert bytes(again) == bytes(first) == bytes(result)
    # A real LRU eviction of the output (the budget is shrunk so the next upload evicts it).
    from reexec.cas.digest import Digest

    fs = daemon.cas.inner
    gone = Digest(sha(b"output").hash, 6)
    kept = Digest(sha(b"out").hash, 3)
    await fs.find_missing([kept])  # `gone` is now the least recently used
    fs._lru.max_bytes = fs._lru.total_bytes
    await upload(cas, b"filler")
    assert fs.stats()["evictions"] == 1 and not fs.blob_path(gone).exists()
    with pytest.raises(GRPCError) as e:
        await call(ac.get_action_result, request)
    assert e.value.status is Status.NOT_FOUND
    assert daemon.ac.skipped == 1


async def test_inline_hints(ac, cas):
    await upload(cas, b"output", b"stdout text")
    await call(
        ac.update_action_result,
        re.UpdateActionResultRequest(
            action_digest=ACTION, action_result=result_with(b"output", b"stdout text")
        ),
    )
    got = await call(
        ac.get_action_result,
        re.GetActionResultRequest(
            action_digest=ACTION, inline_stdout=True, inline_output_files=["out/file"]
        ),
    )
    assert got.stdout_raw == b"stdout text"
    assert got.output_files[0].contents == b"output"
    plain = await call(ac.get_action_result, re.GetActionResultRequest(action_digest=ACTION))
    assert plain.stdout_raw == b"" and plain.output_files[0].contents == b""


async def test_entries_are_per_instance(ac, cas):
    await upload(cas, b"output", b"x")
    await call(
        ac.update_action_result,
        re.UpdateActionResultRequest(
            instance_name="one", action_digest=ACTION, action_result=result_with(b"output", b"x")
        ),
    )
    await call(
        ac.get_action_result, re.GetActionResultRequest(instance_name="one", action_digest=ACTION)
    )
    with pytest.raises(GRPCError) as e:
        await call(
            ac.get_action_result,
            re.GetActionResultRequest(instance_name="two", action_digest=ACTION),
        )
    assert e.value.status is Status.NOT_FOUND


async def test_bad_action_digest(ac):
    with pytest.raises(GRPCError) as e:
        await call(
            ac.get_action_result,
            re.GetActionResultRequest(action_digest=re.Digest(hash="zz", size_bytes=1)),
        )
    assert e.value.status is Status.INVALID_ARGUMENT


async def test_capabilities(channel):
    caps = await call(re.CapabilitiesStub(channel).get_capabilities, re.GetCapabilitiesRequest())
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) >= (2, 3)
    cc = caps.cache_capabilities
    assert re.DigestFunctionValue.SHA256 in cc.digest_functions
    assert re.DigestFunctionValue.BLAKE3 in cc.digest_functions
    assert set(cc.supported_compressors) == {re.CompressorValue.IDENTITY, re.CompressorValue.ZSTD}
    assert cc.max_batch_total_size_bytes == 4032 * 1024  # under gRPC's 4 MiB message limit
    assert cc.action_cache_update_capabilities.update_enabled
    ec = caps.execution_capabilities
    assert ec.digest_function == re.DigestFunctionValue.SHA256
    assert ec.exec_enabled is True  # the default config runs a scheduler


async def test_configured_instances_and_read_only_ac(aio_loop, tmp_path, nursery):
    config = make_config(tmp_path / "d", instances=["main"], ac_allow_updates=False)
    d = await start_daemon(nursery, config)
    ch = await open_channel(d.port)
    try:
        caps_stub = re.CapabilitiesStub(ch)
        await call(caps_stub.get_capabilities, re.GetCapabilitiesRequest(instance_name="main"))
        with pytest.raises(GRPCError) as e:
            await call(caps_stub.get_capabilities, re.GetCapabilitiesRequest(instance_name="x"))
        assert e.value.status is Status.INVALID_ARGUMENT and "'x'" in e.value.message
        ac = re.ActionCacheStub(ch)
        with pytest.raises(GRPCError) as e:
            await call(
                ac.update_action_result,
                re.UpdateActionResultRequest(
                    instance_name="main", action_digest=ACTION, action_result=re.ActionResult()
                ),
            )
        assert e.value.status is Status.PERMISSION_DENIED
    finally:
        ch.close()


# -- unsafe results (issue 9, item 12) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "field"),
    [
        (
            re.ActionResult(
                output_files=[re.OutputFile(path="../../etc/passwd", digest=sha(b"output"))]
            ),
            "action_result.output_files[0].path",
        ),
        (
            re.ActionResult(
                output_files=[re.OutputFile(path="/etc/passwd", digest=sha(b"output"))]
            ),
            "action_result.output_files[0].path",
        ),
        (
            re.ActionResult(output_directories=[re.OutputDirectory(path="a/../../b")]),
            "action_result.output_directories[0].path",
        ),
        (
            re.ActionResult(output_symlinks=[re.OutputSymlink(path="l", target="../../x")]),
            "action_result.output_symlinks[0].target",
        ),
        (
            re.ActionResult(
                output_file_symlinks=[re.OutputSymlink(path="l", target="/etc/passwd")]
            ),
            "action_result.output_file_symlinks[0].target",
        ),
        (
            re.ActionResult(output_directory_symlinks=[re.OutputSymlink(path="../l", target="x")]),
            "action_result.output_directory_symlinks[0].path",
        ),
    ],
)
async def test_update_with_unsafe_paths_is_invalid_argument(ac, cas, result, field):
    await upload(cas, b"output")
    with pytest.raises(GRPCError) as e:
        await call(
            ac.update_action_result,
            re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
        )
    assert e.value.status is Status.INVALID_ARGUMENT
    assert field in e.value.message
    with pytest.raises(GRPCError) as e:
        await call(ac.get_action_result, re.GetActionResultRequest(action_digest=ACTION))
    assert e.value.status is Status.NOT_FOUND


async def test_update_with_unsafe_names_inside_a_tree_is_invalid_argument(ac, cas):
    tree = re.Tree(root=re.Directory(files=[re.FileNode(name="..", digest=sha(b"output"))]))
    await upload(cas, b"output", bytes(tree))
    result = re.ActionResult(
        output_directories=[re.OutputDirectory(path="out", tree_digest=sha(bytes(tree)))]
    )
    with pytest.raises(GRPCError) as e:
        await call(
            ac.update_action_result,
            re.UpdateActionResultRequest(action_digest=ACTION, action_result=result),
        )
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "output_directories[0].tree_digest" in e.value.message
    assert "invalid name '..'" in e.value.message


async def test_large_result_is_checked_off_the_event_loop(ac, cas, monkeypatch):
    import trio

    await upload(cas, b"output")
    files = [re.OutputFile(path=f"out/{i}", digest=sha(b"output")) for i in range(2500)]
    files.append(re.OutputFile(path="../escape", digest=sha(b"output")))
    threaded = []
    real = trio.to_thread.run_sync

    async def spy(fn, *args, **kw):
        threaded.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    with pytest.raises(GRPCError) as e:
        await call(
            ac.update_action_result,
            re.UpdateActionResultRequest(
                action_digest=ACTION, action_result=re.ActionResult(output_files=files)
            ),
        )
    assert e.value.status is Status.INVALID_ARGUMENT
    assert "output_files[2500].path" in e.value.message
    assert threaded
