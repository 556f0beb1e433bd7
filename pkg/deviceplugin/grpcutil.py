"""Small gRPC helpers shared by the servers, the clients and the kubelet simulator."""

from __future__ import annotations

from pathlib import Path

import grpc


def unix_target(path: Path) -> str:
    return f"unix://{path.absolute()}"


def rpc_detail(exc: grpc.RpcError) -> str:
    """What a failed call's peer said (its status details), else the error itself."""
    return str(exc.details()) if isinstance(exc, grpc.Call) else str(exc)
