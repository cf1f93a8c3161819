"""GrpcActionCache: the action cache of another REAPI endpoint (a storage node), so several
schedulers or frontends share one. Instance names pass through; a miss is NOT_FOUND there and
None here; an endpoint that cannot be reached is a miss on reads (the action runs instead, as
with any cache) and `Unavailable` on writes."""

from __future__ import annotations

import logging

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from reexec import fastpb
from reexec.cas.action_cache import ActionCache, ActionKey
from reexec.cas.grpc_store import ChannelFactory
from reexec.cas.remote_errors import UNREACHABLE, remote_errors
from reexec.errors import Unavailable
from reexec.grpc_client import unary

log = logging.getLogger(__name__)

_AC = "/build.bazel.remote.execution.v2.ActionCache/"


class GrpcActionCache(ActionCache):
    def __init__(
        self, channel_factory: ChannelFactory, *, timeout_s: float = 60.0, endpoint: str = ""
    ) -> None:
        self._factory = channel_factory
        self._channel = None
        self.timeout_s = timeout_s
        self.endpoint = endpoint
        self.unreachable = 0

    async def _ch(self):  # type: ignore[no-untyped-def]
        if self._channel is None:
            self._channel = await self._factory()
        return self._channel

    async def get(self, key: ActionKey) -> bytes | None:
        req = fastpb.GetActionResultRequest(instance_name=key.instance)
        req.action_digest.hash, req.action_digest.size_bytes = key.digest.hash, key.digest.size
        req.digest_function = int(key.digest.function)
        try:
            result = await unary(
                await self._ch(),
                _AC + "GetActionResult",
                req,
                fastpb.ActionResult,
                deadline_s=self.timeout_s,
            )
        except GRPCError as e:
            if e.status is Status.NOT_FOUND:
                return None
            if e.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED):
                return self._miss(e)
            raise Unavailable(f"{self.endpoint} GetActionResult: {e.message}") from None
        except UNREACHABLE as e:
            return self._miss(e)
        return result.SerializeToString()

    def _miss(self, e: BaseException) -> None:
        self.unreachable += 1
        log.warning("action cache %s unreachable (%s): treating as a miss", self.endpoint, e)
        return None

    async def put(self, key: ActionKey, result: bytes) -> None:
        req = fastpb.UpdateActionResultRequest(instance_name=key.instance)
        req.action_digest.hash, req.action_digest.size_bytes = key.digest.hash, key.digest.size
        req.digest_function = int(key.digest.function)
        req.action_result.MergeFromString(result)
        with remote_errors(f"{self.endpoint} UpdateActionResult"):
            await unary(
                await self._ch(),
                _AC + "UpdateActionResult",
                req,
                fastpb.ActionResult,
                deadline_s=self.timeout_s,
            )

    async def aclose(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stats(self) -> dict[str, int]:
        return {"unreachable": self.unreachable}
