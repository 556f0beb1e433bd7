"""The PodResources client against a stand-in kubelet on a real Unix socket."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pkg.deviceplugin.allocator.ledger import Holder
from pkg.deviceplugin.allocator.tests.support import R1, R2
from pkg.deviceplugin.grpcutil import rpc_detail, unix_target
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.server.tests.support import (
    PodResourcesServer,
    pod,
    short_root,
    wait_until,
)
from pkg.deviceplugin.types import DeviceId

LOGGER = "pkg.deviceplugin.server.podresources"


@pytest.fixture
def kubelet() -> Iterator[PodResourcesServer]:
    with short_root() as root:
        server = PodResourcesServer(root / "kubelet.sock").start()
        yield server
        server.stop()


@pytest.fixture
def client(kubelet: PodResourcesServer) -> Iterator[PodResourcesClient]:
    made = PodResourcesClient(kubelet.path, timeout_s=0.5)
    yield made
    made.close()


def test_observe_maps_every_kyb_seat_to_the_container_holding_it_and_skips_other_resources(
    kubelet: PodResourcesServer, client: PodResourcesClient
) -> None:
    kubelet.fake.pods = [
        pod(
            "ml",
            "trainer",
            {
                "main": {R1: ["G0-s0", "G1-s2"], "nvidia.com/gpu": ["GPU-1234"]},
                "sidecar": {R2: ["G01-s1"]},
            },
        ),
        pod(
            "web",
            "frontend",
            {"app": {"kyb.ai/gpu-3x-seat": ["G0-s1"], "kyb.ai/gpu-1x-seat-old": ["G0-s2"]}},
        ),
        pod("idle", "nothing", {"app": {}}),
    ]
    assert client.observe() == {
        (R1, DeviceId("G0-s0")): Holder("ml", "trainer", "main"),
        (R1, DeviceId("G1-s2")): Holder("ml", "trainer", "main"),
        (R2, DeviceId("G01-s1")): Holder("ml", "trainer", "sidecar"),
    }


def test_a_node_without_pods_is_an_empty_answer_not_a_missing_one(
    client: PodResourcesClient,
) -> None:
    # None would mean "the kubelet did not answer": keep the bindings; {} is evidence
    assert client.observe() == {}


def test_observe_is_none_when_nothing_serves_the_socket() -> None:
    with short_root() as root:
        absent = PodResourcesClient(root / "kubelet.sock", timeout_s=0.5)
        try:
            assert absent.observe() is None
        finally:
            absent.close()


def test_observe_is_none_when_the_kubelet_answers_an_error(
    kubelet: PodResourcesServer, client: PodResourcesClient
) -> None:
    kubelet.fake.pods = [pod("ml", "trainer", {"main": {R1: ["G0-s0"]}})]
    kubelet.fake.error = (grpc.StatusCode.INTERNAL, "kubelet is restarting")
    assert client.observe() is None


def test_observe_gives_up_after_its_timeout(
    kubelet: PodResourcesServer, client: PodResourcesClient
) -> None:
    kubelet.fake.delay_s = 1.5
    started = time.monotonic()
    assert client.observe() is None
    assert time.monotonic() - started < 1.0


def test_a_kubelet_that_stops_answering_and_comes_back_is_logged_once_each_way(
    kubelet: PodResourcesServer, client: PodResourcesClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert client.observe() == {}
    kubelet.fake.error = (grpc.StatusCode.UNAVAILABLE, "kubelet is restarting")
    assert client.observe() is None
    assert client.observe() is None
    kubelet.fake.error = None
    assert client.observe() == {}
    assert client.observe() == {}
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert [level for level, _ in lines] == [logging.INFO, logging.WARNING, logging.INFO]
    assert "answers" in lines[0][1]
    # the peer's own words, not the whole RpcError repr
    assert "(kubelet is restarting)" in lines[1][1]
    assert "keeping the last known bindings" in lines[1][1]


def test_the_same_client_answers_again_after_a_kubelet_restart(
    kubelet: PodResourcesServer, client: PodResourcesClient
) -> None:
    assert client.observe() == {}
    kubelet.stop()  # the socket goes too, as when the kubelet restarts
    assert client.observe() is None
    kubelet.fake.pods = [pod("ml", "trainer", {"main": {R1: ["G2-s0"]}})]
    kubelet.start()
    assert wait_until(lambda: client.observe() is not None, timeout_s=3.0)
    assert client.observe() == {(R1, DeviceId("G2-s0")): Holder("ml", "trainer", "main")}


def test_a_relative_socket_path_is_dialled_as_an_absolute_one() -> None:
    assert unix_target(Path("run/kubelet.sock")) == f"unix://{os.getcwd()}/run/kubelet.sock"
    assert unix_target(Path("/var/lib/kubelet.sock")) == "unix:///var/lib/kubelet.sock"


def test_an_error_that_is_not_a_call_is_described_by_itself() -> None:
    assert rpc_detail(grpc.RpcError("channel closed")) == "channel closed"
