"""ActionExecutor end to end: a real store, a real cache, real processes."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from grpclib.const import Status

from reexec import fastpb
from reexec.cas.digest import Digest, digest_of
from reexec.cas.filesystem import FilesystemStore
from reexec.cas.verify import VerifyingStore
from reexec.errors import Internal, Unavailable
from reexec.sandbox.cas_access import LocalStoreAccess
from reexec.sandbox.executor import (
    EXECUTING,
    FETCHING,
    UPLOADING,
    ActionExecutor,
    ExecutorSettings,
)
from reexec.sandbox.local_cas import Entry, LocalCas
from reexec.sandbox.materialize import DirectoryCache
from tests.sandbox.fakes import make_dir

SchedulerMessage = fastpb.message_class("reexec.worker.v1.SchedulerMessage")
TEST_USER = "reexec-test-user"
PATH = "/usr/bin:/bin"

DATA = b"input data\n"
SCRIPT = b"""#!/bin/sh
set -e
cat sub/data.txt
echo "to stderr" >&2
mkdir -p out gen/nested
cp sub/data.txt out/result.txt
echo generated > gen/nested/g.txt
printf '#!/bin/sh\\n' > gen/tool && chmod +x gen/tool
exit "${EXIT_CODE:-0}"
"""


@dataclass
class Env:
    root: Path
    fs: FilesystemStore
    access: LocalStoreAccess
    cache: LocalCas
    executor: ActionExecutor
    work: Path
    phases: list[int] = field(default_factory=list)
    counter: int = 0

    async def put(self, data: bytes) -> Digest:
        d = digest_of(data)
        await self.access.store.put_bytes(d, data)
        return d

    async def read(self, d: fastpb.Message) -> bytes:
        return await self.access.store.get_bytes(Digest(d.hash, d.size_bytes))

    async def tree(
        self, script: bytes = SCRIPT, data: bytes | None = DATA, upload_data: bool = True
    ) -> Digest:
        """Input root: run.sh (executable) and sub/data.txt."""
        data_digest = await self.put(data) if upload_data and data is not None else None
        if data_digest is None and data is not None:
            data_digest = digest_of(data)
        sub = make_dir(files=[("data.txt", data_digest)] if data_digest else [])
        await self.put(sub[1])
        root = make_dir(files=[("run.sh", await self.put(script), True)], dirs=[("sub", sub[0])])
        await self.put(root[1])
        return root[0]

    async def start(
        self,
        input_root: Digest,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 10.0,
        **command_fields,  # type: ignore[no-untyped-def]
    ) -> fastpb.Message:
        cmd = fastpb.Command(arguments=argv if argv is not None else ["./run.sh"])
        for k, v in sorted({"PATH": PATH, **(env or {})}.items()):
            cmd.environment_variables.add(name=k, value=v)
        command_fields.setdefault("output_files", ["out/result.txt"])
        command_fields.setdefault("output_directories", ["gen"])
        for k, v in command_fields.items():
            if isinstance(v, str):
                setattr(cmd, k, v)
            else:
                getattr(cmd, k).extend(v)
        cmd_raw = cmd.SerializeToString(deterministic=True)
        action = fastpb.Action()
        cd = await self.put(cmd_raw)
        action.command_digest.hash, action.command_digest.size_bytes = cd.hash, cd.size
        action.input_root_digest.hash = input_root.hash
        action.input_root_digest.size_bytes = input_root.size
        action_raw = action.SerializeToString(deterministic=True)
        ad = await self.put(action_raw)
        self.counter += 1
        msg = SchedulerMessage()
        s = msg.start_execute
        s.operation_name = f"op-{self.counter}"
        s.attempt = 1
        s.action = action_raw
        s.command = cmd_raw
        s.action_digest.hash, s.action_digest.size_bytes = ad.hash, ad.size
        s.digest_function = 1
        s.timeout.FromNanoseconds(int(timeout_s * 1e9))
        s.queued_timestamp.FromNanoseconds(time.time_ns() - 1_000_000)
        return s

    async def run(self, start: fastpb.Message) -> fastpb.Message:
        self.phases = []

        async def progress(phase: int) -> None:
            self.phases.append(phase)

        msg = await self.executor.execute(start, progress)
        assert msg.WhichOneof("kind") == "finished"
        f = msg.finished
        assert (f.operation_name, f.attempt) == (start.operation_name, start.attempt)
        return f

    def work_is_clean(self) -> bool:
        return list(self.work.iterdir()) == []


async def make_env(
    root: Path,
    run_as: str | None = None,
    work: Path | None = None,
    cas_max_bytes: int = 0,
    **settings_kw,  # type: ignore[no-untyped-def]
) -> Env:
    fs = FilesystemStore(root / "cas", cas_max_bytes)
    await fs.start()
    access = LocalStoreAccess(VerifyingStore(fs))
    cache = LocalCas(root / "cache", 0, access)
    await cache.start()
    work = work or root / "work"
    settings = ExecutorSettings(
        work_directory=work, worker_id="worker-7", run_as=run_as, kill_grace_s=0.2, **settings_kw
    )
    executor = ActionExecutor(settings, cache, access, DirectoryCache())
    await executor.start()
    return Env(root, fs, access, cache, executor, work)


@pytest.fixture
async def env(tmp_path: Path) -> Env:
    return await make_env(tmp_path)


def ns(ts: fastpb.Message) -> int:
    return int(ts.ToNanoseconds())


# -- the normal path --------------------------------------------------------------------------


async def test_successful_action(env: Env) -> None:
    f = await env.run(await env.start(await env.tree()))
    assert f.status.code == 0, f.status.message
    assert not f.retryable
    r = f.result
    assert r.exit_code == 0
    assert await env.read(r.stdout_digest) == DATA
    assert await env.read(r.stderr_digest) == b"to stderr\n"
    assert [(o.path, o.is_executable) for o in r.output_files] == [("out/result.txt", False)]
    assert await env.read(r.output_files[0].digest) == DATA
    (od,) = r.output_directories
    assert od.path == "gen"
    tree = fastpb.Tree.FromString(await env.read(od.tree_digest))
    assert [d.name for d in tree.root.directories] == ["nested"]
    assert [(x.name, x.is_executable) for x in tree.root.files] == [("tool", True)]
    assert await env.read(tree.children[0].files[0].digest) == b"generated\n"
    assert fastpb.Directory.FromString(await env.read(od.root_directory_digest)) == tree.root

    m = r.execution_metadata
    assert m.worker == "worker-7"
    stamps = [
        m.queued_timestamp,
        m.worker_start_timestamp,
        m.input_fetch_start_timestamp,
        m.input_fetch_completed_timestamp,
        m.execution_start_timestamp,
        m.execution_completed_timestamp,
        m.output_upload_start_timestamp,
        m.output_upload_completed_timestamp,
        m.worker_completed_timestamp,
    ]
    values = [ns(t) for t in stamps]
    assert all(v > 0 for v in values)
    assert values == sorted(values)

    assert env.phases == [FETCHING, EXECUTING, UPLOADING] == [1, 2, 3]
    assert env.work_is_clean()
    s = env.executor.stats
    assert (s.actions, s.tampered) == (1, 0)
    assert s.links == 2 and s.copies == 0  # both inputs hardlinked from the cache
    inputs = [Entry(digest_of(DATA), False), Entry(digest_of(SCRIPT), True)]
    assert await env.cache.tamper.check(inputs) == []


async def test_working_directory(env: Env) -> None:
    script = b"#!/bin/sh\npwd > here.txt\ncat data.txt > ../copy.txt\n"
    start = await env.start(
        await env.tree(script),
        argv=["../run.sh"],
        working_directory="sub",
        output_files=["here.txt", "../copy.txt"],
        output_directories=[],
    )
    f = await env.run(start)
    assert f.status.code == 0 and f.result.exit_code == 0, await env.read(f.result.stderr_digest)
    files = {o.path: o for o in f.result.output_files}
    assert set(files) == {"here.txt", "../copy.txt"}
    assert (await env.read(files["here.txt"].digest)).endswith(b"/root/sub\n")
    assert await env.read(files["../copy.txt"].digest) == DATA


async def test_relative_work_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = await make_env(tmp_path, work=Path("relative-work"))
    f = await env.run(await env.start(await env.tree()))
    assert f.status.code == 0 and f.result.exit_code == 0, f.status.message


async def test_non_zero_exit_is_ok_with_the_exit_code(env: Env) -> None:
    f = await env.run(await env.start(await env.tree(), env={"EXIT_CODE": "3"}))
    assert f.status.code == 0 and not f.retryable
    assert f.result.exit_code == 3
    assert len(f.result.output_files) == 1  # outputs are still collected
    assert env.work_is_clean()


async def test_command_not_found(env: Env) -> None:
    f = await env.run(await env.start(await env.tree(), argv=["./no-such-tool"]))
    assert f.status.code == 0 and f.result.exit_code == 127
    assert "no-such-tool" in f.message
    assert b"no-such-tool" in await env.read(f.result.stderr_digest)


# -- user errors ------------------------------------------------------------------------------


async def test_missing_input_blob(env: Env) -> None:
    f = await env.run(await env.start(await env.tree(upload_data=False)))
    assert f.status.code == Status.FAILED_PRECONDITION.value
    assert not f.retryable
    (detail,) = f.status.details
    pf = fastpb.PreconditionFailure()
    assert detail.Unpack(pf)
    d = digest_of(DATA)
    assert [(v.type, v.subject) for v in pf.violations] == [("MISSING", f"blobs/{d.hash}/{d.size}")]
    assert env.phases == [FETCHING]
    assert env.work_is_clean()


async def test_missing_directory_blob(env: Env) -> None:
    sub = make_dir(files=[("x", digest_of(b"x"))])  # never uploaded
    root = make_dir(dirs=[("sub", sub[0])])
    await env.put(root[1])
    f = await env.run(await env.start(root[0]))
    assert f.status.code == Status.FAILED_PRECONDITION.value and not f.retryable
    pf = fastpb.PreconditionFailure()
    assert f.status.details[0].Unpack(pf)
    assert [v.subject for v in pf.violations] == [f"blobs/{sub[0].hash}/{sub[0].size}"]


async def test_invalid_input_tree(env: Env) -> None:
    root = make_dir(symlinks=[("escape", "../../etc/passwd")])
    await env.put(root[1])
    f = await env.run(await env.start(root[0]))
    assert f.status.code == Status.INVALID_ARGUMENT.value and not f.retryable
    assert "escape" in f.status.message
    assert env.work_is_clean()


@pytest.mark.parametrize(
    "argv, env_vars, fields",
    [
        ([], {}, {}),
        (["sh", "-c", "nul\0byte"], {}, {}),
        (["true"], {"BAD=NAME": "x"}, {}),
        (["true"], {}, {"output_files": ["/abs"]}),
        (["true"], {}, {"working_directory": "../up"}),
    ],
    ids=["no-arguments", "nul-in-argument", "bad-env-name", "absolute-output", "escaping-wd"],
)
async def test_invalid_command(env: Env, argv, env_vars, fields) -> None:  # type: ignore[no-untyped-def]
    f = await env.run(await env.start(await env.tree(), argv=argv, env=env_vars, **fields))
    assert f.status.code == Status.INVALID_ARGUMENT.value, f.status.message
    assert not f.retryable
    assert env.work_is_clean()


async def test_invalid_digest_function(env: Env) -> None:
    start = await env.start(await env.tree())
    start.digest_function = 77
    f = await env.run(start)
    assert f.status.code == Status.INVALID_ARGUMENT.value and not f.retryable


async def test_timeout_keeps_partial_stdout(env: Env) -> None:
    script = b"#!/bin/sh\necho partial\necho err >&2\nexec sleep 30\n"
    t0 = trio.current_time()
    f = await env.run(await env.start(await env.tree(script), timeout_s=0.5))
    assert trio.current_time() - t0 < 5
    assert f.status.code == Status.DEADLINE_EXCEEDED.value and not f.retryable
    assert "timeout" in f.status.message
    assert await env.read(f.result.stdout_digest) == b"partial\n"
    assert await env.read(f.result.stderr_digest) == b"err\n"
    assert env.phases == [FETCHING, EXECUTING, UPLOADING]
    assert env.work_is_clean()


# -- infrastructure errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        # Issue 9 item 9: only an allow-list of infrastructure failures is retried.
        (Unavailable("the CAS is unreachable"), Status.UNAVAILABLE, True),
        (OSError(errno.ENOSPC, "No space left on device"), Status.INTERNAL, True),
        (OSError(errno.EIO, "Input/output error"), Status.INTERNAL, True),
        (Internal("downloaded blob does not match its digest"), Status.INTERNAL, False),
        (OSError(errno.EACCES, "Permission denied"), Status.INTERNAL, False),
        (RuntimeError("surprise"), Status.INTERNAL, False),
    ],
    ids=["unavailable", "enospc", "eio", "internal", "eacces", "bug"],
)
async def test_only_infrastructure_failures_are_retryable(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    code: Status,
    retryable: bool,
) -> None:
    async def broken_fetch(digest: Digest, path: Path) -> None:
        raise error

    async def no_local(digests: list[Digest]) -> dict[Digest, str]:
        return {}  # force the fetch path, which fails

    monkeypatch.setattr(env.access, "local_sources", no_local)
    monkeypatch.setattr(env.access, "fetch_to", broken_fetch)
    f = await env.run(await env.start(await env.tree()))
    assert f.status.code == code.value
    assert f.retryable is retryable
    shown = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
    assert shown in f.status.message
    assert env.work_is_clean()


# -- cancellation -----------------------------------------------------------------------------


async def test_cancel_kills_the_action_and_cleans_up(env: Env, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n".encode()
    start = await env.start(await env.tree(script))
    executing = trio.Event()

    async def progress(phase: int) -> None:
        if phase == EXECUTING:
            executing.set()

    with trio.move_on_after(10) as outer:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await env.executor.execute(start, progress)
                raise AssertionError("execute returned despite the cancellation")

            nursery.start_soon(run)
            await executing.wait()
            while not pid_file.exists() or not pid_file.read_text().strip():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not outer.cancelled_caught
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert env.work_is_clean()
    # The executor is still usable.
    f = await env.run(await env.start(await env.tree()))
    assert f.status.code == 0 and f.result.exit_code == 0


async def test_cancelled_action_that_modified_an_input_is_still_checked(env: Env) -> None:
    script = b"#!/bin/sh\necho '# tampered' >> run.sh\nexec sleep 30\n"
    root = await env.tree(script)
    start = await env.start(root)
    executing = trio.Event()

    async def progress(phase: int) -> None:
        if phase == EXECUTING:
            executing.set()

    with trio.move_on_after(0.5):
        await env.executor.execute(start, progress)
    assert executing.is_set()
    entry = Entry(digest_of(script), True)
    assert not env.cache.path(entry).exists()
    assert env.executor.stats.tampered == 1
    assert env.work_is_clean()


# -- tamper safety ----------------------------------------------------------------------------


async def test_modified_executable_input_is_detected_and_refetched(env: Env) -> None:
    script = b"#!/bin/sh\necho '# tampered' >> run.sh\ncat run.sh\n"
    root = await env.tree(script)
    f = await env.run(await env.start(root, output_files=[], output_directories=[]))
    assert f.status.code == 0 and f.result.exit_code == 0
    assert (await env.read(f.result.stdout_digest)).endswith(b"# tampered\n")
    assert env.executor.stats.tampered == 1
    entry = Entry(digest_of(script), True)
    assert not env.cache.path(entry).exists()
    # The executable entry was a copy: the store is intact, the next run gets a fresh copy.
    assert await env.fs.find_missing([digest_of(script)]) == []
    f = await env.run(await env.start(root, output_files=[], output_directories=[]))
    assert await env.read(f.result.stdout_digest) == script + b"# tampered\n"
    assert env.executor.stats.tampered == 2


async def test_modified_input_sharing_the_stores_file_is_dropped_from_the_cas(env: Env) -> None:
    script = b"#!/bin/sh\nwc -c < sub/data.txt\necho appended >> sub/data.txt\n"
    root = await env.tree(script)
    data = digest_of(DATA)
    assert env.fs.blob_path(data).exists()
    f = await env.run(await env.start(root, output_files=[], output_directories=[]))
    assert f.status.code == 0 and f.result.exit_code == 0
    assert await env.read(f.result.stdout_digest) == b"%d\n" % len(DATA)
    assert env.executor.stats.tampered == 1
    assert not env.cache.path(Entry(data, False)).exists()
    # The cache entry was the store's blob file: the CAS must not serve the corrupted bytes.
    assert await env.fs.find_missing([data]) == [data]
    assert env.access.discarded == 1
    f = await env.run(await env.start(root, output_files=[], output_directories=[]))
    assert f.status.code == Status.FAILED_PRECONDITION.value
    # The client uploads it again: the next action reads the right bytes.
    await env.put(DATA)
    script2 = b"#!/bin/sh\ncat sub/data.txt\n"
    f = await env.run(
        await env.start(await env.tree(script2), output_files=[], output_directories=[])
    )
    assert f.status.code == 0 and await env.read(f.result.stdout_digest) == DATA
    assert env.executor.stats.tampered == 1


# -- run_as -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("run_as needs root")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("useradd is not installed")
    subprocess.run([useradd, "--system", "--no-create-home", TEST_USER], check=True)
    return pwd.getpwnam(TEST_USER)


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """pytest's tmp_path is not traversable for other users: a 0755 directory elsewhere."""
    path = Path(tempfile.mkdtemp(prefix="reexec-executor-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def user_env(test_user: pwd.struct_passwd, traversable_dir: Path) -> AsyncIterator[Env]:
    yield await make_env(traversable_dir, run_as=TEST_USER)


async def test_run_as_user_cannot_modify_inputs_but_writes_outputs(
    user_env: Env, test_user: pwd.struct_passwd
) -> None:
    env = user_env
    script = b"""#!/bin/sh
id -u
if echo appended >> sub/data.txt; then echo modified; else echo denied; fi
if echo appended >> run.sh; then echo modified; else echo denied; fi
mkdir -p out gen/nested
cp sub/data.txt out/result.txt
echo generated > gen/nested/g.txt
"""
    root = await env.tree(script)
    start = await env.start(root)
    f = await env.run(start)
    stdout = await env.read(f.result.stdout_digest)
    stderr = await env.read(f.result.stderr_digest)
    assert f.status.code == 0 and f.result.exit_code == 0, (f.status.message, stdout, stderr)
    assert stdout == f"{test_user.pw_uid}\ndenied\ndenied\n".encode()
    assert b"Permission denied" in stderr
    assert [o.path for o in f.result.output_files] == ["out/result.txt"]
    assert await env.read(f.result.output_files[0].digest) == DATA
    assert [d.path for d in f.result.output_directories] == ["gen"]
    # Inputs and the store are intact; nothing was flagged.
    entries = [Entry(digest_of(DATA), False), Entry(digest_of(script), True)]
    assert await env.cache.tamper.check(entries) == []
    assert env.executor.stats.tampered == 0
    assert env.fs.blob_path(digest_of(DATA)).read_bytes() == DATA
    # Outputs adopted into the cache belong to the worker, not to the action's user.
    out = Entry(digest_of(DATA), False)
    st = os.stat(env.cache.path(out))
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o444)
    for e in (Entry(digest_of(b"generated\n"), False),):
        assert os.stat(env.cache.path(e)).st_uid == 0
    assert env.work_is_clean()


async def test_run_as_user_owns_created_working_and_output_directories(user_env: Env) -> None:
    env = user_env
    script = b"#!/bin/sh\nset -e\necho hi > o.txt\necho deep > a/b/p.txt\nmkdir d && echo x > d/f\n"
    start = await env.start(
        await env.tree(script),
        argv=["../../run.sh"],
        working_directory="w/x",
        output_files=["o.txt", "a/b/p.txt"],
        output_directories=["d"],
    )
    f = await env.run(start)
    stderr = await env.read(f.result.stderr_digest)
    assert f.status.code == 0 and f.result.exit_code == 0, stderr
    assert [o.path for o in f.result.output_files] == ["o.txt", "a/b/p.txt"]
    assert [d.path for d in f.result.output_directories] == ["d"]
    assert env.work_is_clean()
