"""Remote Asset API v1 (`build.bazel.remote.asset.v1`): Fetch and Push over our CAS.

Only pushed content is served: we never fetch from origin, so a URI nobody pushed is NOT_FOUND
(the minimal compliant Fetch the spec describes). BuildStream's artifact and source caches need
exactly this: they push an artifact or source proto's digest under a URN and fetch it back.

Guarantees:
  * A push is refused (FAILED_PRECONDITION with MISSING violations) unless its blob or tree
    and every reference are in the CAS: an asset is never born incomplete.
  * A fetch answers only with an asset whose blob or tree and every reference are in the CAS
    (checking also refreshes them in LRU stores); an incomplete one is dropped and reads as
    NOT_FOUND, as does an expired one or one pushed before `oldest_content_accepted`. With a
    store that counts every removal (`completeness.removal_generation`), content found
    complete is not walked again until some blob leaves the CAS.
  * A request without URIs, with an empty URI or with a repeated qualifier name is
    INVALID_ARGUMENT (BuildStream probes for the service with a URI-less FetchBlob and
    PushBlob and expects exactly that).

Fetch misses go back in the response's `status` (NOT_FOUND), as the spec asks for failures
"outside the server's control"; malformed requests are gRPC errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from reexec import fastpb
from reexec.cas.asset_store import Asset, AssetIndex, AssetKey, AssetKind, Qualifiers
from reexec.cas.completeness import removal_generation
from reexec.cas.digest import Digest, DigestFunction, make_digest
from reexec.cas.store import Store
from reexec.cas.tree_completeness import missing_tree_blobs
from reexec.errors import InvalidArgument, missing_blobs_error
from reexec.rpc import Service, Stream, check_instance, unary

log = logging.getLogger(__name__)

_PKG = "build.bazel.remote.asset.v1."
FetchBlobRequest = fastpb.message_class(_PKG + "FetchBlobRequest")
FetchBlobResponse = fastpb.message_class(_PKG + "FetchBlobResponse")
FetchDirectoryRequest = fastpb.message_class(_PKG + "FetchDirectoryRequest")
FetchDirectoryResponse = fastpb.message_class(_PKG + "FetchDirectoryResponse")
PushBlobRequest = fastpb.message_class(_PKG + "PushBlobRequest")
PushBlobResponse = fastpb.message_class(_PKG + "PushBlobResponse")
PushDirectoryRequest = fastpb.message_class(_PKG + "PushDirectoryRequest")
PushDirectoryResponse = fastpb.message_class(_PKG + "PushDirectoryResponse")

# google.rpc.Code values carried in a fetch response's status.
_NOT_FOUND = 5
# A URI longer than this is refused: it is a key held in memory, not content.
MAX_URI_BYTES = 64 * 1024
# Complete-content memos kept before they are all dropped (re-checked on next fetch).
MAX_REMEMBERED_COMPLETE = 100_000


class _Fetch(Service):
    SERVICE = "build.bazel.remote.asset.v1.Fetch"

    def __init__(self, assets: AssetService) -> None:
        self.assets = assets

    def rpcs(self):  # type: ignore[no-untyped-def]
        a = self.assets
        return {
            "FetchBlob": unary(a.fetch_blob, FetchBlobRequest, FetchBlobResponse),
            "FetchDirectory": unary(
                a.fetch_directory, FetchDirectoryRequest, FetchDirectoryResponse
            ),
        }


class _Push(Service):
    SERVICE = "build.bazel.remote.asset.v1.Push"

    def __init__(self, assets: AssetService) -> None:
        self.assets = assets

    def rpcs(self):  # type: ignore[no-untyped-def]
        a = self.assets
        return {
            "PushBlob": unary(a.push_blob, PushBlobRequest, PushBlobResponse),
            "PushDirectory": unary(a.push_directory, PushDirectoryRequest, PushDirectoryResponse),
        }


class AssetService:
    """Both Remote Asset services over one index; `services()` gives the two servables."""

    def __init__(
        self,
        cas: Store,
        index: AssetIndex | None = None,
        *,
        instances: Sequence[str] = (),
        allow_push: bool = True,
        clock: object = time.time,
    ) -> None:
        self.cas = cas
        self.index = index if index is not None else AssetIndex()
        self.instances = tuple(instances)
        self.allow_push = allow_push
        self._clock = clock
        self.hits = 0
        self.misses = 0
        self.completeness_checks = 0
        # Content found complete, with the CAS's removal generation at the time.
        self._complete: dict[tuple[object, ...], tuple[int, int]] = {}

    def services(self) -> list[Service]:
        out: list[Service] = [_Fetch(self)]
        if self.allow_push:
            out.append(_Push(self))
        return out

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator,no-any-return]

    # Fetch

    async def fetch_blob(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        return await self._fetch(request, AssetKind.BLOB, FetchBlobResponse(), "blob_digest")

    async def fetch_directory(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        return await self._fetch(
            request, AssetKind.DIRECTORY, FetchDirectoryResponse(), "root_directory_digest"
        )

    async def _fetch(
        self, request: fastpb.Message, kind: AssetKind, response: fastpb.Message, field: str
    ) -> fastpb.Message:
        check_instance(self.instances, request.instance_name)
        uris = _check_uris(request.uris)
        qualifiers = _qualifiers(request.qualifiers)
        function = _requested_function(request.digest_function)
        oldest = None
        if request.HasField("oldest_content_accepted"):
            oldest = request.oldest_content_accepted.ToNanoseconds() / 1e9
        for uri in uris:
            key = AssetKey(request.instance_name, kind, uri, qualifiers)
            asset = self.index.get(key, self._now(), oldest)
            if asset is None or (function and asset.digest.function != function):
                continue
            missing = await self._missing_cached(asset, kind)
            if missing:
                log.info(
                    "asset %s %r dropped: %d referenced blob(s) left the CAS, e.g. %s",
                    kind.value,
                    uri,
                    len(missing),
                    missing[0].blob_path,
                )
                self.index.drop_incomplete(key, asset)
                continue
            self.hits += 1
            response.uri = uri
            for name, value in sorted(qualifiers):
                response.qualifiers.add(name=name, value=value)
            if asset.expire_at is not None:
                response.expires_at.FromNanoseconds(int(asset.expire_at * 1e9))
            wire = getattr(response, field)
            wire.hash = asset.digest.hash
            wire.size_bytes = asset.digest.size
            response.digest_function = int(asset.digest.function)
            return response
        self.misses += 1
        response.status.code = _NOT_FOUND
        response.status.message = f"no complete {kind.value} asset pushed for " + ", ".join(
            repr(u) for u in uris[:5]
        )
        response.uri = uris[0]
        return response

    async def _missing_cached(self, asset: Asset, kind: AssetKind) -> list[Digest]:
        """`_missing`, skipped for content found complete while no blob has left the CAS since
        (stores that count removals only): a fetch of a large pushed tree then costs no walk."""
        generation = removal_generation(self.cas)
        key = (kind, asset.digest, asset.references_blobs, asset.references_directories)
        if generation is not None and self._complete.get(key) == generation:
            return []
        missing = await self._missing(asset, kind)
        if not missing and generation is not None and generation == removal_generation(self.cas):
            if len(self._complete) >= MAX_REMEMBERED_COMPLETE:
                self._complete.clear()
            self._complete[key] = generation
        return missing

    async def _missing(self, asset: Asset, kind: AssetKind) -> list[Digest]:
        self.completeness_checks += 1
        blobs = list(asset.references_blobs)
        trees = list(asset.references_directories)
        (trees if kind is AssetKind.DIRECTORY else blobs).insert(0, asset.digest)
        missing = await self.cas.find_missing(blobs) if blobs else []
        if trees:
            try:
                missing += await missing_tree_blobs(self.cas, trees)
            except DecodeError:
                raise InvalidArgument("a pushed directory is not a valid Directory") from None
        return missing

    # Push

    async def push_blob(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        await self._push(request, AssetKind.BLOB, request.blob_digest, "blob_digest")
        return PushBlobResponse()

    async def push_directory(self, request: fastpb.Message, stream: Stream | None = None):  # type: ignore[no-untyped-def]
        await self._push(
            request, AssetKind.DIRECTORY, request.root_directory_digest, "root_directory_digest"
        )
        return PushDirectoryResponse()

    async def _push(
        self, request: fastpb.Message, kind: AssetKind, wire: fastpb.Message, field: str
    ) -> None:
        check_instance(self.instances, request.instance_name)
        uris = _check_uris(request.uris)
        qualifiers = _qualifiers(request.qualifiers)
        if not request.HasField(field):
            raise InvalidArgument(f"{field} is required")
        function = request.digest_function
        digest = make_digest(wire.hash, wire.size_bytes, function)
        asset = Asset(
            digest=digest,
            references_blobs=tuple(
                make_digest(d.hash, d.size_bytes, function or int(digest.function))
                for d in request.references_blobs
            ),
            references_directories=tuple(
                make_digest(d.hash, d.size_bytes, function or int(digest.function))
                for d in request.references_directories
            ),
            pushed_at=self._now(),
            expire_at=(
                request.expire_at.ToNanoseconds() / 1e9 if request.HasField("expire_at") else None
            ),
        )
        missing = await self._missing(asset, kind)
        if missing:
            raise missing_blobs_error(
                f"Push{kind.value.capitalize()} for {uris[0]!r}",
                list(dict.fromkeys(m.blob_path for m in missing)),
            )
        self.index.put(
            (AssetKey(request.instance_name, kind, uri, qualifiers) for uri in uris), asset
        )


def _check_uris(uris: Sequence[str]) -> list[str]:
    if not uris:
        raise InvalidArgument("at least one URI is required")
    out = list(uris)
    for i, uri in enumerate(out):
        if not uri:
            raise InvalidArgument(f"uris[{i}] is empty")
        if len(uri.encode()) > MAX_URI_BYTES:
            raise InvalidArgument(f"uris[{i}] is longer than {MAX_URI_BYTES} bytes")
    return out


def _qualifiers(wire: Sequence[fastpb.Message]) -> Qualifiers:
    names: set[str] = set()
    for q in wire:
        if q.name in names:
            raise InvalidArgument(f"qualifier {q.name!r} is given more than once")
        names.add(q.name)
    return frozenset((q.name, q.value) for q in wire)


def _requested_function(value: int) -> DigestFunction | None:
    """The digest function a fetch insists on, or None when unset (any, SHA256 by default)."""
    if not value:
        return None
    try:
        return DigestFunction(value)
    except ValueError:
        raise InvalidArgument(f"unknown digest function value {value}") from None
