"""The baseline: a bare grpcio unary echo on a Unix socket, nothing of the plugin in it.

Run as ``python -m bench.echo SOCKET WORKERS``: it serves the generated
``DevicePlugin`` service's ``GetDevicePluginOptions`` (a constant reply, like an echo)
with a thread pool of WORKERS (the benchmark passes the plugin's own server pool size),
prints ``ready`` and serves until SIGTERM.
Its resident memory is the baseline of the plugin's.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc


class Echo(api_pb2_grpc.DevicePluginServicer):
    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo only")

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo only")

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "echo only")

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


def main(argv: list[str]) -> int:
    socket_path, workers = argv[0], int(argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    api_pb2_grpc.add_DevicePluginServicer_to_server(Echo(), server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
