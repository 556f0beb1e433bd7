"""RealBackend on a real GPU and driver (``pytest -m gpu``); skipped where there is none."""

from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

from pkg.deviceplugin.nvml.real import RealBackend
from pkg.deviceplugin.nvml.topofile import normalize_pci_bus_id

pytestmark = pytest.mark.gpu


@pytest.fixture
def real() -> RealBackend:
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no usable NVIDIA driver here: {exc}")
    if count == 0:
        pytest.skip("the NVIDIA driver sees no GPU here")
    return RealBackend(pynvml)


def test_real_gpus_are_discovered_with_their_identity_and_links(real: RealBackend) -> None:
    topo = real.discover()
    assert topo.indices == tuple(range(len(topo.gpus)))
    for gpu in topo.gpus:
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.memory_mib > 1024
        assert normalize_pci_bus_id(gpu.pci_bus_id) == gpu.pci_bus_id
        assert Path(gpu.device_path).exists() or not Path("/dev/nvidiactl").exists()
        assert real.probe(gpu.uuid).ok
    assert len(topo.links) == len(topo.gpus) * (len(topo.gpus) - 1) // 2
    real.close()


def test_xid_waits_on_a_real_driver_time_out_quietly(real: RealBackend) -> None:
    assert real.wait_xid_events(0.2) == []
    real.close()
