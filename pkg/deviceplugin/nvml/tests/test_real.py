"""RealBackend over a fake pynvml: the same topology as the file, whatever the driver lacks."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest

from pkg.deviceplugin.nvml import fixtures
from pkg.deviceplugin.nvml.backend import Backend, NvmlError, XidEvent
from pkg.deviceplugin.nvml.real import RealBackend
from pkg.deviceplugin.types import Link, LinkKind, Topology

MakeFake = Callable[..., Any]


def backend(fake: Any, sysfs: Path) -> RealBackend:
    return RealBackend(fake.module(), sysfs_root=sysfs)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """An empty sysfs root, so no test reads the host's PCI devices."""
    return tmp_path / "sys"


def test_real_backend_satisfies_the_backend_protocol(make_fake: MakeFake, sysfs: Path) -> None:
    real: Backend = backend(make_fake("single-gpu"), sysfs)
    real.close()


@pytest.mark.parametrize("name", fixtures.FIXTURES)
def test_discovery_reproduces_every_fixture(make_fake: MakeFake, sysfs: Path, name: str) -> None:
    fake = make_fake(name)
    assert backend(fake, sysfs).discover() == fake.topo


@pytest.mark.parametrize("name", ["dgx-a100", "dgx1-v100", "nvlink-pairs-4", "nvswitch-16"])
def test_without_remote_device_type_a_non_gpu_far_end_counts_as_a_switch(
    make_fake: MakeFake, sysfs: Path, name: str
) -> None:
    fake = make_fake(name, missing={"nvmlDeviceGetNvLinkRemoteDeviceType"})
    assert backend(fake, sysfs).discover() == fake.topo


