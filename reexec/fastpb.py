"""Fast protobuf classes for bulk work, backed by Google's ``protobuf`` (upb).

betterproto2 classes (``reexec.gen``) are pleasant but pure Python; for
messages with thousands of elements (FindMissingBlobs, BatchReadBlobs, GetTree,
big Directory/Tree blobs) Google's C implementation is about two orders of
magnitude faster. This module builds such classes from
``reexec/gen/descriptors.binpb`` (written by ``scripts/gen_protos.py``) into a
*private* ``DescriptorPool``, so they never clash with other copies of the same
protos registered in the default pool (googleapis-common-protos, grpclib's
``google.rpc.status_pb2``, ...).

The classes have ``FromString``/``SerializeToString``, so grpclib's
``ProtoCodec`` can use them directly as request and response types. Well-known
types get their usual helpers (``Any.Pack``/``Unpack``, ``Timestamp.FromDatetime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any as _Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

__all__ = [
    "POOL",
    "Action",
    "ActionResult",
    "Any",
    "BadRequest",
    "BatchReadBlobsRequest",
    "BatchReadBlobsResponse",
    "BatchUpdateBlobsRequest",
    "BatchUpdateBlobsResponse",
    "Command",
    "Digest",
    "Directory",
    "DirectoryNode",
    "Duration",
    "ExecuteOperationMetadata",
    "ExecuteRequest",
    "ExecuteResponse",
    "FileNode",
    "FindMissingBlobsRequest",
    "FindMissingBlobsResponse",
    "GetActionResultRequest",
    "GetTreeRequest",
    "GetTreeResponse",
    "Message",
    "NodeProperties",
    "Operation",
    "OutputDirectory",
    "OutputFile",
    "OutputSymlink",
    "Platform",
    "PreconditionFailure",
    "ReadRequest",
    "ReadResponse",
    "RequestMetadata",
    "Status",
    "SymlinkNode",
    "Timestamp",
    "Tree",
    "UpdateActionResultRequest",
    "WriteRequest",
    "WriteResponse",
    "message_class",
]

DESCRIPTORS_PATH = Path(__file__).resolve().parent / "gen" / "descriptors.binpb"

_REAPI = "build.bazel.remote.execution.v2."


def _load_pool(path: Path) -> descriptor_pool.DescriptorPool:
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    # protoc --include_imports lists files dependencies-first.
    for file_proto in fds.file:
        pool.Add(file_proto)
    return pool


POOL: descriptor_pool.DescriptorPool = _load_pool(DESCRIPTORS_PATH)

_classes: dict[str, type[Message]] = {}


def message_class(full_name: str) -> type[Message]:
    """The protobuf class for a fully qualified message name from our protos.

    E.g. ``message_class("build.bazel.remote.execution.v2.Digest")``. Raises
    ``KeyError`` for unknown names. Classes are cached, so the same class object
    is returned on every call.
    """
    cls = _classes.get(full_name)
    if cls is None:
        descriptor = POOL.FindMessageTypeByName(full_name)
        cls = message_factory.GetMessageClass(descriptor)
        _classes[full_name] = cls
    return cls


# Typed as Any: the classes are built at run time, so static checkers cannot
# know their fields.
_Msg = _Any

# REAPI: CAS data model.
Digest: _Msg = message_class(_REAPI + "Digest")
Directory: _Msg = message_class(_REAPI + "Directory")
FileNode: _Msg = message_class(_REAPI + "FileNode")
DirectoryNode: _Msg = message_class(_REAPI + "DirectoryNode")
SymlinkNode: _Msg = message_class(_REAPI + "SymlinkNode")
NodeProperties: _Msg = message_class(_REAPI + "NodeProperties")
Tree: _Msg = message_class(_REAPI + "Tree")

# REAPI: actions and results.
Action: _Msg = message_class(_REAPI + "Action")
Command: _Msg = message_class(_REAPI + "Command")
Platform: _Msg = message_class(_REAPI + "Platform")
ActionResult: _Msg = message_class(_REAPI + "ActionResult")
OutputFile: _Msg = message_class(_REAPI + "OutputFile")
OutputDirectory: _Msg = message_class(_REAPI + "OutputDirectory")
OutputSymlink: _Msg = message_class(_REAPI + "OutputSymlink")
RequestMetadata: _Msg = message_class(_REAPI + "RequestMetadata")

# REAPI: RPC messages.
FindMissingBlobsRequest: _Msg = message_class(_REAPI + "FindMissingBlobsRequest")
FindMissingBlobsResponse: _Msg = message_class(_REAPI + "FindMissingBlobsResponse")
BatchUpdateBlobsRequest: _Msg = message_class(_REAPI + "BatchUpdateBlobsRequest")
BatchUpdateBlobsResponse: _Msg = message_class(_REAPI + "BatchUpdateBlobsResponse")
BatchReadBlobsRequest: _Msg = message_class(_REAPI + "BatchReadBlobsRequest")
BatchReadBlobsResponse: _Msg = message_class(_REAPI + "BatchReadBlobsResponse")
GetTreeRequest: _Msg = message_class(_REAPI + "GetTreeRequest")
GetTreeResponse: _Msg = message_class(_REAPI + "GetTreeResponse")
GetActionResultRequest: _Msg = message_class(_REAPI + "GetActionResultRequest")
UpdateActionResultRequest: _Msg = message_class(_REAPI + "UpdateActionResultRequest")
ExecuteRequest: _Msg = message_class(_REAPI + "ExecuteRequest")
ExecuteResponse: _Msg = message_class(_REAPI + "ExecuteResponse")
ExecuteOperationMetadata: _Msg = message_class(_REAPI + "ExecuteOperationMetadata")

# ByteStream.
ReadRequest: _Msg = message_class("google.bytestream.ReadRequest")
ReadResponse: _Msg = message_class("google.bytestream.ReadResponse")
WriteRequest: _Msg = message_class("google.bytestream.WriteRequest")
WriteResponse: _Msg = message_class("google.bytestream.WriteResponse")

# Long-running operations and rich errors.
Operation: _Msg = message_class("google.longrunning.Operation")
Status: _Msg = message_class("google.rpc.Status")
PreconditionFailure: _Msg = message_class("google.rpc.PreconditionFailure")
BadRequest: _Msg = message_class("google.rpc.BadRequest")

# Well-known types from our pool (they carry the usual helper methods).
Any: _Msg = message_class("google.protobuf.Any")
Timestamp: _Msg = message_class("google.protobuf.Timestamp")
Duration: _Msg = message_class("google.protobuf.Duration")
