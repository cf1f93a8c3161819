"""Fuzzing the cache RPCs: ContentAddressableStorage, ByteStream, ActionCache, Capabilities.

Property (issue 9, permanent suite): whatever a client sends, the answer is success or a precise
status (never INTERNAL or UNKNOWN, never a hang), and the daemon keeps serving: after every
example a normal FindMissingBlobs still finds the canary blob; after every test a fresh blob
round-trips through BatchUpdateBlobs and ByteStream.Read.

Each RPC is fuzzed twice: with well-formed protobuf messages carrying hostile values
(`test_<rpc>`), and with those messages' bytes mutated at random but still decodable
(`test_mutated_<rpc>`). Bytes that do not decode at all are covered by test_fuzz_undecodable.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reexec import fastpb
from reexec.cas.digest import digest_of
from reexec.cas.resource import ResourceName, parse_write_name
from tests.hardening import strategies as s
from tests.hardening.conftest import (
    AC,
    BYTESTREAM,
    CAPABILITIES,
    CAS,
    Health,
    RawClient,
    assert_precise,
)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def _deep_check_after(health: Health):
    yield
    health.deep_check()


# -- request strategies -----------------------------------------------------------------------


@st.composite
def find_missing_requests(draw: st.DrawFn) -> Any:
    req = fastpb.FindMissingBlobsRequest(
        instance_name=draw(s.instance_names), digest_function=draw(s.digest_functions)
    )
    for d in draw(st.lists(s.digests(), max_size=20)):
        req.blob_digests.add().CopyFrom(d)
    return req


@st.composite
def batch_update_requests(draw: st.DrawFn) -> Any:
    req = fastpb.BatchUpdateBlobsRequest(
        instance_name=draw(s.instance_names), digest_function=draw(s.digest_functions)
    )
    for _ in range(draw(st.integers(0, 5))):
        data = draw(st.one_of(st.binary(max_size=300), st.sampled_from(s.KNOWN_BLOBS)))
        r = req.requests.add()
        how = draw(st.integers(0, 3))
        r.digest.CopyFrom(s.digest_of(data) if how else draw(s.digests()))
        if how == 1:
            r.digest.size_bytes = draw(s.sizes)
        r.compressor = draw(st.one_of(st.just(0), s.compressors))
        r.data = s.zstd(data) if r.compressor == 1 and draw(st.booleans()) else data
    return req


@st.composite
def batch_read_requests(draw: st.DrawFn) -> Any:
    req = fastpb.BatchReadBlobsRequest(
        instance_name=draw(s.instance_names), digest_function=draw(s.digest_functions)
    )
    for d in draw(st.lists(s.digests(), max_size=10)):
        req.digests.add().CopyFrom(d)
    req.acceptable_compressors.extend(draw(st.lists(s.compressors, max_size=3)))
    return req


@st.composite
def get_tree_requests(draw: st.DrawFn, raw: RawClient) -> Any:
    root, dirs = draw(s.dags())
    if draw(st.integers(0, 3)):
        raw.upload(*dirs)  # the DAG exists (its leaves and subtrees may not)
    else:
        root = draw(s.digests())
    req = fastpb.GetTreeRequest(
        instance_name=draw(st.one_of(st.just(""), s.instance_names)),
        page_size=draw(
            st.one_of(st.integers(0, 3), st.integers(-2, 3), st.sampled_from([-(2**31), 2**31 - 1]))
        ),
        page_token=draw(s.page_tokens),
        digest_function=draw(st.one_of(st.just(0), st.just(0), s.digest_functions)),
    )
    req.root_digest.CopyFrom(root)
    return req


@st.composite
def read_requests(draw: st.DrawFn) -> Any:
    return fastpb.ReadRequest(
        resource_name=draw(s.read_names()),
        read_offset=draw(st.one_of(st.integers(-2, 6000), s.sizes)),
        read_limit=draw(st.one_of(st.integers(-2, 6000), s.sizes)),
    )


@st.composite
def write_streams(draw: st.DrawFn) -> list[Any]:
    """A whole Write stream: hostile names, offsets, data, compression and finish flags."""
    data = draw(st.one_of(st.binary(max_size=3000), st.sampled_from(s.KNOWN_BLOBS)))
    name = draw(s.write_names(data=data))
    compressed = "compressed-blobs/zstd" in name
    payload = s.zstd(data) if compressed and draw(st.booleans()) else data
    out: list[Any] = []
    offset = 0
    chunk = draw(st.integers(1, 1500))
    n = draw(st.integers(0, 4))
    for i in range(n):
        piece = payload[offset : offset + chunk]
        req = fastpb.WriteRequest(
            resource_name=name if i == 0 or draw(st.integers(0, 5)) == 0 else "",
            write_offset=offset if draw(st.integers(0, 4)) else draw(s.sizes),
            data=piece if draw(st.integers(0, 5)) else draw(st.binary(max_size=100)),
            finish_write=(i == n - 1) if draw(st.integers(0, 4)) else draw(st.booleans()),
        )
        out.append(req)
        offset += len(piece)
    return out


@st.composite
def query_write_status_requests(draw: st.DrawFn) -> Any:
    return fastpb.message_class("google.bytestream.QueryWriteStatusRequest")(
        resource_name=draw(st.one_of(s.write_names(), s.read_names()))
    )


@st.composite
def get_action_result_requests(draw: st.DrawFn) -> Any:
    req = fastpb.GetActionResultRequest(
        instance_name=draw(s.instance_names),
        inline_stdout=draw(st.booleans()),
        inline_stderr=draw(st.booleans()),
        digest_function=draw(st.one_of(st.just(0), s.digest_functions)),
    )
    req.action_digest.CopyFrom(draw(s.digests()))
    req.inline_output_files.extend(draw(st.lists(s.paths, max_size=3)))
    return req


@st.composite
def update_action_result_requests(draw: st.DrawFn) -> Any:
    req = fastpb.UpdateActionResultRequest(
        instance_name=draw(s.instance_names),
        digest_function=draw(st.one_of(st.just(0), s.digest_functions)),
    )
    req.action_digest.CopyFrom(draw(s.digests()))
    req.action_result.CopyFrom(draw(s.action_results()))
    if draw(st.booleans()):
        req.results_cache_policy.priority = draw(st.integers(-(2**31), 2**31 - 1))
    return req


@st.composite
def capabilities_requests(draw: st.DrawFn) -> Any:
    return fastpb.message_class("build.bazel.remote.execution.v2.GetCapabilitiesRequest")(
        instance_name=draw(s.instance_names)
    )


# -- calling ----------------------------------------------------------------------------------

UNARY = {
    "FindMissingBlobs": (CAS + "FindMissingBlobs", find_missing_requests),
    "BatchUpdateBlobs": (CAS + "BatchUpdateBlobs", batch_update_requests),
    "BatchReadBlobs": (CAS + "BatchReadBlobs", batch_read_requests),
    "QueryWriteStatus": (BYTESTREAM + "QueryWriteStatus", query_write_status_requests),
    "GetActionResult": (AC + "GetActionResult", get_action_result_requests),
    "UpdateActionResult": (AC + "UpdateActionResult", update_action_result_requests),
    "GetCapabilities": (CAPABILITIES, capabilities_requests),
}


def _decodes(cls: Any, data: bytes) -> bool:
    try:
        cls.FromString(data)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("rpc", sorted(UNARY))
@FUZZ
@given(data=st.data())
def test_unary(raw: RawClient, health: Health, rpc: str, data: st.DataObject) -> None:
    method, strategy = UNARY[rpc]
    req = data.draw(strategy(), label="request")
    out = raw.unary(method, req.SerializeToString())
    assert_precise(out, req)
    health.check(req)


@pytest.mark.parametrize("rpc", sorted(UNARY))
@FUZZ
@given(data=st.data())
def test_mutated_unary(raw: RawClient, health: Health, rpc: str, data: st.DataObject) -> None:
    method, strategy = UNARY[rpc]
    req = data.draw(strategy(), label="request")
    wire = data.draw(s.mutated(req.SerializeToString()), label="mutated bytes")
    if not _decodes(type(req), wire):
        event("undecodable")
        return  # see test_fuzz_undecodable
    out = raw.unary(method, wire)
    assert_precise(out, wire)
    health.check(wire)


@FUZZ
@given(data=st.data())
def test_get_tree(raw: RawClient, health: Health, data: st.DataObject) -> None:
    req = data.draw(get_tree_requests(raw), label="request")
    wire = req.SerializeToString()
    if data.draw(st.booleans(), label="mutate"):
        wire = data.draw(s.mutated(wire), label="mutated bytes")
        if not _decodes(fastpb.GetTreeRequest, wire):
            event("undecodable")
            return
    out = raw.server_stream(CAS + "GetTree", wire)
    assert_precise(out, fastpb.GetTreeRequest.FromString(wire))
    health.check(req)


@FUZZ
@given(data=st.data())
def test_read(raw: RawClient, health: Health, data: st.DataObject) -> None:
    req = data.draw(read_requests(), label="request")
    wire = req.SerializeToString()
    if data.draw(st.booleans(), label="mutate"):
        wire = data.draw(s.mutated(wire), label="mutated bytes")
        if not _decodes(fastpb.ReadRequest, wire):
            event("undecodable")
            return
    out = raw.server_stream(BYTESTREAM + "Read", wire)
    assert_precise(out, fastpb.ReadRequest.FromString(wire))
    health.check(req)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_write(raw: RawClient, health: Health, data: st.DataObject) -> None:
    reqs = data.draw(write_streams(), label="stream")
    wires = [r.SerializeToString() for r in reqs]
    if wires and data.draw(st.booleans(), label="mutate"):
        i = data.draw(st.integers(0, len(wires) - 1), label="mutated message")
        wires[i] = data.draw(s.mutated(wires[i]), label="mutated bytes")
        if not _decodes(fastpb.WriteRequest, wires[i]):
            event("undecodable")
            event("undecodable")
            return
    out = raw.client_stream(BYTESTREAM + "Write", wires)
    assert_precise(out, [fastpb.WriteRequest.FromString(w) for w in wires])
    if out.ok:
        check_stored(raw, fastpb.WriteRequest.FromString(wires[0]).resource_name)
    health.check(reqs)


def check_stored(raw: RawClient, write_name: str) -> None:
    """A Write that succeeded stored exactly the blob its resource name promised."""
    name = parse_write_name(write_name)  # it was accepted, so it parses
    read_name = ResourceName(name.instance, name.digest).format()
    out = raw.server_stream(BYTESTREAM + "Read", fastpb.ReadRequest(resource_name=read_name)
                            .SerializeToString())  # fmt: skip
    assert out.ok, f"{write_name} succeeded but {read_name} reads {out}"
    data = b"".join(fastpb.ReadResponse.FromString(r).data for r in out.responses)
    assert digest_of(data, name.digest.function) == name.digest, write_name


def test_fuzzers_reach_success_paths(raw: RawClient) -> None:
    """The strategies are not all-garbage: well-formed requests of each kind succeed (so the
    property tests above also exercise the success paths)."""
    d = s.digest_of(s.KNOWN_BLOBS[2])
    req = fastpb.BatchReadBlobsRequest()
    req.digests.add().CopyFrom(d)
    out = raw.unary(CAS + "BatchReadBlobs", req.SerializeToString())
    assert out.ok, out
    assert (
        fastpb.BatchReadBlobsResponse.FromString(out.responses[0]).responses[0].data
        == (s.KNOWN_BLOBS[2])
    )
    assert raw.find_missing(d) == []
