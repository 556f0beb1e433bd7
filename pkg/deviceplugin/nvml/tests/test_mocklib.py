"""RealBackend through the real pynvml over the C mock library agrees with MockBackend."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pynvml
import pytest

from pkg.deviceplugin.nvml import fixtures, mocklib
from pkg.deviceplugin.nvml.backend import NvmlError, XidEvent
from pkg.deviceplugin.nvml.mock import MockBackend
from pkg.deviceplugin.nvml.real import RealBackend
from pkg.deviceplugin.nvml.topofile import load_topology_file

Serve = Callable[..., RealBackend]

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) here")


@pytest.fixture(scope="module")
def mock_nvml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    lib = mocklib.build(tmp_path_factory.mktemp("mocklib"))
    saved = pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache)
    mocklib.install(pynvml, lib)
    yield
    pynvml.nvmlLib = saved[0]
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml._nvmlGetFunctionPointer_cache.update(saved[1])


@pytest.fixture
def serve(
    mock_nvml: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., RealBackend]]:
    """serve(name, time_scale) -> a RealBackend over the C mock serving that fixture."""
    opened: list[RealBackend] = []

    def start(name: str, time_scale: float = 1.0) -> RealBackend:
        data = mocklib.write_data(
            load_topology_file(fixtures.resolve(name)), tmp_path / "nvml-mock.txt", time_scale
        )
        monkeypatch.setenv(mocklib.ENV_VAR, str(data))
        backend = RealBackend(pynvml, sysfs_root=tmp_path / "no-sysfs")
        opened.append(backend)
        return backend

    yield start
    for backend in opened:
        backend.close()


@pytest.mark.parametrize("name", fixtures.FIXTURES)
def test_real_backend_over_the_c_mock_discovers_what_mock_backend_does(
    serve: Serve, name: str
) -> None:
    real = serve(name)
    assert real.discover() == MockBackend.from_name_or_path(name).discover()


def test_probes_through_the_c_mock_pass_for_known_gpus_and_name_the_error_otherwise(
    serve: Serve,
) -> None:
    real = serve("dgx-a100")
    uuid = real.discover().gpu(3).uuid
    assert real.probe(uuid).ok
    probe = real.probe("GPU-00000000-0000-0000-0000-000000000000")
    assert (probe.ok, probe.reason) == (
        False,
        "lookup: no GPU with UUID GPU-00000000-0000-0000-0000-000000000000 answers",
    )
    assert pynvml.nvmlSystemGetDriverVersion().endswith("kyb-mock")


def test_scripted_faults_play_out_through_nvml_as_in_the_mock_backend(serve: Serve) -> None:
    # time_scale 0.2: GPU 2 is lost from 0.2 s to 0.6 s, XID 79 on GPU 1 at 0.3 s.
    real = serve("flaky-4", time_scale=0.2)
    before = real.discover()
    assert before.indices == (0, 1, 2, 3)
    # nvml.h: the wait fails with GPU_IS_LOST once a GPU of the set is off the bus; the
    # next wait rebuilds the set with the GPUs that answer and goes on
    with pytest.raises(NvmlError, match="GPU is lost"):
        real.wait_xid_events(2.0)
    assert real.wait_xid_events(2.0) == [XidEvent(before.gpu(1).uuid, 79)]
    during = real.discover()
    assert during.indices == (0, 1, 3)
    assert not real.probe(before.gpu(2).uuid).ok
    # NVML fails every lookup by UUID while one GPU is lost; the others stay healthy
    assert all(real.probe(before.gpu(i).uuid).ok for i in (0, 1, 3))
    assert real.wait_xid_events(0.05) == []
    time.sleep(0.6)
    assert real.discover() == before


def test_nvml_init_without_a_topology_file_is_one_readable_error(
    mock_nvml: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(mocklib.ENV_VAR, raising=False)
    with pytest.raises(NvmlError, match=r"^NVML init: Unknown Error$"):
        RealBackend(pynvml).discover()


def test_an_xid_from_a_gpu_that_just_fell_off_the_bus_names_it_by_its_handle(
    serve: Serve, tmp_path: Path
) -> None:
    # NVML delivers the event, but the lost GPU answers no UUID query: the handle it was
    # registered with (a ctypes pointer, a new object per call) still says which it is.
    source = tmp_path / "two.yaml"
    source.write_text(
        "version: v1\ngpus:\n"
        + "".join(
            f"  - {{index: {i}, uuid: GPU-{i}0000000-0000-0000-0000-000000000000, "
            f'name: Tesla T4, memoryMiB: 15360, pciBusId: "00000000:0{i}:00.0", minor: {i}, '
            "numaNode: 0}\n"
            for i in range(2)
        )
        + "links:\n  - [X, PHB]\n  - [PHB, X]\n"
        + "faults:\n  - {gpu: 1, at: 0.3, kind: xid, xid: 79}\n  - {gpu: 1, at: 0.3, kind: lost}\n"
    )
    real = serve(str(source))
    assert real.discover().indices == (0, 1)
    assert real.wait_xid_events(0.05) == []  # registers both GPUs
    assert real.wait_xid_events(3.0) == [XidEvent("GPU-10000000-0000-0000-0000-000000000000", 79)]
    # the wait failed right after that event: said by the next call, not lost
    with pytest.raises(NvmlError, match="GPU is lost"):
        real.wait_xid_events(0.05)
    assert real.wait_xid_events(0.05) == []  # a new set, GPU 0 alone


def test_documented_unknown_errors_of_topology_queries_do_not_stop_discovery(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = serve("dgx1-v100")
    data = tmp_path / "nvml-mock.txt"  # read at nvmlInit, the first discovery's
    lines = data.read_text().splitlines()
    unknown_level = next(i for i, line in enumerate(lines) if line.startswith("level 0 7 "))
    lines[unknown_level] = " ".join([*lines[unknown_level].split()[:3], "unknown"])
    unknown_port = next(i for i, line in enumerate(lines) if line.startswith("port 0 "))
    lines[unknown_port] = " ".join([*lines[unknown_port].split()[:3], "unknown"])
    data.write_text("\n".join(lines) + "\n")
    topo = real.discover()
    assert topo.indices == tuple(range(8))
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "common ancestor: Unknown Error" in warned
    assert "NVLink 0: far end unknown" in warned


def test_the_recovery_action_field_reads_what_the_last_xid_scripted(
    serve: Serve, tmp_path: Path
) -> None:
    source = tmp_path / "one.yaml"
    source.write_text(
        "version: v1\ngpus:\n"
        "  - {index: 0, uuid: GPU-00000000-0000-0000-0000-000000000000, name: Tesla T4, "
        'memoryMiB: 15360, pciBusId: "00000000:01:00.0", minor: 0, numaNode: 0}\n'
        "links:\n  - [X]\n"
        "faults:\n  - {gpu: 0, at: 0.2, kind: xid, xid: 79, recoveryAction: gpuReset}\n"
    )
    real = serve(str(source))
    uuid = real.discover().gpu(0).uuid
    assert real.probe(uuid).recovery_action is None  # no XID yet: Not Supported
    assert real.wait_xid_events(2.0) == [XidEvent(uuid, 79)]
    assert real.probe(uuid).recovery_action == 1


def test_a_mig_enabled_gpu_is_set_aside_through_the_c_mock(serve: Serve, tmp_path: Path) -> None:
    real = serve("dgx-a100")
    data = tmp_path / "nvml-mock.txt"  # read at nvmlInit, the first discovery's
    data.write_text(data.read_text() + "mig 3 1 1\nmig 5 0 1\n")
    topo = real.discover()
    assert topo.indices == (0, 1, 2, 4, 5, 6, 7)
    assert [g.index for g in topo.set_aside] == [3]
    assert "MIG is enabled" in topo.set_aside[0].why
