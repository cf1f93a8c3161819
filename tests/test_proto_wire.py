"""Wire compatibility of our protos with independent reference definitions.

References (never part of the project, only read here):

* the REAPI protos shipped in the buildstream==2.8.1 wheel, fetched by
  ``scripts/fetch_reference_protos.py`` into ``.cache/ref/protos``;
* googleapis-common-protos' ``google/rpc/error_details.proto`` and its current
  ``google/longrunning/operations_proto.proto``.

Two kinds of checks:

1. Descriptor comparison (exhaustive): every message, nested message, enum,
   enum value, field (number, name, type, label, type name, oneof, deprecated)
   and service method of the reference must be identical in our protos.
2. Byte round trips (representative): messages filled with non-default values
   are encoded by our betterproto2 classes and by ``reexec.fastpb``, decoded by
   classes that ``protoc --python_out`` compiled from the *reference* protos
   (in a subprocess, so the reference's default-pool registrations never meet
   anything else), compared for content, and the reference encoding is decoded
   by both of ours.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto2
import pytest
from google.protobuf import descriptor_pb2, json_format

import reexec.gen.build.bazel.remote.execution.v2 as re_v2
import reexec.gen.build.bazel.semver as semver
import reexec.gen.google.bytestream as bytestream
import reexec.gen.google.longrunning as longrunning
import reexec.gen.google.protobuf as wkt
import reexec.gen.google.rpc as rpc
from reexec import fastpb

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DESCRIPTORS = ROOT / "reexec" / "gen" / "descriptors.binpb"
REF_DIR = ROOT / ".cache" / "ref" / "protos"
FETCH_SCRIPT = ROOT / "scripts" / "fetch_reference_protos.py"

REAPI = "build/bazel/remote/execution/v2/remote_execution.proto"
SEMVER = "build/bazel/semver/semver.proto"
ASSET = "build/bazel/remote/asset/v1/remote_asset.proto"
BYTESTREAM = "google/bytestream/bytestream.proto"
OPERATIONS = "google/longrunning/operations.proto"
STATUS = "google/rpc/status.proto"
CODE = "google/rpc/code.proto"
ERROR_DETAILS = "google/rpc/error_details.proto"
GAPI_OPERATIONS = "google/longrunning/operations_proto.proto"

# Reference files taken from the buildstream wheel.
BST_FILES = [REAPI, SEMVER, BYTESTREAM, OPERATIONS, STATUS, CODE, ASSET]
# Needed only so the reference _pb2 modules import.
BST_EXTRA_FILES = ["google/api/annotations.proto", "google/api/http.proto"]
# Reference files taken from googleapis-common-protos.
GAPI_FILES = [ERROR_DETAILS, GAPI_OPERATIONS]


# ---------------------------------------------------------------------------
# Reference material
# ---------------------------------------------------------------------------


def _grpc_tools_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def _googleapis_root() -> Path:
    try:
        dist = importlib.metadata.distribution("googleapis-common-protos")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("googleapis-common-protos is not installed (pip install -e '.[test]')")
    path = Path(str(dist.locate_file(ERROR_DETAILS)))
    if not path.is_file():
        pytest.fail(f"googleapis-common-protos ships no {ERROR_DETAILS} (looked at {path})")
    return path.parents[2]


def _ensure_reference_protos() -> Path:
    sentinel = REF_DIR / REAPI
    if not sentinel.is_file():
        proc = subprocess.run(
            [sys.executable, str(FETCH_SCRIPT)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0 or not sentinel.is_file():
            pytest.fail(
                "could not fetch the reference protos (buildstream==2.8.1 wheel) with "
                f"{FETCH_SCRIPT.relative_to(ROOT)}; the wire tests need them.\n"
                f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
    return REF_DIR


def _protoc(includes: list[Path], files: list[str], out: Path, descriptor_set: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        *(f"-I{p}" for p in includes),
        f"--python_out={out}",
        f"--descriptor_set_out={descriptor_set}",
        "--include_imports",
        *files,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"protoc failed on reference protos:\n{' '.join(cmd)}\n{proc.stderr}")


def _load_fds(path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    return {fd.name: fd for fd in fds.file}


@dataclass(frozen=True)
class Reference:
    py_dir: Path  # reference _pb2 modules, importable as top-level packages
    bst: dict[str, descriptor_pb2.FileDescriptorProto]
    gapi: dict[str, descriptor_pb2.FileDescriptorProto]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    ref_protos = _ensure_reference_protos()
    tmp = tmp_path_factory.mktemp("refpb")
    py_dir = tmp / "py"
    py_dir.mkdir()
    include = _grpc_tools_include()
    _protoc([ref_protos, include], BST_FILES + BST_EXTRA_FILES, py_dir, tmp / "bst.binpb")
    _protoc([include, _googleapis_root()], GAPI_FILES, py_dir, tmp / "gapi.binpb")
    # Make every generated directory (but not the `google` namespace itself,
    # which must keep finding google.protobuf in site-packages) a regular
    # package so it wins over same-named namespace portions elsewhere.
    for d in py_dir.rglob("*"):
        if d.is_dir() and d != py_dir / "google":
            (d / "__init__.py").touch()
    return Reference(py_dir, _load_fds(tmp / "bst.binpb"), _load_fds(tmp / "gapi.binpb"))


@pytest.fixture(scope="module")
def ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return _load_fds(GEN_DESCRIPTORS)


# ---------------------------------------------------------------------------
# Descriptor comparison
# ---------------------------------------------------------------------------

FDP = descriptor_pb2.FieldDescriptorProto


def _norm_field(f: descriptor_pb2.FieldDescriptorProto, oneofs: list[str]) -> dict[str, Any]:
    return {
        "number": f.number,
        "label": FDP.Label.Name(f.label),
        "type": FDP.Type.Name(f.type),
        "type_name": f.type_name,
        "json_name": f.json_name,
        "default_value": f.default_value,
        "extendee": f.extendee,
        "oneof": oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
        "proto3_optional": f.proto3_optional,
        "deprecated": f.options.deprecated,
        "packed": f.options.packed if f.options.HasField("packed") else None,
    }


def _norm_enum(e: descriptor_pb2.EnumDescriptorProto) -> dict[str, Any]:
    return {
        "values": {v.name: v.number for v in e.value},
        "allow_alias": e.options.allow_alias,
        "reserved_ranges": sorted((r.start, r.end) for r in e.reserved_range),
        "reserved_names": sorted(e.reserved_name),
    }


def _norm_message(m: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    oneofs = [o.name for o in m.oneof_decl]
    return {
        "fields": {f.name: _norm_field(f, oneofs) for f in m.field},
        "nested": {n.name: _norm_message(n) for n in m.nested_type},
        "enums": {e.name: _norm_enum(e) for e in m.enum_type},
        "oneofs": {name: True for name in oneofs},
        "map_entry": m.options.map_entry,
        "extensions": {x.name: _norm_field(x, []) for x in m.extension},
        "reserved_ranges": sorted((r.start, r.end) for r in m.reserved_range),
        "reserved_names": sorted(m.reserved_name),
    }


def _norm_file(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    return {
        "package": fd.package,
        "syntax": fd.syntax,
        "messages": {m.name: _norm_message(m) for m in fd.message_type},
        "enums": {e.name: _norm_enum(e) for e in fd.enum_type},
        "services": {
            s.name: {
                m.name: {
                    "input_type": m.input_type,
                    "output_type": m.output_type,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in s.method
            }
            for s in fd.service
        },
        "extensions": {x.name: _norm_field(x, []) for x in fd.extension},
    }


def _diff(ref: Any, ours: Any, path: str, *, subset: bool) -> list[str]:
    """Differences between two normalized descriptors (ours may add if subset)."""
    if isinstance(ref, dict) and isinstance(ours, dict):
        out: list[str] = []
        for key, value in ref.items():
            if key not in ours:
                out.append(f"{path}.{key}: missing in ours")
            else:
                out += _diff(value, ours[key], f"{path}.{key}", subset=subset)
        if not subset:
            out += [f"{path}.{key}: not in reference" for key in ours if key not in ref]
        return out
    if ref != ours:
        return [f"{path}: reference={ref!r} ours={ours!r}"]
    return []


def _compare(ref_fd: descriptor_pb2.FileDescriptorProto, our_fd, *, subset: bool) -> list[str]:
    return _diff(_norm_file(ref_fd), _norm_file(our_fd), our_fd.name, subset=subset)


# Fields of the current upstream REAPI that buildstream 2.8.1's copy predates:
# (message, field) -> (number, type name).
NEWER_THAN_BUILDSTREAM = {
    ("ExecuteOperationMetadata", "digest_function"): (
        6,
        ".build.bazel.remote.execution.v2.DigestFunction.Value",
    ),
}


@pytest.mark.parametrize("name", [REAPI, SEMVER, BYTESTREAM, STATUS, CODE, ASSET])
def test_descriptor_matches_buildstream_reference(
    name: str, reference: Reference, ours: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    ref, mine = _norm_file(reference.bst[name]), _norm_file(ours[name])
    if name == REAPI:
        for (message, field), (number, type_name) in NEWER_THAN_BUILDSTREAM.items():
            added = mine["messages"][message]["fields"].pop(field)
            assert (added["number"], added["type_name"]) == (number, type_name)
    problems = _diff(ref, mine, name, subset=False)
    assert not problems, "\n".join(problems)


def test_reapi_reference_is_fully_covered(
    reference: Reference, ours: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    # Spot checks that the normalization really sees what matters.
    ref = _norm_file(reference.bst[REAPI])
    assert len(ref["messages"]) >= 45
    assert set(ref["services"]) == {
        "Execution",
        "ActionCache",
        "ContentAddressableStorage",
        "Capabilities",
    }
    mine = _norm_file(ours[REAPI])
    cmd = mine["messages"]["Command"]
    assert cmd["fields"]["output_files"]["deprecated"] is True
    assert cmd["fields"]["output_paths"]["number"] == 7
    assert mine["messages"]["BatchReadBlobsResponse"]["nested"]["Response"]["fields"]["compressor"][
        "type_name"
    ] == (".build.bazel.remote.execution.v2.Compressor.Value")
    assert mine["messages"]["ExecuteResponse"]["nested"]["ServerLogsEntry"]["map_entry"]


def test_operations_matches_googleapis(
    reference: Reference, ours: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    ref = _norm_file(reference.gapi[GAPI_OPERATIONS])
    mine = _norm_file(ours[OPERATIONS])
    # Deliberate deviation: the `operation_info` MethodOptions extension is
    # left out (no wire data; it would need descriptor.proto and google/api).
    assert set(ref.pop("extensions")) == {"operation_info"}
    assert mine.pop("extensions") == {}
    problems = _diff(ref, mine, OPERATIONS, subset=False)
    assert not problems, "\n".join(problems)


def test_operations_is_superset_of_buildstream_reference(
    reference: Reference, ours: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    problems = _compare(reference.bst[OPERATIONS], ours[OPERATIONS], subset=True)
    assert not problems, "\n".join(problems)


def test_error_details_matches_googleapis(
    reference: Reference, ours: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    problems = _compare(reference.gapi[ERROR_DETAILS], ours[ERROR_DETAILS], subset=False)
    assert not problems, "\n".join(problems)


# Our own protocols have no external reference to compare with.
OWN_PROTOCOLS = {"reexec/worker/v1/worker.proto"}


def test_every_proto_is_compared() -> None:
    compared = {REAPI, SEMVER, BYTESTREAM, STATUS, CODE, OPERATIONS, ERROR_DETAILS, ASSET}
    ours = {p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto")}
    assert ours - OWN_PROTOCOLS == compared, "add new protos to the wire tests"


# ---------------------------------------------------------------------------
# Representative messages for byte round trips
# ---------------------------------------------------------------------------

UTC = datetime.UTC


def _ts(i: int) -> datetime.datetime:
    # Non-zero seconds and sub-second part, so both Timestamp fields are set.
    return datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC) + datetime.timedelta(
        minutes=i, microseconds=i
    )


DURATION = datetime.timedelta(seconds=90, microseconds=250_000)


def _digest(i: int) -> re_v2.Digest:
    return re_v2.Digest(hash=hashlib.sha256(str(i).encode()).hexdigest(), size_bytes=2**40 + i)


def _node_properties(i: int) -> re_v2.NodeProperties:
    return re_v2.NodeProperties(
        properties=[re_v2.NodeProperty(name="origin", value=f"n{i}")],
        mtime=_ts(i),
        unix_mode=0o755,
    )


def _platform() -> re_v2.Platform:
    return re_v2.Platform(
        properties=[
            re_v2.PlatformProperty(name="OSFamily", value="linux"),
            re_v2.PlatformProperty(name="container-image", value="docker://img@sha256:00"),
        ]
    )


def _precondition_failure() -> rpc.PreconditionFailure:
    return rpc.PreconditionFailure(
        violations=[
            rpc.PreconditionFailureViolation(
                type="MISSING", subject=f"blobs/{_digest(1).hash}/1", description="input"
            )
        ]
    )


def _status() -> rpc.Status:
    return rpc.Status(
        code=rpc.Code.FAILED_PRECONDITION,
        message="missing inputs",
        details=[wkt.Any.pack(_precondition_failure())],
    )


def _symlink(i: int) -> re_v2.OutputSymlink:
    return re_v2.OutputSymlink(path=f"out/l{i}", target="../t", node_properties=_node_properties(i))


def _executed_metadata() -> re_v2.ExecutedActionMetadata:
    return re_v2.ExecutedActionMetadata(
        worker="worker-1",
        queued_timestamp=_ts(1),
        worker_start_timestamp=_ts(2),
        worker_completed_timestamp=_ts(3),
        input_fetch_start_timestamp=_ts(4),
        input_fetch_completed_timestamp=_ts(5),
        execution_start_timestamp=_ts(6),
        execution_completed_timestamp=_ts(7),
        virtual_execution_duration=DURATION,
        output_upload_start_timestamp=_ts(8),
        output_upload_completed_timestamp=_ts(9),
        auxiliary_metadata=[wkt.Any.pack(re_v2.ToolDetails(tool_name="reexec", tool_version="1"))],
    )


def _action_result() -> re_v2.ActionResult:
    return re_v2.ActionResult(
        output_files=[
            re_v2.OutputFile(
                path="out/a.o",
                digest=_digest(2),
                is_executable=True,
                contents=b"\x00\xffELF",
                node_properties=_node_properties(2),
            )
        ],
        output_file_symlinks=[_symlink(1)],
        output_symlinks=[_symlink(2), _symlink(3)],
        output_directories=[
            re_v2.OutputDirectory(
                path="out/dir",
                tree_digest=_digest(3),
                is_topologically_sorted=True,
                root_directory_digest=_digest(4),
            )
        ],
        output_directory_symlinks=[_symlink(4)],
        exit_code=-3,
        stdout_raw=b"hello\n",
        stdout_digest=_digest(5),
        stderr_raw=b"warning\n",
        stderr_digest=_digest(6),
        execution_metadata=_executed_metadata(),
    )


def _directory(i: int) -> re_v2.Directory:
    return re_v2.Directory(
        files=[
            re_v2.FileNode(
                name=f"f{i}.c",
                digest=_digest(i),
                is_executable=True,
                node_properties=_node_properties(i),
            )
        ],
        directories=[re_v2.DirectoryNode(name=f"d{i}", digest=_digest(i + 1))],
        symlinks=[
            re_v2.SymlinkNode(name=f"s{i}", target="f.c", node_properties=_node_properties(i))
        ],
        node_properties=_node_properties(i + 2),
    )


def _execute_response() -> re_v2.ExecuteResponse:
    return re_v2.ExecuteResponse(
        result=_action_result(),
        cached_result=True,
        status=_status(),
        server_logs={
            "worker.log": re_v2.LogFile(digest=_digest(7), human_readable=True),
            "trace": re_v2.LogFile(digest=_digest(8), human_readable=True),
        },
        message="see logs",
    )


def _execute_metadata() -> re_v2.ExecuteOperationMetadata:
    return re_v2.ExecuteOperationMetadata(
        stage=re_v2.ExecutionStageValue.EXECUTING,
        action_digest=_digest(9),
        stdout_stream_name="inst/logs/op/stdout",
        stderr_stream_name="inst/logs/op/stderr",
        partial_execution_metadata=_executed_metadata(),
    )


def _priorities(lo: int) -> re_v2.PriorityCapabilities:
    return re_v2.PriorityCapabilities(
        priorities=[re_v2.PriorityCapabilitiesPriorityRange(min_priority=lo, max_priority=100)]
    )


SHA256 = re_v2.DigestFunctionValue.SHA256
BLAKE3 = re_v2.DigestFunctionValue.BLAKE3
ZSTD = re_v2.CompressorValue.ZSTD
DEFLATE = re_v2.CompressorValue.DEFLATE

# (case id, full message name, factory); every field of every sample is set
# (the reference subprocess checks that, recursively, except inside Any).
CASES: list[tuple[str, str, Callable[[], betterproto2.Message]]] = [
    (
        "Action",
        "build.bazel.remote.execution.v2.Action",
        lambda: re_v2.Action(
            command_digest=_digest(1),
            input_root_digest=_digest(2),
            timeout=DURATION,
            do_not_cache=True,
            salt=b"\x01salt",
            platform=_platform(),
        ),
    ),
    (
        "Command",
        "build.bazel.remote.execution.v2.Command",
        lambda: re_v2.Command(
            arguments=["/bin/cc", "-c", "a.c"],
            environment_variables=[
                re_v2.CommandEnvironmentVariable(name="PATH", value="/bin"),
                re_v2.CommandEnvironmentVariable(name="LANG", value="C"),
            ],
            output_files=["a.o"],
            output_directories=["gen"],
            output_paths=["a.o", "gen"],
            platform=_platform(),
            working_directory="src",
            output_node_properties=["mtime"],
            output_directory_format=re_v2.CommandOutputDirectoryFormat.TREE_AND_DIRECTORY,
        ),
    ),
    ("Directory", "build.bazel.remote.execution.v2.Directory", lambda: _directory(1)),
    (
        "Tree",
        "build.bazel.remote.execution.v2.Tree",
        lambda: re_v2.Tree(root=_directory(1), children=[_directory(2), _directory(3)]),
    ),
    ("ActionResult", "build.bazel.remote.execution.v2.ActionResult", _action_result),
    (
        "ExecuteRequest",
        "build.bazel.remote.execution.v2.ExecuteRequest",
        lambda: re_v2.ExecuteRequest(
            instance_name="main",
            skip_cache_lookup=True,
            action_digest=_digest(1),
            execution_policy=re_v2.ExecutionPolicy(priority=-5),
            results_cache_policy=re_v2.ResultsCachePolicy(priority=7),
            digest_function=BLAKE3,
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=["a.o"],
        ),
    ),
    ("ExecuteResponse", "build.bazel.remote.execution.v2.ExecuteResponse", _execute_response),
    (
        "ExecuteOperationMetadata",
        "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
        _execute_metadata,
    ),
    (
        "Operation.response",
        "google.longrunning.Operation",
        lambda: longrunning.Operation(
            name="operations/abc",
            metadata=wkt.Any.pack(_execute_metadata()),
            done=True,
            response=wkt.Any.pack(_execute_response()),
        ),
    ),
    (
        "Operation.error",
        "google.longrunning.Operation",
        lambda: longrunning.Operation(
            name="operations/def",
            metadata=wkt.Any.pack(_execute_metadata()),
            done=True,
            error=_status(),
        ),
    ),
    (
        "ListOperationsRequest",
        "google.longrunning.ListOperationsRequest",
        lambda: longrunning.ListOperationsRequest(
            name="operations", filter="done=false", page_size=10, page_token="t"
        ),
    ),
    (
        "GetActionResultRequest",
        "build.bazel.remote.execution.v2.GetActionResultRequest",
        lambda: re_v2.GetActionResultRequest(
            instance_name="main",
            action_digest=_digest(1),
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=["x"],
            digest_function=SHA256,
        ),
    ),
    (
        "UpdateActionResultRequest",
        "build.bazel.remote.execution.v2.UpdateActionResultRequest",
        lambda: re_v2.UpdateActionResultRequest(
            instance_name="main",
            action_digest=_digest(1),
            action_result=_action_result(),
            results_cache_policy=re_v2.ResultsCachePolicy(priority=1),
            digest_function=SHA256,
        ),
    ),
    (
        "FindMissingBlobsRequest",
        "build.bazel.remote.execution.v2.FindMissingBlobsRequest",
        lambda: re_v2.FindMissingBlobsRequest(
            instance_name="main",
            blob_digests=[_digest(i) for i in range(50)],
            digest_function=SHA256,
        ),
    ),
    (
        "FindMissingBlobsResponse",
        "build.bazel.remote.execution.v2.FindMissingBlobsResponse",
        lambda: re_v2.FindMissingBlobsResponse(missing_blob_digests=[_digest(3), _digest(4)]),
    ),
    (
        "BatchUpdateBlobsRequest",
        "build.bazel.remote.execution.v2.BatchUpdateBlobsRequest",
        lambda: re_v2.BatchUpdateBlobsRequest(
            instance_name="main",
            requests=[
                re_v2.BatchUpdateBlobsRequestRequest(
                    digest=_digest(1), data=b"\x28\xb5\x2f\xfd", compressor=ZSTD
                )
            ],
            digest_function=SHA256,
        ),
    ),
    (
        "BatchUpdateBlobsResponse",
        "build.bazel.remote.execution.v2.BatchUpdateBlobsResponse",
        lambda: re_v2.BatchUpdateBlobsResponse(
            responses=[re_v2.BatchUpdateBlobsResponseResponse(digest=_digest(1), status=_status())]
        ),
    ),
    (
        "BatchReadBlobsRequest",
        "build.bazel.remote.execution.v2.BatchReadBlobsRequest",
        lambda: re_v2.BatchReadBlobsRequest(
            instance_name="main",
            digests=[_digest(1), _digest(2)],
            acceptable_compressors=[ZSTD, DEFLATE],
            digest_function=BLAKE3,
        ),
    ),
    (
        "BatchReadBlobsResponse",
        "build.bazel.remote.execution.v2.BatchReadBlobsResponse",
        lambda: re_v2.BatchReadBlobsResponse(
            responses=[
                re_v2.BatchReadBlobsResponseResponse(
                    digest=_digest(1), data=b"blob", compressor=DEFLATE, status=_status()
                )
            ]
        ),
    ),
    (
        "GetTreeRequest",
        "build.bazel.remote.execution.v2.GetTreeRequest",
        lambda: re_v2.GetTreeRequest(
            instance_name="main",
            root_digest=_digest(1),
            page_size=100,
            page_token="next",
            digest_function=SHA256,
        ),
    ),
    (
        "GetTreeResponse",
        "build.bazel.remote.execution.v2.GetTreeResponse",
        lambda: re_v2.GetTreeResponse(
            directories=[_directory(1), _directory(2)], next_page_token="p2"
        ),
    ),
    (
        "ServerCapabilities",
        "build.bazel.remote.execution.v2.ServerCapabilities",
        lambda: re_v2.ServerCapabilities(
            cache_capabilities=re_v2.CacheCapabilities(
                digest_functions=[SHA256, BLAKE3],
                action_cache_update_capabilities=re_v2.ActionCacheUpdateCapabilities(
                    update_enabled=True
                ),
                cache_priority_capabilities=_priorities(-10),
                max_batch_total_size_bytes=4 * 1024 * 1024,
                symlink_absolute_path_strategy=re_v2.SymlinkAbsolutePathStrategyValue.ALLOWED,
                supported_compressors=[ZSTD],
                supported_batch_update_compressors=[ZSTD, DEFLATE],
            ),
            execution_capabilities=re_v2.ExecutionCapabilities(
                digest_function=SHA256,
                exec_enabled=True,
                execution_priority_capabilities=_priorities(-1),
                supported_node_properties=["mtime", "unix_mode"],
                digest_functions=[SHA256, BLAKE3],
            ),
            deprecated_api_version=semver.SemVer(major=2, minor=4, patch=1, prerelease="x"),
            low_api_version=semver.SemVer(major=2, minor=1, patch=2, prerelease="y"),
            high_api_version=semver.SemVer(major=2, minor=3, patch=3, prerelease="rc1"),
        ),
    ),
    (
        "RequestMetadata",
        "build.bazel.remote.execution.v2.RequestMetadata",
        lambda: re_v2.RequestMetadata(
            tool_details=re_v2.ToolDetails(tool_name="bazel", tool_version="7.4.0"),
            action_id="a",
            tool_invocation_id="b",
            correlated_invocations_id="c",
            action_mnemonic="CppCompile",
            target_id="//x:y",
            configuration_id="k8-fastbuild",
        ),
    ),
    (
        "ReadRequest",
        "google.bytestream.ReadRequest",
        lambda: bytestream.ReadRequest(
            resource_name="main/blobs/abc/3", read_offset=2**33, read_limit=1024
        ),
    ),
    (
        "WriteRequest",
        "google.bytestream.WriteRequest",
        lambda: bytestream.WriteRequest(
            resource_name="main/uploads/u/blobs/abc/3",
            write_offset=7,
            finish_write=True,
            data=b"\x00" * 300,
        ),
    ),
    (
        "QueryWriteStatusResponse",
        "google.bytestream.QueryWriteStatusResponse",
        lambda: bytestream.QueryWriteStatusResponse(committed_size=2**35, complete=True),
    ),
    ("Status", "google.rpc.Status", _status),
    (
        "BadRequest",
        "google.rpc.BadRequest",
        lambda: rpc.BadRequest(
            field_violations=[
                rpc.BadRequestFieldViolation(
                    field="blob_digests[0].hash",
                    description="not hex",
                    reason="INVALID_HASH",
                    localized_message=rpc.LocalizedMessage(locale="en-US", message="bad"),
                )
            ]
        ),
    ),
    (
        "ErrorInfo",
        "google.rpc.ErrorInfo",
        lambda: rpc.ErrorInfo(reason="QUOTA", domain="reexec", metadata={"k": "v", "a": "b"}),
    ),
    (
        "RetryInfo",
        "google.rpc.RetryInfo",
        lambda: rpc.RetryInfo(retry_delay=DURATION),
    ),
    (
        "DebugInfo",
        "google.rpc.DebugInfo",
        lambda: rpc.DebugInfo(stack_entries=["a", "b"], detail="d"),
    ),
    (
        "ResourceInfo",
        "google.rpc.ResourceInfo",
        lambda: rpc.ResourceInfo(
            resource_type="blob", resource_name="blobs/x/1", owner="o", description="d"
        ),
    ),
    (
        "QuotaFailure",
        "google.rpc.QuotaFailure",
        lambda: rpc.QuotaFailure(
            violations=[
                rpc.QuotaFailureViolation(
                    subject="s",
                    description="d",
                    api_service="svc",
                    quota_metric="m",
                    quota_id="q",
                    quota_dimensions={"region": "eu"},
                    quota_value=10,
                    future_quota_value=20,
                )
            ]
        ),
    ),
]

CASE_IDS = [case[0] for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


def _build(factory: Callable[[], betterproto2.Message]) -> betterproto2.Message:
    # Deprecated REAPI fields are filled on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return factory()


def _fastpb_from(msg: betterproto2.Message, full_name: str) -> Any:
    """The same content as a fastpb message, via the proto3 JSON mapping."""
    return json_format.ParseDict(
        msg.to_dict(), fastpb.message_class(full_name)(), descriptor_pool=fastpb.POOL
    )


def _fast_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, descriptor_pool=fastpb.POOL
    )


# Runs in a fresh interpreter with the reference _pb2 modules first on sys.path.
REFERENCE_SCRIPT = r"""
import base64, importlib, json, sys

