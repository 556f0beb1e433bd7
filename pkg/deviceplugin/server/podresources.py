"""Client of the kubelet's PodResources ``List``: who holds which seat right now."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from pkg.deviceplugin.allocator.ledger import Holder, SeatKey
from pkg.deviceplugin.api.podresources.v1 import api_pb2, api_pb2_grpc
from pkg.deviceplugin.grpcutil import rpc_detail, unix_target
from pkg.deviceplugin.types import RESOURCE_PATTERN, DeviceId, ResourceName

log = logging.getLogger(__name__)

# Reconnect quickly after a kubelet restart; the default backoff grows to minutes.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class PodResourcesClient:
    def __init__(self, socket_path: Path, timeout_s: float = 0.5) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(unix_target(socket_path), options=CHANNEL_OPTIONS)
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        self._answering: bool | None = None
        self._lock = threading.Lock()

    def observe(self) -> dict[SeatKey, Holder] | None:
        """Every kyb seat some container holds, or None when the kubelet does not answer."""
        try:
            reply = self._stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            self._note(False, exc)
            return None
        self._note(True, None)
        held: dict[SeatKey, Holder] = {}
        for pod in reply.pod_resources:
            for container in pod.containers:
                holder = Holder(pod.namespace, pod.name, container.name)
                for devices in container.devices:
                    if RESOURCE_PATTERN.match(devices.resource_name) is None:
                        continue
                    for device_id in devices.device_ids:
                        held[(ResourceName(devices.resource_name), DeviceId(device_id))] = holder
        return held

    def _note(self, answering: bool, exc: grpc.RpcError | None) -> None:
        with self._lock:
            if answering == self._answering:
                return
            self._answering = answering
        if answering:
            log.info("PodResources at %s answers", self.socket_path)
        else:
            log.warning(
                "PodResources at %s does not answer (%s); keeping the last known bindings",
                self.socket_path,
                rpc_detail(exc) if exc is not None else None,
            )

    def close(self) -> None:
        self._channel.close()
