"""A memoizing gRPC proxy on grpcio (C core): the cheapest server Bazel's client can talk to here.

Usage: python bench/_memo_server.py PORT UPSTREAM_HOST:PORT

Every call is forwarded to UPSTREAM (reexecd) as raw bytes the first time its (method,
request bytes) is seen; the answer is kept and later identical requests are answered from
memory, without parsing anything. After one warm-up build, a fresh-output-base rebuild that
sends the same GetCapabilities, GetActionResult and ByteStream Read requests is served by
grpcio's C core with a trivial Python handler: a reference for what Bazel's own client costs
against a near-free server. Only unary-unary and unary-stream methods are memoized (the
ones a cache-hit rebuild uses); ByteStream Write, a client stream, is forwarded.
Each forwarded call prints "miss METHOD" on stdout, so the caller can check a rebuild had none.
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

UNARY_STREAM = {
    "/google.bytestream.ByteStream/Read",
    "/build.bazel.remote.execution.v2.Execution/Execute",
    "/build.bazel.remote.execution.v2.Execution/WaitExecution",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
}
STREAM_UNARY = {"/google.bytestream.ByteStream/Write"}


class Memo(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.Channel) -> None:
        self.upstream = upstream
        self.memo: dict[tuple[str, bytes], object] = {}

    def _miss(self, method: str) -> None:
        print(f"miss {method}", flush=True)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method in STREAM_UNARY:
            forward_su = self.upstream.stream_unary(method)

            def su(requests, context):  # type: ignore[no-untyped-def]
                self._miss(method)
                return forward_su(requests)

            return grpc.stream_unary_rpc_method_handler(su)
        if method in UNARY_STREAM:
            forward_us = self.upstream.unary_stream(method)

            def us(request: bytes, context):  # type: ignore[no-untyped-def]
                key = (method, request)
                answer = self.memo.get(key)
                if answer is None:
                    self._miss(method)
                    answer = list(forward_us(request))
                    self.memo[key] = answer
                return iter(answer)  # type: ignore[call-overload]

            return grpc.unary_stream_rpc_method_handler(us)
        forward_uu = self.upstream.unary_unary(method)

        def uu(request: bytes, context):  # type: ignore[no-untyped-def]
            key = (method, request)
            answer = self.memo.get(key)
            if answer is None:
                self._miss(method)
                try:
                    answer = forward_uu(request)
                except grpc.RpcError as e:  # e.g. NOT_FOUND from GetActionResult: not kept
                    context.abort(e.code(), e.details())
                self.memo[key] = answer
            return answer

        return grpc.unary_unary_rpc_method_handler(uu)


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    channel = grpc.insecure_channel(upstream)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[Memo(channel)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
