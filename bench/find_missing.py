"""FindMissingBlobs with 10,000 SHA-256 digests, half of them present.

1. Server-side time, in process: `CasService.find_missing_blobs(request)` called directly (fastpb
   request) on the daemon's default CAS (VerifyingStore over FilesystemStore) holding the present
   half; also request decode and response encode, which the server does around it.
2. End to end over loopback against a `reexecd serve` subprocess (present half uploaded first
   with BatchUpdateBlobs): median and p90 latency of 30 sequential calls, grpcio client.
Baseline: encode+decode of the same 10,000-digest request with fastpb (upb) and betterproto2.

Usage: .venv/bin/python bench/find_missing.py [--digests 10000] [--calls 30]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import trio
from _common import (
    BENCH_TMPDIR,
    GRPC_OPTIONS,
    REAPI,
    CpuMeter,
    banner,
    median,
    percentile,
    quiet_note,
    reexecd,
    table,
)

from reexec import fastpb
from reexec.cas.cas_service import CasService
from reexec.cas.digest import Digest
from reexec.cas.factory import build_store
from reexec.daemon.config import Config
from reexec.gen.build.bazel.remote.execution import v2 as re

TARGET_MS = 15.0
BATCH = 1000


def make_sets(n: int) -> tuple[list[tuple[bytes, str]], list[tuple[str, int]]]:
    """n/2 small present blobs (data, hash) and n/2 absent digests (hash, size)."""
    present = []
    for i in range(n // 2):
        data = f"reexec bench blob {i} ".encode() + os.urandom(16)
        present.append((data, hashlib.sha256(data).hexdigest()))
    absent = [(hashlib.sha256(os.urandom(16)).hexdigest(), 1000 + i) for i in range(n - n // 2)]
    return present, absent


def make_request(present: list[tuple[bytes, str]], absent: list[tuple[str, int]]) -> bytes:
    req = fastpb.FindMissingBlobsRequest()
    add = req.blob_digests.add
    # Interleave, as a client's list would be.
    for (data, h), (ah, asz) in zip(present, absent, strict=True):
        add(hash=h, size_bytes=len(data))
        add(hash=ah, size_bytes=asz)
    return req.SerializeToString()


def codec_baselines(raw: bytes, reps: int = 5) -> tuple[float, float]:
    """Best-of-reps ms for decode+encode of the request: fastpb, betterproto2."""

    def best(fn) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    fast = best(lambda: fastpb.FindMissingBlobsRequest.FromString(raw).SerializeToString())
    bp2 = best(lambda: bytes(re.FindMissingBlobsRequest.parse(raw)))
    return fast, bp2


async def in_process(raw: bytes, present: list[tuple[bytes, str]], reps: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="reexec-bench-fmb-", dir=BENCH_TMPDIR))
    try:
        cas = await build_store(Config().cas, tmp)
        for data, h in present:
            await cas.put_bytes(Digest(h, len(data)), data)
        service = CasService(cas, max_batch_total_size_bytes=4 << 20)
        decode, call, encode = [], [], []
        meter = CpuMeter(None)
        meter.__enter__()
        for _ in range(reps):
            t0 = time.perf_counter()
            req = fastpb.FindMissingBlobsRequest.FromString(raw)
            t1 = time.perf_counter()
            resp = await service.find_missing_blobs(req)
            t2 = time.perf_counter()
            resp.SerializeToString()
            t3 = time.perf_counter()
            decode.append(t1 - t0)
            call.append(t2 - t1)
            encode.append(t3 - t2)
        meter.__exit__(None, None, None)
        assert len(resp.missing_blob_digests) == len(present), len(resp.missing_blob_digests)
        await cas.aclose()
        return {
            "decode_ms": 1000 * median(decode),
            "call_ms": 1000 * median(call),
            "encode_ms": 1000 * median(encode),
            "total_ms": 1000 * (median(decode) + median(call) + median(encode)),
            "other_pct": meter.other_pct,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def end_to_end(raw: bytes, present: list[tuple[bytes, str]], calls: int) -> dict[str, float]:
    with reexecd() as server, grpc.insecure_channel(server.target, options=GRPC_OPTIONS) as ch:
        fmb = ch.unary_unary(
            f"/{REAPI}.ContentAddressableStorage/FindMissingBlobs",
            request_serializer=lambda b: b,  # the request is sent as pre-encoded bytes
            response_deserializer=fastpb.FindMissingBlobsResponse.FromString,
        )
        bub = ch.unary_unary(
            f"/{REAPI}.ContentAddressableStorage/BatchUpdateBlobs",
            request_serializer=fastpb.BatchUpdateBlobsRequest.SerializeToString,
            response_deserializer=fastpb.BatchUpdateBlobsResponse.FromString,
        )
        for i in range(0, len(present), BATCH):
            req = fastpb.BatchUpdateBlobsRequest()
            for data, h in present[i : i + BATCH]:
                r = req.requests.add(data=data)
                r.digest.hash = h
                r.digest.size_bytes = len(data)
            resp = bub(req)
            assert all(r.status.code == 0 for r in resp.responses), resp.responses[0]
        for _ in range(3):  # warm up
            fmb(raw)
        lat = []
        with CpuMeter(server) as m:
            for _ in range(calls):
                t0 = time.perf_counter()
                resp = fmb(raw)
                lat.append(time.perf_counter() - t0)
        assert len(resp.missing_blob_digests) == len(present)
        return {
            "p50_ms": 1000 * median(lat),
            "p90_ms": 1000 * percentile(lat, 90),
            "min_ms": 1000 * min(lat),
            "server_cpu_ms": 1000 * m.server_cpu / calls,
            "client_cpu_ms": 1000 * m.client_cpu / calls,
            "other_pct": m.other_pct,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digests", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    n = args.digests
    banner(f"FindMissingBlobs, {n:,} SHA-256 digests, half present")

    present, absent = make_sets(n)
    raw = make_request(present, absent)
    print(f"  request: {len(raw):,} bytes on the wire", flush=True)

    fast_ms, bp2_ms = codec_baselines(raw)
    print(f"  baseline decode+encode: fastpb {fast_ms:.2f} ms, betterproto2 {bp2_ms:.1f} ms")

    ip = trio.run(in_process, raw, present, args.calls)
    print(
        f"  in process: decode {ip['decode_ms']:.2f} ms + find_missing_blobs {ip['call_ms']:.2f} ms"
        f" + encode {ip['encode_ms']:.2f} ms = {ip['total_ms']:.2f} ms (medians), "
        f"other {ip['other_pct']:.0f}%",
        flush=True,
    )
    e2e = end_to_end(raw, present, args.calls)
    print(
        f"  end to end over loopback: p50 {e2e['p50_ms']:.2f} ms, p90 {e2e['p90_ms']:.2f} ms, "
        f"min {e2e['min_ms']:.2f} ms; server CPU {e2e['server_cpu_ms']:.2f} ms/call, "
        f"client CPU {e2e['client_cpu_ms']:.2f} ms/call, other {e2e['other_pct']:.0f}%"
    )
    print(quiet_note())
    print()
    print(
        table(
            ["FindMissingBlobs 10k", "ms", "baseline", "ratio", "target", "met?"],
            [
                [
                    "server side, in process (decode+call+encode)",
                    ip["total_ms"],
                    f"fastpb codec {fast_ms:.2f} ms",
                    f"{ip['total_ms'] / fast_ms:.1f}x",
                    "-",
                    "-",
                ],
                [
                    "  of which find_missing_blobs()",
                    ip["call_ms"],
                    f"fastpb codec {fast_ms:.2f} ms",
                    f"{ip['call_ms'] / fast_ms:.1f}x",
                    "-",
                    "-",
                ],
                [
                    "end to end p50 (subprocess, loopback)",
                    e2e["p50_ms"],
                    f"fastpb codec {fast_ms:.2f} ms",
                    f"{e2e['p50_ms'] / fast_ms:.1f}x",
                    "-",
                    "-",
                ],
                [
                    "end to end p90 (issue 13's row)",
                    e2e["p90_ms"],
                    f"fastpb codec {fast_ms:.2f} ms",
                    f"{e2e['p90_ms'] / fast_ms:.1f}x",
                    f"<= {TARGET_MS:.0f} ms",
                    "yes" if e2e["p90_ms"] <= TARGET_MS else "no",
                ],
                [
                    "(betterproto2 decode+encode, for scale)",
                    bp2_ms,
                    "-",
                    "-",
                    "-",
                    "-",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