sys.path.insert(0, sys.argv[1])
for module in sys.argv[2:]:
    importlib.import_module(module)

from google.protobuf import descriptor_pool, json_format, message_factory, text_format
from google.protobuf.unknown_fields import UnknownFieldSet

POOL = descriptor_pool.Default()


def cls_of(name):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(name))


def children(msg):
    # (path, submessage) for every set message-typed value, Any contents included.
    d = msg.DESCRIPTOR
    if d.full_name == "google.protobuf.Any" and msg.type_url:
        inner = cls_of(msg.TypeName())()
        if not msg.Unpack(inner):
            raise ValueError("cannot unpack " + msg.type_url)
        yield "<" + msg.TypeName() + ">", inner
        return
    for f in d.fields:
        if f.message_type is None:
            continue
        value = getattr(msg, f.name)
        if f.message_type.GetOptions().map_entry:
            if f.message_type.fields_by_name["value"].message_type is not None:
                for k in value:
                    yield f"{f.name}[{k!r}]", value[k]
        elif f.is_repeated:
            for i, v in enumerate(value):
                yield f"{f.name}[{i}]", v
        elif msg.HasField(f.name):
            yield f.name, value


def unknown(msg, path):
    out = [f"{path}: unknown field {u.field_number}" for u in UnknownFieldSet(msg)]
    for sub_path, sub in children(msg):
        out += unknown(sub, f"{path}.{sub_path}")
    return out