def test_an_old_pynvml_without_the_remote_type_function_still_discovers(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("dgx-h100")
    module = fake.module()
    del module.nvmlDeviceGetNvLinkRemoteDeviceType
    assert RealBackend(module, sysfs_root=sysfs).discover() == fake.topo


def test_gpus_without_nvlink_fall_back_to_the_pcie_common_ancestor(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("pcie-switch-pairs-8")
    topo = backend(fake, sysfs).discover()
    assert topo == fake.topo
    assert "nvmlDeviceGetNvLinkRemotePciInfo" not in fake.calls


def test_without_the_common_ancestor_numa_nodes_tell_node_from_sys(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("pcie-2numa-4", unsupported={"nvmlDeviceGetTopologyCommonAncestor"})
    topo = backend(fake, sysfs).discover()
    assert [topo.link(0, b).kind for b in (1, 2, 3)] == [LinkKind.NODE, LinkKind.SYS, LinkKind.SYS]


def test_numa_node_comes_from_sysfs_first(make_fake: MakeFake, tmp_path: Path) -> None:
    fake = make_fake("pcie-2numa-4", missing={"nvmlDeviceGetMemoryAffinity"})
    devices = tmp_path / "bus" / "pci" / "devices"
    for bus, node in [("0000:3b:00.0", "0"), ("0000:3e:00.0", "-1"), ("0000:b1:00.0", "1\n")]:
        (devices / bus).mkdir(parents=True)
        (devices / bus / "numa_node").write_text(node)
    topo = RealBackend(fake.module(), sysfs_root=tmp_path).discover()
    # 0000:ca:00.0 has no sysfs entry: unknown, not an error.
    assert [g.numa_node for g in topo.gpus] == [0, None, 1, None]


def test_on_grace_the_numa_node_is_the_cpu_side_one_not_the_gpus_own_memory(
    make_fake: MakeFake, tmp_path: Path
) -> None:
    # nvmlDeviceGetNumaNodeId is the GPU's own memory node where GPUs are NUMA nodes
    # (GH200/GB200: nodes 4 and up, no CPU in them); it was sent to the kubelet as the
    # device's NUMA affinity. The CPU side: sysfs, else NVML's nearest memory.
    fake = make_fake("pcie-2numa-4", gpu_memory_nodes={0: 4, 1: 5, 2: 6, 3: 7})
    cpu_side = [g.numa_node for g in fake.topo.gpus]
    assert cpu_side == [0, 0, 1, 1]
    assert [g.numa_node for g in backend(fake, tmp_path / "no-sysfs").discover().gpus] == cpu_side
    # sysfs first, where it answers (a node numbering of its own here, to tell them apart)
    devices = tmp_path / "bus" / "pci" / "devices"
    for gpu in fake.topo.gpus:
        domain, rest = gpu.pci_bus_id.split(":", 1)
        entry = devices / f"{int(domain, 16):04x}:{rest.lower()}"
        entry.mkdir(parents=True)
        (entry / "numa_node").write_text(f"{1 - (gpu.numa_node or 0)}\n")
    topo = RealBackend(fake.module(), sysfs_root=tmp_path).discover()
    assert [g.numa_node for g in topo.gpus] == [1, 1, 0, 0]
    assert "nvmlDeviceGetNumaNodeId" not in fake.calls


def test_an_nvml_numa_node_of_minus_one_means_unknown(make_fake: MakeFake, sysfs: Path) -> None:
    fake = make_fake("single-gpu")
    gpu = fake.topo.gpus[0]
    fake.topo = Topology((dataclasses.replace(gpu, numa_node=None),))
    assert backend(fake, sysfs).discover().gpus[0].numa_node is None


def test_old_pynvml_bytes_become_text(make_fake: MakeFake, sysfs: Path) -> None:
    fake = make_fake("dgx1-v100", as_bytes=True)
    assert backend(fake, sysfs).discover() == fake.topo


def test_a_lost_gpu_is_left_out_of_discovery_and_fails_its_probe_alone(
    make_fake: MakeFake, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # While one GPU is off the bus, NVML fails every lookup by UUID (the fake does as
    # nvml.h says): the others' probes must still pass.
    fake = make_fake("flaky-4", lost={2})
    real = backend(fake, sysfs)
    topo = real.discover()
    assert topo.indices == (0, 1, 3)
    assert "leaving GPU 2 out of discovery: NVML GPU 2 handle: GPU is lost" in caplog.text
    caplog.clear()
    real.discover()
    assert "leaving GPU" not in caplog.text  # logged when it changes, not every refresh
    probe = real.probe(fake.topo.gpu(2).uuid)
    # discovery never saw it (the topology cache brings such a GPU back at a restart)
    uuid = fake.topo.gpu(2).uuid
    assert (probe.ok, probe.reason) == (
        False,
        f"lookup: no GPU with UUID {uuid} answers; GPU 2 handle: GPU is lost",
    )
    assert all(real.probe(fake.topo.gpu(i).uuid).ok for i in (0, 1, 3))
    fake.lost.clear()
    assert real.probe(uuid).ok


def test_a_gpu_lost_after_discovery_fails_by_its_own_index_and_no_other(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("flaky-4")
    real = backend(fake, sysfs)
    real.discover()
    fake.lost.add(2)
    probes = [real.probe(gpu.uuid) for gpu in fake.topo.gpus]
    assert [p.ok for p in probes] == [True, True, False, True]
    assert probes[2].reason == "GPU 2 handle: GPU is lost"


def test_probing_an_unknown_uuid_reports_not_found(make_fake: MakeFake, sysfs: Path) -> None:
    probe = backend(make_fake("single-gpu"), sysfs).probe("GPU-nope")
    assert (probe.ok, probe.reason) == (False, "lookup: no GPU with UUID GPU-nope answers")


def test_nvml_that_cannot_start_is_one_readable_error_and_probes_fail_softly(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("single-gpu", init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    real = backend(fake, sysfs)
    with pytest.raises(NvmlError, match=r"^NVML init: Driver Not Loaded$"):
        real.discover()
    assert real.probe("GPU-x").reason == "init: Driver Not Loaded"


def test_any_nvml_error_becomes_an_nvml_error_naming_the_query(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("single-gpu", unsupported={"nvmlDeviceGetCount"})
    with pytest.raises(NvmlError, match=r"^NVML device count: Not Supported$"):
        backend(fake, sysfs).discover()


def test_nvml_is_initialized_once_and_shut_down_once(make_fake: MakeFake, sysfs: Path) -> None:
    fake = make_fake("dgx-a100")
    real = backend(fake, sysfs)
    threads = [threading.Thread(target=real.discover) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real.close()
    real.close()
    assert (fake.inits, fake.shutdowns) == (1, 1)
    with pytest.raises(NvmlError, match="closed"):
        real.discover()


def test_xid_events_are_reported_with_the_gpus_uuid(make_fake: MakeFake, sysfs: Path) -> None:
    fake = make_fake("flaky-4")
    real = backend(fake, sysfs)
    assert real.wait_xid_events(0.01) == []
    assert fake.registered == [0, 1, 2, 3]
    fake.push_xid(1, 79)
    fake.push_xid(3, 48)
    fake.push_xid(2, 0, event_type=pynvml.nvmlEventTypeSingleBitEccError)
    uuids = [g.uuid for g in fake.topo.gpus]
    # One wait drains the burst that is already queued.
    assert real.wait_xid_events(1.0) == [XidEvent(uuids[1], 79), XidEvent(uuids[3], 48)]
    assert fake.calls.count("nvmlEventSetCreate") == 1
    real.close()
    assert fake.freed == 1


def test_an_xid_from_a_lost_gpu_is_named_by_its_handle_or_by_nobody(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("flaky-4", lost={3})
    real = backend(fake, sysfs)
    real.discover()
    assert real.wait_xid_events(0.01) == []  # GPUs 0, 1, 2 registered; 3 does not answer
    fake.lost.add(2)
    fake.push_xid(2, 79)
    fake.push_xid(3, 48)
    # GPU 2 was registered: its handle names it; GPU 3's cannot: "" (never a made-up GPU)
    assert real.wait_xid_events(0.01) == [
        XidEvent(fake.topo.gpu(2).uuid, 79),
        XidEvent("", 48),
    ]


def test_a_gpu_lost_when_events_are_set_up_leaves_the_others_watched_until_it_answers(
    make_fake: MakeFake, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = make_fake("flaky-4", lost={2})
    real = backend(fake, sysfs)
    assert real.wait_xid_events(0.01) == []
    assert fake.registered == [0, 1, 3]
    assert caplog.text.count("XID events of GPU 2 are not watched until it answers") == 1
    fake.push_xid(1, 79)
    assert real.wait_xid_events(0.01) == [XidEvent(fake.topo.gpu(1).uuid, 79)]
    assert caplog.text.count("not watched") == 1  # logged when it changes, not every wait
    fake.lost.clear()
    real.wait_xid_events(0.01)
    assert fake.registered == [0, 1, 3, 2]
    assert "watching XID events of GPU 2 now that it answers" in caplog.text
    real.wait_xid_events(0.01)
    assert fake.registered == [0, 1, 3, 2]
    assert fake.calls.count("nvmlEventSetCreate") == 1


def test_a_node_whose_only_gpu_is_lost_keeps_trying_to_watch_it(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("single-gpu", lost={0})
    real = backend(fake, sysfs)
    assert real.wait_xid_events(0.01) == []
    assert real.wait_xid_events(0.01) == []
    assert (fake.registered, fake.freed) == ([], 0)
    fake.lost.clear()
    fake.push_xid(0, 48)
    assert real.wait_xid_events(0.01) == [XidEvent(fake.topo.gpu(0).uuid, 48)]
    real.close()
    assert fake.freed == 1


def test_a_wait_that_fails_is_reported_and_the_set_rebuilt_with_the_gpus_that_answer(
    make_fake: MakeFake, sysfs: Path
) -> None:
    # nvml.h: the wait returns GPU_IS_LOST once a GPU of the set fell off the bus. It was
    # logged and the same set waited on again, forever failing, marking nothing.
    fake = make_fake("flaky-4")
    real = backend(fake, sysfs)
    assert real.wait_xid_events(0.01) == []
    fake.lost.add(2)
    with pytest.raises(NvmlError, match="event wait: GPU is lost"):
        real.wait_xid_events(0.01)
    assert fake.freed == 1
    fake.push_xid(1, 48)
    assert real.wait_xid_events(0.01) == [XidEvent(fake.topo.gpu(1).uuid, 48)]
    assert fake.registered == [0, 1, 2, 3, 0, 1, 3]
    fake.lost.clear()
    assert real.wait_xid_events(0.01) == []
    assert fake.registered[-1] == 2  # watched again once it answers


def test_a_registration_that_leaves_the_set_undefined_rebuilds_it_without_that_gpu(
    make_fake: MakeFake, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nvml.h, nvmlDeviceRegisterEvents: NVML_ERROR_UNKNOWN, "set is in undefined
    # state". The set was kept and waited on.
    fake = make_fake("flaky-4", spoils_registration={1})
    real = backend(fake, sysfs)
    fake.push_xid(3, 48)
    assert real.wait_xid_events(0.01) == [XidEvent(fake.topo.gpu(3).uuid, 48)]
    assert (fake.freed, fake.registered) == (1, [0, 0, 2, 3])
    assert "registering GPU 1 for XID events left the event set undefined" in caplog.text
    assert real.wait_xid_events(0.01) == []
    assert fake.calls.count("nvmlEventSetCreate") == 2  # not rebuilt at every wait


def test_an_event_set_that_cannot_count_the_gpus_is_freed(make_fake: MakeFake, sysfs: Path) -> None:
    fake = make_fake("single-gpu")
    real = backend(fake, sysfs)
    real.discover()
    fake.unsupported.add("nvmlDeviceGetCount")
    with pytest.raises(NvmlError, match="device count"):
        real.wait_xid_events(0.01)
    assert fake.freed == 1


def test_without_event_support_waits_time_out_without_asking_nvml_again(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("dgx-a100", unsupported={"nvmlDeviceRegisterEvents"})
    real = backend(fake, sysfs)
    assert real.wait_xid_events(0.01) == []
    assert real.wait_xid_events(0.01) == []
    assert fake.calls.count("nvmlEventSetCreate") == 1
    assert fake.freed == 1
    assert "nvmlEventSetWait_v2" not in fake.calls


def test_close_wakes_a_waiter_on_a_node_without_events(make_fake: MakeFake, sysfs: Path) -> None:
    real = backend(make_fake("single-gpu", unsupported={"nvmlEventSetCreate"}), sysfs)
    real.wait_xid_events(0)
    done = threading.Event()

    def wait() -> None:
        real.wait_xid_events(30)
        done.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    real.close()
    assert done.wait(5)


def test_pairs_nvml_cannot_place_come_from_nvidia_smi_topo(
    make_fake: MakeFake, sysfs: Path
) -> None:
    from pkg.deviceplugin.nvml import smi

    fake = make_fake("pcie-2numa-4", unsupported={"nvmlDeviceGetTopologyCommonAncestor"})
    words = [[link.word for link in row] for row in fake.topo.matrix()]
    header = "\t" + "\t".join(f"GPU{i}" for i in range(4)) + "\tCPU Affinity\tNUMA Affinity"
    rows = [f"GPU{i}\t" + "\t".join(r) + "\t0-31\t0" for i, r in enumerate(words)]
    text = "\n".join([header, *rows, "", "Legend:", "  X    = Self"]) + "\n"
    calls: list[int] = []

    def from_smi() -> dict[tuple[int, int], Link]:
        calls.append(1)
        return smi.parse_topo_matrix(text)

    topo = RealBackend(fake.module(), sysfs_root=sysfs, smi_links=from_smi).discover()
    assert topo == fake.topo
    assert calls == [1]


def test_a_failing_nvidia_smi_leaves_the_numa_guess(make_fake: MakeFake, sysfs: Path) -> None:
    from pkg.deviceplugin.nvml.smi import SmiError

    fake = make_fake("pcie-2numa-4", unsupported={"nvmlDeviceGetTopologyCommonAncestor"})

    def broken() -> dict[tuple[int, int], Link]:
        raise SmiError("nvidia-smi: not found")

    topo = RealBackend(fake.module(), sysfs_root=sysfs, smi_links=broken).discover()
    for (a, b), link in topo.links.items():
        same = topo.gpu(a).numa_node == topo.gpu(b).numa_node
        assert link.kind is (LinkKind.NODE if same else LinkKind.SYS)


def smi_of(topo: Topology) -> Callable[[], dict[tuple[int, int], Link]]:
    """``nvidia-smi topo -m`` as it would print ``topo``, parsed."""
    from pkg.deviceplugin.nvml import smi

    n = len(topo.gpus)
    words = [[link.word for link in row] for row in topo.matrix()]
    header = "\t" + "\t".join(f"GPU{i}" for i in range(n)) + "\tCPU Affinity\tNUMA Affinity"
    rows = [f"GPU{i}\t" + "\t".join(r) + "\t0-31\t0" for i, r in enumerate(words)]
    text = "\n".join([header, *rows, "", "Legend:", "  X    = Self"]) + "\n"
    return lambda: smi.parse_topo_matrix(text)


def test_a_documented_unknown_error_of_the_common_ancestor_degrades_per_pair(
    make_fake: MakeFake, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nvml.h: NVML_ERROR_UNKNOWN "an error has occurred in underlying topology
    # discovery". It stopped discovery, and start-up, before nvidia-smi was tried.
    fake = make_fake(
        "pcie-2numa-4", failing={"nvmlDeviceGetTopologyCommonAncestor": pynvml.NVML_ERROR_UNKNOWN}
    )
    real = RealBackend(fake.module(), sysfs_root=sysfs, smi_links=smi_of(fake.topo))
    assert real.discover() == fake.topo
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "GPUs 0 and 1 common ancestor: Unknown Error" in warned[0]
    caplog.clear()
    real.discover()
    assert not caplog.records  # the same trouble is not news
    alone = RealBackend(fake.module(), sysfs_root=sysfs).discover()  # no nvidia-smi either
    assert alone.indices == (0, 1, 2, 3)
    assert alone.link(0, 2).kind is LinkKind.SYS


@pytest.mark.parametrize(
    ("knobs", "problem"),
    [
        ({"failing": {"nvmlDeviceGetNvLinkRemotePciInfo": pynvml.NVML_ERROR_UNKNOWN}}, "Unknown"),
        ({"remote_bus": "not a bus id"}, "not a bus id"),
        ({"remote_bus": "00000000:00:00.0"}, "is no GPU here"),
    ],
    ids=["unknown-error", "unparseable", "vm-bus-id"],
)
def test_an_nvlink_whose_far_end_nvml_cannot_name_takes_nvidia_smi_for_its_pairs(
    make_fake: MakeFake,
    sysfs: Path,
    caplog: pytest.LogCaptureFixture,
    knobs: dict[str, Any],
    problem: str,
) -> None:
    # Before: the first two stopped discovery; the third (a VM, NCCL issue 1182) made
    # every NVLink pair PCIe, silently.
    fake = make_fake("nvlink-pairs-4", **knobs)
    assert fake.topo.link(0, 1).kind is LinkKind.NVLINK
    real = RealBackend(fake.module(), sysfs_root=sysfs, smi_links=smi_of(fake.topo))
    assert real.discover() == fake.topo
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and problem in warned[0] and "far end" in warned[0]


def test_a_probe_carries_the_drivers_recovery_action_where_it_has_one(
    make_fake: MakeFake, sysfs: Path
) -> None:
    fake = make_fake("flaky-4", recovery_actions={1: pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET})
    real = backend(fake, sysfs)
    real.discover()
    assert real.probe(fake.topo.gpu(1).uuid).recovery_action == 1
    assert real.probe(fake.topo.gpu(0).uuid).recovery_action is None  # Not Supported
    fake.missing.add("nvmlDeviceGetFieldValues")
    probe = real.probe(fake.topo.gpu(1).uuid)
    assert (probe.ok, probe.recovery_action) == (True, None)


def test_a_mig_enabled_gpu_is_set_aside_with_its_reason_and_one_warning(
    make_fake: MakeFake, sysfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its memory info needs a privilege the DaemonSet may lack (NVIDIA's plugin issue
    # 399): it was left out as "failing" and probed forever; nothing read the MIG mode,
    # so with the privilege it was served whole.
    fake = make_fake("dgx-a100", mig_modes={i: (0, 0) for i in range(8)} | {3: (1, 1), 5: (0, 1)})
    real = backend(fake, sysfs)
    topo = real.discover()
    assert topo.indices == (0, 1, 2, 4, 5, 6, 7)  # 5: MIG only pending, a whole GPU until reset
    [aside] = topo.set_aside
    assert (aside.index, aside.uuid) == (3, fake.topo.gpu(3).uuid)
    assert aside.why.startswith("MIG is enabled") and "nvidia-smi -i 3 -mig 0" in aside.why
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"GPU 3 ({aside.uuid}) is not served: {aside.why}"]
    caplog.clear()
    fake.mig_monitor = True  # with NVIDIA_MIG_MONITOR_DEVICES=all: still set aside
    assert real.discover().set_aside == (aside,)
    assert not caplog.records
