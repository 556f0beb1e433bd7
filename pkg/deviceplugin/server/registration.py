"""Registering one profile's socket with the kubelet."""

from __future__ import annotations

from pathlib import Path

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.grpcutil import rpc_detail, unix_target
from pkg.deviceplugin.server.plugin import plugin_options
from pkg.deviceplugin.types import ResourceName

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
# The kubelet dials the plugin back inside Register and gives that up to 10 s itself.
TIMEOUT_S = 10.0


class RegistrationError(Exception):
    pass


def register(
    kubelet_socket: Path, resource: ResourceName, endpoint: str, timeout_s: float = TIMEOUT_S
) -> None:
    """One Register call; the plugin's socket must already be serving."""
    try:
        with grpc.insecure_channel(unix_target(kubelet_socket)) as channel:
            api_pb2_grpc.RegistrationStub(channel).Register(
                api_pb2.RegisterRequest(
                    version=API_VERSION,
                    endpoint=endpoint,
                    resource_name=resource,
                    options=plugin_options(),
                ),
                timeout=timeout_s,
            )
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
        raise RegistrationError(f"{code}: {rpc_detail(exc)}") from exc
