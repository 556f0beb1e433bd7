"""Liveness: a plugin is alive when every profile's socket answers a gRPC call in time.

A wedged process (deadlocked board, exhausted worker pool, lost socket) fails this,
which a mere "process exists" check would not notice.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.grpcutil import unix_target
from pkg.deviceplugin.types import ResourceName, socket_name_of


def check(
    kubelet_dir: Path, resources: Iterable[ResourceName], timeout_s: float = 2.0
) -> list[str]:
    """One line per profile that does not answer; empty when all do."""
    problems: list[str] = []
    for resource in resources:
        path = kubelet_dir / socket_name_of(resource)
        if not path.exists():
            problems.append(f"{resource}: socket {path} does not exist")
            continue
        try:
            with grpc.insecure_channel(unix_target(path)) as channel:
                api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                    api_pb2.Empty(), timeout=timeout_s
                )
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
            problems.append(f"{resource}: {path} does not answer ({code})")
    return problems
