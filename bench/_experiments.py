"""Run `reexecd` with experimental monkeypatches, to measure proposed changes to reexec/.

NOT production code: each patch is a prototype of a change proposed in bench/RESULTS.md, applied
at run time so the benchmarks can measure it without touching reexec/. Select with
BENCH_PATCHES (comma-separated), e.g.

    BENCH_PATCHES=malloc,repr,frame .venv/bin/python bench/bytestream.py

Patches:
  malloc     mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=256 MiB) at start-up: 1 MiB
             buffers are reused from the heap instead of mmap/munmap + page faults each time.
  repr       hyperframe DataFrame repr without hexlifying the whole body: h2 4.x builds
             repr(frame) for every received frame (`logger.trace("Received frame: %s",
             repr(frame))`) even with its no-op logger; for DATA frames that copies and hexlifies
             the whole payload.
  frame      server advertises SETTINGS_MAX_FRAME_SIZE 1 MiB in its *initial* SETTINGS (so it is in
             force before the client can use it; updating it later races with h2's per-read frame
             size check): 64x fewer DATA frames per MiB from clients that honour it (grpcio does).
  window     grpclib connection and stream windows 16 MiB (default 4 MiB).
  batch      ByteStream.Write receives messages on the asyncio side in batches of >= 1 MiB and
             crosses into Trio once per batch instead of once per message.
  smallwrite (needs batch) a one-message Write of a whole identity-compressed blob goes through
             cas.put_bytes (no UploadTable entry, no temp-file writer and its thread hops).
  smallread  Read receives its request on the asyncio side, crosses once, and for a blob of at
             most one chunk reads it whole (cas.get_bytes) and sends it from the asyncio side.
  inlineio   FilesystemStore get_bytes/put_bytes of blobs <= 64 KiB run inline on the event loop
             instead of trio.to_thread (a thread hop costs ~100 us of CPU here).
  caps       GetCapabilities answers a ServerCapabilities encoded once (upb) from the asyncio side
             (betterproto2 re-encodes the nested message on every call).
  fmbeager   FindMissingBlobs runs the store lookup on the asyncio side when the store answers
             without suspending (no Trio crossing), falling back to a crossing otherwise.
  digestnew  make_digests builds Digest tuples with tuple.__new__ in C (not Digest._make).
  gar        GetActionResult: (a) the filesystem AC reads its (small) entry files inline instead of
             through trio.to_thread; (b) the completeness check is skipped for an entry already
             verified while the CAS has evicted nothing since (FilesystemStore's eviction count);
             (c) without inlining hints the stored bytes are sent as they are (a codec that passes
             bytes through) instead of being parsed into an ActionResult and encoded again.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio_asyncio  # noqa: F401  (before grpclib)

PATCHES = set(filter(None, os.environ.get("BENCH_PATCHES", "").split(",")))
KNOWN = {
    "malloc",
    "repr",
    "frame",
    "window",
    "batch",
    "smallwrite",
    "smallread",
    "inlineio",
    "caps",
    "fmbeager",
    "digestnew",
    "gar",
    "gcfreeze",
    "nogc",
    "gc50k",
    "gc10k",
}


def patch_gcfreeze() -> None:
    import gc

    gc.freeze()  # what was allocated at start-up is never scanned again
    gc.set_threshold(50_000, 50, 1000)


def patch_gc50k() -> None:
    import gc

    gc.set_threshold(50_000, 10, 10)


def patch_gc10k() -> None:
    import gc

    gc.set_threshold(10_000, 10, 10)


def patch_nogc() -> None:
    import gc

    gc.disable()


def patch_malloc() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    assert libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    assert libc.mallopt(m_trim_threshold, 256 << 20) == 1


def patch_repr() -> None:
    import hyperframe.frame as hf

    hf.DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"  # type: ignore[method-assign]


def patch_frame() -> None:
    import grpclib.protocol as gp
    from h2.connection import H2Connection
    from h2.settings import SettingCodes

    max_frame = 1 << 20

    class BigFrameH2Connection(H2Connection):
        def __init__(self, config=None):  # type: ignore[no-untyped-def]
            super().__init__(config=config)
            if not self.config.client_side:
                values = self.local_settings._settings[SettingCodes.MAX_FRAME_SIZE]
                values.clear()
                values.append(max_frame)
                self.max_inbound_frame_size = max_frame

    gp.H2Connection = BigFrameH2Connection  # type: ignore[misc]


def patch_window() -> None:
    import grpclib.server as gs
    from grpclib.config import Configuration

    win = 16 << 20
    orig_init = gs.Server.__init__

    def init(self, handlers, **kw):  # type: ignore[no-untyped-def]
        kw.setdefault(
            "config",
            Configuration(http2_connection_window_size=win, http2_stream_window_size=win),
        )
        orig_init(self, handlers, **kw)

    gs.Server.__init__ = init  # type: ignore[method-assign]


BATCH_BYTES = 1 << 20


async def recv_batch(stream):  # type: ignore[no-untyped-def]
    """asyncio side: messages until >= 1 MiB of data, finish_write, or the end of the stream."""
    out = []
    n = 0
    while True:
        m = await stream.recv_message()
        out.append(m)
        if m is None or m.finish_write:
            return out
        n += len(m.data)
        if n >= BATCH_BYTES:
            return out


class Replay:
    """A stream whose first messages were already received."""

    def __init__(self, inner, pending) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.pending = inner, list(pending)

    async def recv_message(self):  # type: ignore[no-untyped-def]
        if self.pending:
            return self.pending.pop(0)
        return await self.inner.recv_message()

    async def send_message(self, m) -> None:  # type: ignore[no-untyped-def]
        await self.inner.send_message(m)


def patch_batch() -> None:
    from reexec import fastpb
    from reexec.cas import bytestream_service as bss
    from reexec.cas.resource import Compressor, parse_write_name
    from reexec.errors import InvalidArgument
    from reexec.rpc import aio, check_instance

    async def write(self, stream):  # type: ignore[no-untyped-def]
        batch = await aio(recv_batch, stream)
        first = batch[0]
        if first is None:
            raise InvalidArgument("Write stream closed before its first message")
        key = first.resource_name
        name = parse_write_name(key)
        check_instance(self.instances, name.instance)
        digest = name.digest
        compressed = name.compressor is Compressor.ZSTD
        size = -1 if compressed else digest.size
        if await self.cas.has(digest):
            await self._abandon(key)
            await aio(stream.send_message, fastpb.WriteResponse(committed_size=size))
            return
        upload = await self._resume_or_start(key, name, first.write_offset)
        upload.busy = True
        try:
            while True:
                pending = []
                offset = upload.committed_size
                request = None
                for request in batch:
                    if request is None:
                        raise InvalidArgument(f"Write stream for {key} ended without finish_write")
                    if request.resource_name and request.resource_name != key:
                        raise InvalidArgument("resource_name changed within one Write stream")
                    if request.write_offset != offset:
                        raise InvalidArgument(f"write_offset {request.write_offset} != {offset}")
                    pending.append(request.data)
                    offset += len(request.data)
                    if request.finish_write:
                        break
                try:
                    await self._feed(upload, b"".join(pending))
                    if request.finish_write:
                        await upload.writer.commit()
                except InvalidArgument:
                    await self._abandon(key)
                    raise
                upload.last_active = time.monotonic()
                if request.finish_write:
                    self.uploads.uploads.pop(key, None)
                    await aio(stream.send_message, fastpb.WriteResponse(committed_size=size))
                    return
                batch = await aio(recv_batch, stream)
        finally:
            upload.busy = False

    bss.ByteStreamService.write = write  # type: ignore[method-assign]


def patch_smallwrite() -> None:
    from reexec import fastpb
    from reexec.cas import bytestream_service as bss
    from reexec.cas.resource import Compressor, parse_write_name
    from reexec.rpc import aio, check_instance

    batched_write = bss.ByteStreamService.write

    async def write(self, stream):  # type: ignore[no-untyped-def]
        batch = await aio(recv_batch, stream)
        first = batch[0]
        if first is not None and len(batch) == 1 and first.finish_write and not first.write_offset:
            name = parse_write_name(first.resource_name)
            check_instance(self.instances, name.instance)
            if name.compressor is Compressor.IDENTITY and len(first.data) == name.digest.size:
                await self._abandon(first.resource_name)
                await self.cas.put_bytes(name.digest, first.data)
                await aio(
                    stream.send_message, fastpb.WriteResponse(committed_size=name.digest.size)
                )
                return
        await batched_write(self, Replay(stream, batch))

    bss.ByteStreamService.write = write  # type: ignore[method-assign]


def patch_smallread() -> None:
    from reexec import fastpb
    from reexec.cas import bytestream_service as bss
    from reexec.cas.resource import Compressor, parse_read_name
    from reexec.rpc import check_instance, in_trio

    async def small_read(self, request):  # type: ignore[no-untyped-def]
        name = parse_read_name(request.resource_name)
        check_instance(self.instances, name.instance)
        if name.compressor is not Compressor.IDENTITY or request.read_offset or request.read_limit:
            return None
        if name.digest.size > self.read_chunk:
            return None
        return await self.cas.get_bytes(name.digest)

    orig_read = bss.ByteStreamService.read
    orig_rpcs = bss.ByteStreamService.rpcs

    def rpcs(self):  # type: ignore[no-untyped-def]
        table = orig_rpcs(self)
        _, card, req, resp = table["Read"]

        async def handle(stream):  # type: ignore[no-untyped-def]
            request = await stream.recv_message()
            data = await in_trio(small_read, self, request)
            if data is not None:
                await stream.send_message(fastpb.ReadResponse(data=data))
                return
            await in_trio(orig_read, self, Replay(stream, [request]))

        table["Read"] = (handle, card, req, resp)
        return table

    bss.ByteStreamService.rpcs = rpcs  # type: ignore[method-assign]


def patch_inlineio() -> None:
    from reexec.cas import filesystem as fsm
    from reexec.cas.digest import is_empty
    from reexec.cas.store import BlobNotFound

    small = 64 * 1024
    orig_get = fsm.FilesystemStore.get_bytes
    orig_put = fsm.FilesystemStore.put_bytes

    async def get_bytes(self, digest):  # type: ignore[no-untyped-def]
        if digest.size > small:
            return await orig_get(self, digest)
        if is_empty(digest):
            return b""
        if not self._lru.touch(digest):
            raise BlobNotFound(digest)
        return self._read_whole(digest)

    async def put_bytes(self, digest, data):  # type: ignore[no-untyped-def]
        if digest.size > small or len(data) != digest.size:
            return await orig_put(self, digest, data)
        if is_empty(digest) or self._lru.touch(digest):
            return None
        async with self._mutate:
            self._write_whole(digest, data)
            await self._add(digest)
        return None

    fsm.FilesystemStore.get_bytes = get_bytes  # type: ignore[method-assign]
    fsm.FilesystemStore.put_bytes = put_bytes  # type: ignore[method-assign]


def patch_caps() -> None:
    from reexec import fastpb
    from reexec.cas import capabilities_service as cs
    from reexec.rpc import Cardinality, check_instance

    req_t = fastpb.message_class("build.bazel.remote.execution.v2.GetCapabilitiesRequest")
    caps_t = fastpb.message_class("build.bazel.remote.execution.v2.ServerCapabilities")

    def rpcs(self):  # type: ignore[no-untyped-def]
        cached = caps_t.FromString(bytes(self.capabilities))

        async def handle(stream):  # type: ignore[no-untyped-def]
            request = await stream.recv_message()
            check_instance(self.instances, request.instance_name)
            await stream.send_message(cached)

        return {"GetCapabilities": (handle, Cardinality.UNARY_UNARY, req_t, caps_t)}

    cs.CapabilitiesService.rpcs = rpcs  # type: ignore[method-assign]


def patch_fmbeager() -> None:
    from reexec import fastpb
    from reexec.cas import cas_service as css
    from reexec.cas import digest as dg
    from reexec.rpc import check_instance, in_trio

    orig_rpcs = css.CasService.rpcs

    def rpcs(self):  # type: ignore[no-untyped-def]
        table = orig_rpcs(self)
        _, card, req, resp = table["FindMissingBlobs"]

        async def handle(stream):  # type: ignore[no-untyped-def]
            request = await stream.recv_message()
            check_instance(self.instances, request.instance_name)
            wire = request.blob_digests
            digests = dg.make_digests(
                [d.hash for d in wire], [d.size_bytes for d in wire], request.digest_function
            )
            coro = self.cas.find_missing(digests)
            try:
                coro.send(None)
            except StopIteration as e:
                missing = e.value
            else:
                coro.close()
                missing = await in_trio(self.cas.find_missing, digests)
            response = fastpb.FindMissingBlobsResponse()
            add = response.missing_blob_digests.add
            for d in missing:
                add(hash=d.hash, size_bytes=d.size)
            await stream.send_message(response)

        table["FindMissingBlobs"] = (handle, card, req, resp)
        return table

    css.CasService.rpcs = rpcs  # type: ignore[method-assign]


def patch_digestnew() -> None:
    from itertools import repeat

    from reexec.cas import cas_service as css
    from reexec.cas import digest as dg

    orig = dg.make_digests

    def make_digests(hashes, sizes, requested_function=0):  # type: ignore[no-untyped-def]
        if not hashes:
            return []
        lengths = set(map(len, hashes))
        function = None
        if len(lengths) == 1:
            (length,) = lengths
            function = dg.resolve_function(requested_function, hashes[0])
            if dg._HEX_LENGTH[function] != length:
                function = None
        if function is not None and min(sizes) >= 0 and dg._all_lower_hex("".join(hashes)):
            return list(map(tuple.__new__, repeat(dg.Digest), zip(hashes, sizes, repeat(function))))
        return orig(hashes, sizes, requested_function)

    dg.make_digests = make_digests
    css.make_digests = make_digests  # type: ignore[attr-defined]


def patch_gar() -> None:
    import grpclib.encoding.proto as gproto

    from reexec import fastpb
    from reexec.cas import ac_service, action_cache, completeness
    from reexec.cas.action_cache import ActionKey
    from reexec.cas.digest import make_digest
    from reexec.errors import NotFound
    from reexec.rpc import check_instance

    orig_encode = gproto.ProtoCodec.encode

    def encode(self, message, message_type):  # type: ignore[no-untyped-def]
        if type(message) is bytes:
            return message
        return orig_encode(self, message, message_type)

    gproto.ProtoCodec.encode = encode  # type: ignore[method-assign]

    async def fs_get(self, key):  # type: ignore[no-untyped-def]
        rel = self._rel_path(key)
        if not self._lru.touch(rel):
            return None
        data = self._read(rel)  # entries are small: a thread hop costs more than the read
        if data is None:
            self._lru.remove(rel)
        return data

    action_cache.FilesystemActionCache.get = fs_get  # type: ignore[method-assign]

    orig_cc_get = completeness.CompletenessCheckingActionCache.get
    orig_cc_put = completeness.CompletenessCheckingActionCache.put

    def evictions(cas) -> int | None:  # type: ignore[no-untyped-def]
        return cas.stats().get("evictions")

    async def cc_get(self, key):  # type: ignore[no-untyped-def]
        verified = self.__dict__.setdefault("_verified", {})
        ev = evictions(self.cas)
        if ev is not None and verified.get(key) == ev:
            return await self.inner.get(key)
        data = await orig_cc_get(self, key)
        if data is not None and ev is not None:
            verified[key] = ev
        return data

    async def cc_put(self, key, result):  # type: ignore[no-untyped-def]
        self.__dict__.setdefault("_verified", {}).pop(key, None)
        await orig_cc_put(self, key, result)

    completeness.CompletenessCheckingActionCache.get = cc_get  # type: ignore[method-assign]
    completeness.CompletenessCheckingActionCache.put = cc_put  # type: ignore[method-assign]

    async def get_action_result(self, request, stream=None):  # type: ignore[no-untyped-def]
        check_instance(self.instances, request.instance_name)
        d = request.action_digest
        digest = make_digest(d.hash, d.size_bytes, request.digest_function)
        data = await self.ac.get(ActionKey(request.instance_name, digest))
        if data is None:
            self.misses += 1
            raise NotFound(f"no action cache entry for {digest.blob_path}")
        self.hits += 1
        if not (request.inline_stdout or request.inline_stderr or request.inline_output_files):
            return data
        result = fastpb.ActionResult.FromString(data)
        await self._inline(result, request, digest.function)
        return result

    ac_service.ActionCacheService.get_action_result = get_action_result  # type: ignore[method-assign]


def apply(patches: set[str]) -> None:
    unknown = patches - KNOWN
    if unknown:
        raise SystemExit(f"unknown BENCH_PATCHES: {', '.join(sorted(unknown))}")
    # Order matters where one patch wraps another (smallwrite wraps batch).
    for name in (
        "gcfreeze",
        "nogc",
        "gc50k",
        "gc10k",
        "malloc",
        "repr",
        "frame",
        "window",
        "batch",
        "smallwrite",
        "smallread",
        "inlineio",
        "caps",
        "fmbeager",
        "digestnew",
        "gar",
    ):
        if name in patches:
            globals()[f"patch_{name}"]()


if __name__ == "__main__":
    apply(PATCHES)
    from reexec.daemon.cli import main

    sys.exit(main(sys.argv[1:]))
