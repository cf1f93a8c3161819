"""ActionCache service: GetActionResult (with inlining hints) and UpdateActionResult."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.action_cache import WOULD_BLOCK, ActionCache, ActionKey
from reexec.cas.completeness import missing_references
from reexec.cas.digest import DigestFunction, make_digest
from reexec.cas.result_paths import check_action_result, check_tree
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import InvalidArgument, NotFound, PermissionDenied, missing_blobs_error
from reexec.rpc import SLOW, Service, Stream, check_instance, unary

log = logging.getLogger(__name__)

# Tree blobs larger than this, and results with more outputs than this, are checked in a
# worker thread (a result of ~100,000 outputs fits in one message).
_THREAD_TREE_BYTES = 256 * 1024
_THREAD_RESULT_ENTRIES = 2000


def _inline_wanted(
    result: fastpb.Message, request: fastpb.Message
) -> list[tuple[fastpb.Message, str, fastpb.Message]]:
    """(message, field, wire digest) of each blob the request asks to inline into `result`."""
    wanted: list[tuple[fastpb.Message, str, fastpb.Message]] = []
    if request.inline_stdout and result.HasField("stdout_digest") and not result.stdout_raw:
        wanted.append((result, "stdout_raw", result.stdout_digest))
    if request.inline_stderr and result.HasField("stderr_digest") and not result.stderr_raw:
        wanted.append((result, "stderr_raw", result.stderr_digest))
    paths = set(request.inline_output_files)
    for f in result.output_files:
        if f.path in paths and not f.contents:
            wanted.append((f, "contents", f.digest))
    return wanted


def _inline_steps(  # type: ignore[no-untyped-def]
    result: fastpb.Message, request: fastpb.Message, function: DigestFunction, budget: int
):
    """Inlining as a generator, so one body serves the async and the nowait GetActionResult:
    yields the Digest of each blob to inline (within `budget` bytes in total) and is sent its
    bytes, or None when the CAS does not have it."""
    for target, field, wire in _inline_wanted(result, request):
        if wire.size_bytes > budget or not wire.hash:
            continue
        try:
            digest = make_digest(wire.hash, wire.size_bytes, int(function))
        except InvalidArgument:
            continue
        data = yield digest
        if data is not None:
            setattr(target, field, data)
            budget -= len(data)


class ActionCacheService(Service):
    SERVICE = "build.bazel.remote.execution.v2.ActionCache"

    def __init__(
        self,
        ac: ActionCache,
        cas: Store,
        *,
        instances: Sequence[str] = (),
        max_inline_bytes: int = 1 << 20,
        allow_updates: bool = True,
        allow_absolute_symlinks: bool = False,
    ) -> None:
        """`allow_absolute_symlinks` must match what Capabilities advertises
        (symlink_absolute_path_strategy)."""
        self.ac = ac
        self.cas = cas
        self.instances = tuple(instances)
        self.max_inline_bytes = max_inline_bytes
        self.allow_updates = allow_updates
        self.allow_absolute_symlinks = allow_absolute_symlinks
        self.hits = 0
        self.misses = 0

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "GetActionResult": unary(
                self.get_action_result,
                fastpb.GetActionResultRequest,
                fastpb.ActionResult,
                nowait=self.get_action_result_nowait,
            ),
            "UpdateActionResult": unary(
                self.update_action_result, fastpb.UpdateActionResultRequest, fastpb.ActionResult
            ),
        }

    async def get_action_result(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        check_instance(self.instances, request.instance_name)
        d = request.action_digest
        digest = make_digest(d.hash, d.size_bytes, request.digest_function)
        data = await self.ac.get(ActionKey(request.instance_name, digest))
        if data is None:
            self.misses += 1
            raise NotFound(f"no action cache entry for {digest.blob_path}")
        self.hits += 1
        result = fastpb.ActionResult.FromString(data)
        if request.inline_stdout or request.inline_stderr or request.inline_output_files:
            await self._inline(result, request, digest.function)
        return result

    def get_action_result_nowait(self, request: fastpb.Message):  # type: ignore[no-untyped-def]
        """`get_action_result` when the action cache (and, for inlining, the CAS) answers
        without waiting; else SLOW."""
        check_instance(self.instances, request.instance_name)
        d = request.action_digest
        digest = make_digest(d.hash, d.size_bytes, request.digest_function)
        data = self.ac.get_nowait(ActionKey(request.instance_name, digest))
        if data is WOULD_BLOCK:
            return SLOW
        if data is None:
            self.misses += 1
            raise NotFound(f"no action cache entry for {digest.blob_path}")
        result = fastpb.ActionResult.FromString(data)
        if request.inline_stdout or request.inline_stderr or request.inline_output_files:
            steps = _inline_steps(result, request, digest.function, self.max_inline_bytes)
            blob: bytes | None = None
            try:
                while True:
                    wanted = steps.send(blob)
                    try:
                        blob = self.cas.get_bytes_nowait(wanted)
                    except BlobNotFound:
                        blob = None
                    else:
                        if blob is None:
                            return SLOW
            except StopIteration:
                pass
        self.hits += 1
        return result

    async def _inline(
        self, result: fastpb.Message, request: fastpb.Message, function: DigestFunction
    ) -> None:
        """Fill *_raw / contents the client asked for, within `max_inline_bytes` in total."""
        steps = _inline_steps(result, request, function, self.max_inline_bytes)
        blob: bytes | None = None
        try:
            while True:
                wanted = steps.send(blob)
                try:
                    blob = await self.cas.get_bytes(wanted)
                except BlobNotFound:
                    blob = None
        except StopIteration:
            pass

    async def update_action_result(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        check_instance(self.instances, request.instance_name)
        if not self.allow_updates:
            raise PermissionDenied("this server does not accept action cache updates from clients")
        d = request.action_digest
        digest = make_digest(d.hash, d.size_bytes, request.digest_function)
        result = request.action_result
        # Clients that hit this entry create its outputs: paths must be as safe as our worker's.
        entries = (
            len(result.output_files)
            + len(result.output_directories)
            + len(result.output_symlinks)
            + len(result.output_file_symlinks)
            + len(result.output_directory_symlinks)
        )
        if entries > _THREAD_RESULT_ENTRIES:
            await trio.to_thread.run_sync(
                lambda: check_action_result(
                    result, allow_absolute_symlinks=self.allow_absolute_symlinks
                )
            )
        else:
            check_action_result(result, allow_absolute_symlinks=self.allow_absolute_symlinks)
        try:
            missing = await missing_references(result, digest.function, self.cas)
        except DecodeError:
            raise InvalidArgument(
                "action_result names a Tree blob that is not a valid Tree"
            ) from None
        if missing:
            raise missing_blobs_error(
                f"UpdateActionResult for {digest.blob_path}", [m.blob_path for m in missing]
            )
        await self._check_trees(result, digest.function)
        await self.ac.put(ActionKey(request.instance_name, digest), result.SerializeToString())
        return result

    async def _check_trees(self, result: fastpb.Message, function: DigestFunction) -> None:
        """Names and symlink targets inside each output directory's Tree (present: checked by
        `missing_references` just before)."""
        for i, d in enumerate(result.output_directories):
            if not d.HasField("tree_digest") or not d.tree_digest.hash:
                continue
            tree_digest = make_digest(d.tree_digest.hash, d.tree_digest.size_bytes, int(function))
            try:
                raw = await self.cas.get_bytes(tree_digest)
            except BlobNotFound:
                raise missing_blobs_error("UpdateActionResult", [tree_digest.blob_path]) from None
            field = f"action_result.output_directories[{i}].tree_digest"

            def check(raw: bytes = raw, path: str = d.path, field: str = field) -> None:
                try:
                    tree = fastpb.Tree.FromString(raw)
                except DecodeError:
                    raise InvalidArgument(f"{field} is not a valid Tree") from None
                check_tree(tree, path, field, allow_absolute_symlinks=self.allow_absolute_symlinks)

            if len(raw) > _THREAD_TREE_BYTES:
                await trio.to_thread.run_sync(check)
            else:
                check()
