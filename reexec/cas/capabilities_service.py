"""Capabilities service: what this server supports, per instance name."""

from __future__ import annotations

from collections.abc import Sequence

from reexec import fastpb
from reexec.cas.digest import SUPPORTED_FUNCTIONS, DigestFunction
from reexec.gen.build.bazel import semver
from reexec.gen.build.bazel.remote.execution import v2 as re
from reexec.rpc import Cardinality, Service, Stream, check_instance

# Bazel 4.2.3 only speaks 2.0 and refuses a server whose low version is above it.
LOW_API_VERSION = semver.SemVer(major=2, minor=0)
# The newest spec whose fields we implement (digest_function fields, output_paths, compressors).
HIGH_API_VERSION = semver.SemVer(major=2, minor=3)


class CapabilitiesService(Service):
    SERVICE = "build.bazel.remote.execution.v2.Capabilities"

    def __init__(
        self,
        *,
        instances: Sequence[str] = (),
        max_batch_total_size_bytes: int,
        exec_enabled: bool,
        ac_update_enabled: bool = True,
        symlink_absolute_paths: bool = False,
        supported_node_properties: Sequence[str] = (),
    ) -> None:
        self.instances = tuple(instances)
        functions = [re.DigestFunctionValue(int(f)) for f in SUPPORTED_FUNCTIONS]
        compressors = [re.CompressorValue.IDENTITY, re.CompressorValue.ZSTD]
        strategy = (
            re.SymlinkAbsolutePathStrategyValue.ALLOWED
            if symlink_absolute_paths
            else re.SymlinkAbsolutePathStrategyValue.DISALLOWED
        )
        self.capabilities = re.ServerCapabilities(
            cache_capabilities=re.CacheCapabilities(
                digest_functions=functions,
                action_cache_update_capabilities=re.ActionCacheUpdateCapabilities(
                    update_enabled=ac_update_enabled
                ),
                max_batch_total_size_bytes=max_batch_total_size_bytes,
                symlink_absolute_path_strategy=strategy,
                supported_compressors=compressors,
                supported_batch_update_compressors=compressors,
            ),
            execution_capabilities=re.ExecutionCapabilities(
                # The deprecated single field; old clients (Bazel 4) read only this one.
                digest_function=re.DigestFunctionValue(int(DigestFunction.SHA256)),
                exec_enabled=exec_enabled,
                execution_priority_capabilities=re.PriorityCapabilities(
                    priorities=[
                        re.PriorityCapabilitiesPriorityRange(
                            min_priority=-(2**31), max_priority=2**31 - 1
                        )
                    ]
                )
                if exec_enabled
                else None,
                supported_node_properties=list(supported_node_properties),
                digest_functions=functions if exec_enabled else [],
            ),
            low_api_version=LOW_API_VERSION,
            high_api_version=HIGH_API_VERSION,
        )
        self._encoded = fastpb.message_class(
            "build.bazel.remote.execution.v2.ServerCapabilities"
        ).FromString(bytes(self.capabilities))

    def rpcs(self):  # type: ignore[no-untyped-def]
        return {
            "GetCapabilities": (
                self._get_capabilities_aio,
                Cardinality.UNARY_UNARY,
                fastpb.message_class("build.bazel.remote.execution.v2.GetCapabilitiesRequest"),
                fastpb.message_class("build.bazel.remote.execution.v2.ServerCapabilities"),
            )
        }

    async def get_capabilities(
        self, request: re.GetCapabilitiesRequest, stream: Stream | None = None
    ) -> re.ServerCapabilities:
        check_instance(self.instances, request.instance_name)
        return self.capabilities

    async def _get_capabilities_aio(self, stream: Stream) -> None:
        # Answered on grpclib's side with a message encoded once: no Trio crossing and no
        # per-call betterproto2 encoding (together half of this RPC's cost).
        request = await stream.recv_message()
        check_instance(self.instances, request.instance_name)
        await stream.send_message(self._encoded)