def unset(msg, path):
    # Fields of msg (recursively, not into Any) left at their default value.
    out = []
    d = msg.DESCRIPTOR
    for f in d.fields:
        p = f"{path}.{f.name}"
        oneof = f.containing_oneof
        if oneof is not None and len(oneof.fields) > 1:
            if msg.WhichOneof(oneof.name) not in (None, f.name):
                continue
        value = getattr(msg, f.name)
        if f.is_repeated:
            if len(value) == 0:
                out.append(p)
        elif f.message_type is not None or f.has_presence:
            if not msg.HasField(f.name):
                out.append(p)
        elif value == f.default_value:
            out.append(p)
    if d.full_name != "google.protobuf.Any":
        for sub_path, sub in children(msg):
            out += unset(sub, f"{path}.{sub_path}")
    return out


def as_dict(msg):
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


results = {}
for case in json.load(sys.stdin):
    errors = []
    cls = cls_of(case["type"])
    expected = json_format.ParseDict(case["json"], cls())
    missing = unset(expected, case["type"])
    if missing:
        errors.append("sample leaves fields unset: " + ", ".join(missing))
    for label, payload in case["payloads"].items():
        try:
            got = cls.FromString(base64.b64decode(payload))
        except Exception as exc:
            errors.append(f"{label}: reference cannot parse our bytes: {exc!r}")
            continue
        errors += [f"{label}: {e}" for e in unknown(got, case["type"])]
        if as_dict(got) != as_dict(expected):
            errors.append(
                f"{label}: content differs\n--- reference decode of our bytes\n"
                + text_format.MessageToString(got)
                + "--- expected\n"
                + text_format.MessageToString(expected)
            )
    results[case["id"]] = {
        "canonical": base64.b64encode(expected.SerializeToString(deterministic=True)).decode(),
        "errors": errors,
    }
