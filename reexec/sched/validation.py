"""Checks an ExecuteRequest before anything is queued.

Errors here are gRPC errors of the Execute call itself (REAPI: errors found while creating the
operation). Missing Action, Command or input root is FAILED_PRECONDITION with one MISSING
violation per blob, which makes clients re-upload them.

The input root's Directory DAG is read here (directories only, never files) and its expanded
size bounded from the DAG with memoised subtree sizes (`reexec.cas.tree_size`) before anything
is queued: a few dozen directories that each name the previous one twice would otherwise expand
to 2^40 entries on the worker. Sizes are cached by digest, so an input root seen before costs
one lookup and a new one only its new directories. Missing directories are MISSING violations;
files are checked by the worker when it fetches them (checking every file here would read the
whole tree on the scheduler for each Execute).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.digest import Digest, make_digest
from reexec.cas.pool import for_each
from reexec.cas.store import BlobNotFound, Store
from reexec.cas.tree_size import (
    MAX_TREE_DEPTH,
    MAX_TREE_ENTRIES,
    SizeCache,
    TreeSize,
    TreeTooLarge,
    subtree_sizes,
)
from reexec.errors import InvalidArgument, missing_blobs_error
from reexec.rpc import check_instance
from reexec.sched.action_blobs import ActionBlobs
from reexec.sched.config import SchedulerConfig
from reexec.sched.matching import queue_key
from reexec.sched.scheduler import ActionSpec

# A level of the input tree with more than this many bytes of new Directory messages is parsed,
# and a tree with more than this many bytes of new directories sized, in a worker thread: the
# event loop never does work that grows with the tree. Work grows with the entries, which the
# bytes bound (a DirectoryNode takes ~80 of them): 64 KiB is a few milliseconds of parsing.
THREAD_BYTES = 64 << 10
# Directory reads in flight at once while loading one input tree.
READ_CONCURRENCY = 16
# Loops over a level's subdirectories, and over new sizes entering the cache, give other tasks
# a turn this often (~5 ms of work).
CHECKPOINT_EVERY = 512


async def _read(cas: Store, digest: Digest) -> bytes | None:
    try:
        return await cas.get_bytes(digest)
    except BlobNotFound:
        return None


def _parse(cls: type, data: bytes, what: str, digest: Digest) -> fastpb.Message:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"{what} {digest.blob_path} is not a valid {cls.__name__} message"
        ) from None


def _timeout_s(action: fastpb.Message, settings: SchedulerConfig) -> float:
    if not action.HasField("timeout"):
        requested = 0.0
    else:
        t = action.timeout
        if t.seconds < 0 or t.nanos < 0:
            raise InvalidArgument("Action.timeout is negative")
        requested = t.seconds + t.nanos / 1e9
    if requested == 0:
        return min(settings.default_action_timeout_s, settings.max_action_timeout_s)
    if settings.max_action_timeout_s and requested > settings.max_action_timeout_s:
        raise InvalidArgument(
            f"Action.timeout {requested:g}s is above this server's maximum of "
            f"{settings.max_action_timeout_s:g}s"
        )
    return requested


def _parse_level(
    raws: dict[Digest, bytes], fn: int
) -> dict[Digest, tuple[fastpb.Message, list[Digest]]]:
    """Parse one level's Directory messages and their subdirectory digests (may run in a
    thread: touches nothing shared)."""
    out = {}
    for digest, raw in raws.items():
        try:
            directory = fastpb.Directory.FromString(raw)
        except DecodeError:
            raise InvalidArgument(
                f"input directory {digest.blob_path} is not a valid Directory message"
            ) from None
        children = []
        for node in directory.directories:
            try:
                children.append(make_digest(node.digest.hash, node.digest.size_bytes, fn))
            except InvalidArgument as e:
                raise InvalidArgument(
                    f"subdirectory {node.name!r} of {digest.blob_path}: {e.message}"
                ) from None
        out[digest] = (directory, children)
    return out


async def _read_many(cas: Store, digests: list[Digest]) -> dict[Digest, bytes | None]:
    out: dict[Digest, bytes | None] = {}

    async def one(_: int, d: Digest) -> None:
        out[d] = await _read(cas, d)

    await for_each(digests, one, READ_CONCURRENCY)
    return out


async def input_tree_size(
    cas: Store,
    root: Digest,
    cache: SizeCache,
    *,
    max_entries: int = MAX_TREE_ENTRIES,
    max_depth: int = MAX_TREE_DEPTH,
) -> TreeSize:
    """The expanded size of the input tree under `root`, from its DAG.

    Reads each directory not already sized in `cache` once, level by level; raises
    FAILED_PRECONDITION (MISSING violations) for missing directories and TreeTooLarge
    (INVALID_ARGUMENT) for a tree over the limits, at the latest once the distinct directories
    alone exceed them. Work that grows with the tree runs in a worker thread.
    """
    hit = cache.get(root)
    if hit is not None:
        return hit
    fn = int(root.function)
    directories: dict[Digest, fastpb.Message] = {}
    known: dict[Digest, TreeSize] = {}
    missing: list[Digest] = []
    loaded_bytes = 0
    level = [root]
    while level:
        if len(directories) + len(level) > max_entries + 1:
            # Every distinct directory but the root is at least one entry of the tree.
            raise TreeTooLarge(f"the tree has more than {max_entries:,} directories")
        raws = await _read_many(cas, level)
        present = {d: raw for d, raw in raws.items() if raw is not None}
        missing.extend(d for d, raw in raws.items() if raw is None)
        level_bytes = sum(map(len, present.values()))
        loaded_bytes += level_bytes
        if level_bytes > THREAD_BYTES:
            parsed = await trio.to_thread.run_sync(_parse_level, present, fn)
        else:
            parsed = _parse_level(present, fn)
        next_level: dict[Digest, None] = {}
        seen_children = 0
        for digest, (directory, children) in parsed.items():
            directories[digest] = directory
            for child in children:
                seen_children += 1
                if seen_children % CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()
                if child in directories or child in known or child in next_level:
                    continue
                size = cache.get(child)
                if size is not None:
                    known[child] = size
                else:
                    next_level[child] = None
        level = list(next_level)
        await trio.lowlevel.checkpoint()
    if missing:
        raise missing_blobs_error(
            f"the input tree under {root.blob_path}", [d.blob_path for d in missing]
        )

    function = root.function

    def size_all() -> dict[Digest, TreeSize]:
        return subtree_sizes(
            root,
            directories,
            # Every child digest was validated by _parse_level: no need to check it again.
            lambda node: Digest(node.digest.hash, node.digest.size_bytes, function),
            known=known,
            max_entries=max_entries,
            max_depth=max_depth,
        )

    if loaded_bytes > THREAD_BYTES:
        sizes = await trio.to_thread.run_sync(size_all)
    else:
        sizes = size_all()
    items = list(sizes.items())
    for start in range(0, len(items), CHECKPOINT_EVERY):
        if start:
            await trio.lowlevel.checkpoint()
        cache.update(items[start : start + CHECKPOINT_EVERY])
    return sizes[root]


async def validate_execute(
    request: fastpb.Message,
    cas: Store,
    settings: SchedulerConfig,
    instances: Sequence[str],
    tree_sizes: SizeCache | None = None,
    blobs: ActionBlobs | None = None,
) -> ActionSpec:
    """The ActionSpec for `request`: everything the scheduler keeps about the action.

    Operations hold digests, not blobs, so records stay small; the worker connection needs the
    Action and Command again when it starts the action (`WorkerService._start_message`): a
    valid request's bytes are left in `blobs` for it, so it need not read them again.
    `tree_sizes` carries input tree sizes across calls (a fresh cache if None)."""
    check_instance(instances, request.instance_name)
    d = request.action_digest
    digest = make_digest(d.hash, d.size_bytes, request.digest_function)
    fn = int(digest.function)

    action_bytes = await _read(cas, digest)
    if action_bytes is None:
        raise missing_blobs_error("Execute: the Action", [digest.blob_path])
    action = _parse(fastpb.Action, action_bytes, "Action", digest)
    if not action.HasField("command_digest"):
        raise InvalidArgument(f"Action {digest.blob_path} has no command_digest")
    command_digest = make_digest(action.command_digest.hash, action.command_digest.size_bytes, fn)
    if not action.HasField("input_root_digest"):
        raise InvalidArgument(f"Action {digest.blob_path} has no input_root_digest")
    root_digest = make_digest(
        action.input_root_digest.hash, action.input_root_digest.size_bytes, fn
    )

    command_bytes = await _read(cas, command_digest)
    missing = [] if command_bytes is not None else [command_digest.blob_path]
    if not await cas.has(root_digest):
        missing.append(root_digest.blob_path)
    if missing:
        raise missing_blobs_error(f"Execute {digest.blob_path}", missing)
    assert command_bytes is not None
    command = _parse(fastpb.Command, command_bytes, "Command", command_digest)
    if not command.arguments:
        raise InvalidArgument(f"Command {command_digest.blob_path} has no arguments")
    try:
        await input_tree_size(cas, root_digest, tree_sizes or SizeCache())
    except TreeTooLarge as e:
        raise TreeTooLarge(
            f"Action {digest.blob_path}: input root {root_digest.blob_path}: {e.message}"
        ) from None

    timeout_s = _timeout_s(action, settings)
    # REAPI 2.2 moved the platform to the Action; older clients (Bazel 4) set both.
    platform = action.platform if action.HasField("platform") else command.platform
    key = queue_key(
        [(p.name, p.value) for p in platform.properties], settings.rules, settings.modifiers
    )
    policy = request.execution_policy
    spec = ActionSpec(
        instance=request.instance_name,
        digest=digest,
        priority=policy.priority if request.HasField("execution_policy") else 0,
        queue_key=key,
        do_not_cache=action.do_not_cache,
        skip_cache_lookup=request.skip_cache_lookup,
        timeout_s=timeout_s,
    )
    if blobs is not None:
        blobs.put(digest, action_bytes, command_bytes)
    return spec
