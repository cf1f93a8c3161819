"""ActionCache service: GetActionResult (with inlining hints) and UpdateActionResult."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.cas.completeness import missing_references
from reexec.cas.digest import DigestFunction, make_digest
from reexec.cas.store import BlobNotFound, Store
from reexec.errors import InvalidArgument, NotFound, PermissionDenied, missing_blobs_error
from reexec.rpc import Service, Stream, check_instance, unary

log = logging.getLogger(__name__)


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
    ) -> None:
        self.ac = ac
        self.cas = cas
        self.instances = tuple(instances)
        self.max_inline_bytes = max_inline_bytes
        self.allow_updates = allow_updates
        self.hits = 0
        self.misses = 0

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "GetActionResult": unary(
                self.get_action_result, fastpb.GetActionResultRequest, fastpb.ActionResult
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

    async def _inline(
        self, result: fastpb.Message, request: fastpb.Message, function: DigestFunction
    ) -> None:
        """Fill *_raw / contents the client asked for, within `max_inline_bytes` in total."""
        budget = self.max_inline_bytes
        wanted: list[tuple[fastpb.Message, str, fastpb.Message]] = []
        if request.inline_stdout and result.HasField("stdout_digest") and not result.stdout_raw:
            wanted.append((result, "stdout_raw", result.stdout_digest))
        if request.inline_stderr and result.HasField("stderr_digest") and not result.stderr_raw:
            wanted.append((result, "stderr_raw", result.stderr_digest))
        paths = set(request.inline_output_files)
        for f in result.output_files:
            if f.path in paths and not f.contents:
                wanted.append((f, "contents", f.digest))
        for target, field, wire in wanted:
            if wire.size_bytes > budget or not wire.hash:
                continue
            try:
                data = await self.cas.get_bytes(
                    make_digest(wire.hash, wire.size_bytes, int(function))
                )
            except (BlobNotFound, InvalidArgument):
                continue
            setattr(target, field, data)
            budget -= len(data)

    async def update_action_result(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        check_instance(self.instances, request.instance_name)
        if not self.allow_updates:
            raise PermissionDenied("this server does not accept action cache updates from clients")
        d = request.action_digest
        digest = make_digest(d.hash, d.size_bytes, request.digest_function)
        result = request.action_result
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
        await self.ac.put(ActionKey(request.instance_name, digest), result.SerializeToString())
        return result