json.dump(results, sys.stdout)
"""

REFERENCE_MODULES = [
    "build.bazel.remote.execution.v2.remote_execution_pb2",
    "build.bazel.semver.semver_pb2",
    "google.bytestream.bytestream_pb2",
    "google.longrunning.operations_pb2",
    "google.rpc.status_pb2",
    "google.rpc.code_pb2",
    "google.rpc.error_details_pb2",
]


@pytest.fixture(scope="module")
def reference_results(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cases = []
    for case_id, full_name, factory in CASES:
        msg = _build(factory)
        fast = _fastpb_from(msg, full_name)
        cases.append(
            {
                "id": case_id,
                "type": full_name,
                "json": msg.to_dict(),
                "payloads": {
                    "betterproto2": base64.b64encode(bytes(msg)).decode(),
                    "fastpb": base64.b64encode(fast.SerializeToString()).decode(),
                },
            }
        )
    script = tmp_path_factory.mktemp("refscript") / "reference_codec.py"
    script.write_text(REFERENCE_SCRIPT, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), str(reference.py_dir), *REFERENCE_MODULES],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
    )
    if proc.returncode != 0:
        pytest.fail(f"reference codec subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("case_id", "full_name", "factory"), CASES, ids=CASE_IDS)
def test_round_trip_with_reference(
    case_id: str,
    full_name: str,
    factory: Callable[[], betterproto2.Message],
    reference_results: dict,
) -> None:
    result = reference_results[case_id]
    # (a) Our encodings (betterproto2 and fastpb) decode with the reference
    # classes to the same content, with no unknown fields.
    assert not result["errors"], "\n".join(result["errors"])

    canonical = base64.b64decode(result["canonical"])
    msg = _build(factory)
    cls = type(msg)

    # (b) The reference encoding decodes with our betterproto2 classes to the
    # same content. (Compared via to_dict: betterproto2 writes fields in
    # declaration order, so bytes inside Any values may be ordered differently.)
    decoded = cls.parse(canonical)
    assert decoded.to_dict() == msg.to_dict()
    assert cls.parse(bytes(msg)) == msg

    # ... and with fastpb (content compared via JSON, which looks inside Any;
    # map order inside packed Any bytes is not deterministic).
    fast_cls = fastpb.message_class(full_name)
    fast_decoded = fast_cls.FromString(canonical)
    assert _fast_dict(fast_decoded) == _fast_dict(_fastpb_from(msg, full_name))
    assert fast_decoded.SerializeToString(deterministic=True) == canonical


def test_oneof_and_any_behave(reference_results: dict) -> None:
    op = longrunning.Operation.parse(
        base64.b64decode(reference_results["Operation.response"]["canonical"])
    )
    field, value = betterproto2.which_one_of(op, "result")
    assert field == "response"
    assert isinstance(value, wkt.Any)
    unpacked = value.unpack()
    assert isinstance(unpacked, re_v2.ExecuteResponse)
    assert unpacked.cached_result is True

    fast_op = fastpb.Operation.FromString(
        base64.b64decode(reference_results["Operation.error"]["canonical"])
    )
    assert fast_op.WhichOneof("result") == "error"
    pf = fastpb.PreconditionFailure()
    assert fast_op.error.details[0].Unpack(pf)
    assert pf.violations[0].type == "MISSING"


# ---------------------------------------------------------------------------
# fastpb module surface
# ---------------------------------------------------------------------------

FASTPB_NAMES = {
    "Digest": "build.bazel.remote.execution.v2.Digest",
    "Directory": "build.bazel.remote.execution.v2.Directory",
    "FileNode": "build.bazel.remote.execution.v2.FileNode",
    "DirectoryNode": "build.bazel.remote.execution.v2.DirectoryNode",
    "SymlinkNode": "build.bazel.remote.execution.v2.SymlinkNode",
    "Tree": "build.bazel.remote.execution.v2.Tree",
    "ActionResult": "build.bazel.remote.execution.v2.ActionResult",
    "OutputFile": "build.bazel.remote.execution.v2.OutputFile",
    "OutputDirectory": "build.bazel.remote.execution.v2.OutputDirectory",
    "OutputSymlink": "build.bazel.remote.execution.v2.OutputSymlink",
    "Action": "build.bazel.remote.execution.v2.Action",
    "Command": "build.bazel.remote.execution.v2.Command",
    "Platform": "build.bazel.remote.execution.v2.Platform",
    "FindMissingBlobsRequest": "build.bazel.remote.execution.v2.FindMissingBlobsRequest",
    "FindMissingBlobsResponse": "build.bazel.remote.execution.v2.FindMissingBlobsResponse",
    "BatchUpdateBlobsRequest": "build.bazel.remote.execution.v2.BatchUpdateBlobsRequest",
    "BatchUpdateBlobsResponse": "build.bazel.remote.execution.v2.BatchUpdateBlobsResponse",
    "BatchReadBlobsRequest": "build.bazel.remote.execution.v2.BatchReadBlobsRequest",
    "BatchReadBlobsResponse": "build.bazel.remote.execution.v2.BatchReadBlobsResponse",
    "GetTreeRequest": "build.bazel.remote.execution.v2.GetTreeRequest",
    "GetTreeResponse": "build.bazel.remote.execution.v2.GetTreeResponse",
    "GetActionResultRequest": "build.bazel.remote.execution.v2.GetActionResultRequest",
    "UpdateActionResultRequest": "build.bazel.remote.execution.v2.UpdateActionResultRequest",
    "Status": "google.rpc.Status",
    "PreconditionFailure": "google.rpc.PreconditionFailure",
    "BadRequest": "google.rpc.BadRequest",
}


@pytest.mark.parametrize(("attr", "full_name"), sorted(FASTPB_NAMES.items()))
def test_fastpb_exports(attr: str, full_name: str) -> None:
    cls = getattr(fastpb, attr)
    assert cls.DESCRIPTOR.full_name == full_name
    assert fastpb.message_class(full_name) is cls
    assert callable(cls.FromString)
    assert cls.FromString(cls().SerializeToString()) == cls()


def test_fastpb_uses_private_pool() -> None:
    from google.protobuf import descriptor_pool

    # The googleapis copy lands in the default pool; ours must not clash with it.
    from google.rpc import status_pb2

    assert fastpb.POOL is not descriptor_pool.Default()
    assert fastpb.Status is not status_pb2.Status
    assert fastpb.Status.DESCRIPTOR.file.pool is fastpb.POOL
    wire = status_pb2.Status(code=5, message="m").SerializeToString()
    assert fastpb.Status.FromString(wire).code == 5
    with pytest.raises(KeyError):
        fastpb.message_class("no.such.Message")
