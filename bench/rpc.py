"""Timing gRPC calls: interleaved latency samples and concurrent-client throughput."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

Call = Callable[[int], None]
"""One timed call; the argument is the call's index (fresh seats pick by it)."""


def interleaved(
    calls: Mapping[str, Call], *, rounds: int, per_round: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per call, for each named call, taken in alternating blocks.

    Alternating blocks of ``per_round`` calls spread the machine's background noise
    (other tenants, other tests) evenly over every call measured together, so the
    ratios between them hold even when the absolute numbers wander.
    """
    index = dict.fromkeys(calls, 0)
    for name, call in calls.items():
        for _ in range(warmup):
            call(index[name])
            index[name] += 1
    samples: dict[str, list[float]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, call in calls.items():
            out = samples[name]
            i = index[name]
            for j in range(i, i + per_round):
                start = clock()
                call(j)
                out.append((clock() - start) / 1e6)
            index[name] = i + per_round
    return samples


def echo_call(stub: api_pb2_grpc.DevicePluginStub) -> Call:
    empty = api_pb2.Empty()

    def call(_: int) -> None:
        stub.GetDevicePluginOptions(empty, timeout=10)

    return call


def allocate_request(device_ids: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=device_ids)]
    )


def preferred_request(available: list[str], size: int) -> api_pb2.PreferredAllocationRequest:
    return api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=size
            )
        ]
    )


@dataclass
class Throughput:
    calls: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s else 0.0


Work = Callable[[api_pb2_grpc.DevicePluginStub, int], None]


def concurrent_clients(
    target: str,
    work: Work,
    clients: int,
    *,
    duration_s: float | None = None,
    jobs: int | None = None,
) -> Throughput:
    """``clients`` threads, each on its own connection, calling ``work`` until the time
    is up (``duration_s``) or the ``jobs`` (indices 0..jobs-1, shared) are done."""
    if (duration_s is None) == (jobs is None):
        raise ValueError("give exactly one of duration_s and jobs")
    result = Throughput()
    lock = threading.Lock()
    counter: Iterator[int] = itertools.count()
    clock = [0.0, 0.0]  # started, deadline

    def go() -> None:  # run by the last thread to arrive, before any is released
        clock[0] = time.perf_counter()
        clock[1] = clock[0] + (duration_s or 0.0)

    barrier = threading.Barrier(clients, action=go)

    def next_job() -> int | None:
        with lock:
            job = next(counter)
        if jobs is not None:
            return job if job < jobs else None
        return job if time.perf_counter() < clock[1] else None

    def client() -> None:
        # A local subchannel pool: one connection per client, as separate callers have.
        channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = api_pb2_grpc.DevicePluginStub(channel)
        calls = errors = 0
        messages: list[str] = []
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=10)  # warm the connection
            barrier.wait(timeout=30)
            while (job := next_job()) is not None:
                try:
                    work(stub, job)
                    calls += 1
                except Exception as exc:  # every failure counts, whatever it is
                    errors += 1
                    if len(messages) < 3:
                        messages.append(f"{type(exc).__name__}: {_detail(exc)}")
        finally:
            channel.close()
            with lock:
                result.calls += calls
                result.errors += errors
                result.messages.extend(messages)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed_s = time.perf_counter() - clock[0]
    return result


def _detail(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name} {exc.details()}"
    return str(exc)
