"""What ``plan`` and ``status`` show: the SPEC section 9 documents and their tables."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pkg.deviceplugin import report
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.document import SeatDoc, StatusDoc
from pkg.deviceplugin.allocator.durable import settle
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import R1, R2, four_gpus_in_nvlink_pairs, seed_layout
from pkg.deviceplugin.config import loader
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.types import DeviceId, Gpu, GroupName, SetAsideGpu, Topology

R4 = "kyb.ai/gpu-4x-seat"
TOPOLOGY = four_gpus_in_nvlink_pairs()


def config(text: str) -> Config:
    return loader.load_text(text, "config.yaml")


def seats_of(doc: StatusDoc) -> list[SeatDoc]:
    return [
        seat
        for body in doc["resources"].values()
        for group in body["groups"].values()
        for seat in group["seats"].values()
    ]


# ---- plan ------------------------------------------------------------------------------


def test_a_plan_offers_every_seat_of_every_profile_free_at_generation_0() -> None:
    doc = report.plan_document(
        config(
            "profiles:\n"
            "  - {resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 4}\n"
            "  - {resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 3}\n"
        ),
        TOPOLOGY,
    )
    assert set(doc["resources"]) == {R1, R2}
    assert set(doc["resources"][R2]["groups"]) == {"G01", "G23"}
    assert len(doc["resources"][R1]["groups"]) == 4
    # a plan overlaps 1x and 2x groups on the same GPUs, yet nothing is fenced
    assert len(seats_of(doc)) == 4 * 4 + 2 * 3
    assert all(seat == {"state": "free", "generation": 0} for seat in seats_of(doc))
    assert doc["resources"][R2]["groups"]["G01"]["gpus"] == [0, 1]
    assert "setAsideGpus" not in doc


def test_a_plan_shows_the_groups_the_config_drains_by_name_and_by_gpu() -> None:
    doc = report.plan_document(
        config(
            "profiles:\n"
            "  - {resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 4}\n"
            "  - {resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 3}\n"
            "drain: [G01]\n"
            "drainGpus: [3]\n"
        ),
        TOPOLOGY,
    )
    drained = {
        (resource, name)
        for resource, body in doc["resources"].items()
        for name, group in body["groups"].items()
        if group["drained"]
    }
    assert drained == {(R2, "G01"), (R1, "G3"), (R2, "G23")}
    seats = doc["resources"][R2]["groups"]["G23"]["seats"]
    assert {seat["state"] for seat in seats.values()} == {"drained"}
    assert all(
        seat["state"] == "free" for seat in doc["resources"][R1]["groups"]["G0"]["seats"].values()
    )


def test_a_plan_gives_each_group_the_link_word_of_every_pair_inside_it() -> None:
    doc = report.plan_document(
        config(
            "profiles:\n"
            "  - {resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 1}\n"
            "  - {resource: kyb.ai/gpu-4x-seat, seatsPerGroup: 1}\n"
        ),
        TOPOLOGY,
    )
    [whole] = doc["resources"][R4]["groups"].values()
    assert whole["links"] == {
        "0-1": "NV4",
        "0-2": "SYS",
        "0-3": "SYS",
        "1-2": "SYS",
        "1-3": "SYS",
        "2-3": "NV4",
    }
    assert all(g["links"] == {} for g in doc["resources"][R1]["groups"].values())


def test_a_plan_follows_the_configs_groups() -> None:
    doc = report.plan_document(
        config(
            "profiles: [{resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 2}]\n"
            "groups:\n  - {name: G03, gpus: [0, 3]}\n  - {name: G12, gpus: [1, 2]}\n"
        ),
        TOPOLOGY,
    )
    groups = doc["resources"][R2]["groups"]
    assert set(groups) == {"G03", "G12"}
    assert groups["G03"]["links"] == {"0-3": "SYS"}
    assert groups["G12"]["gpus"] == [1, 2]
    assert set(groups["G03"]["seats"]) == {"G03-s0", "G03-s1"}


def test_a_plan_keys_links_low_index_first_whatever_order_the_config_lists_gpus() -> None:
    doc = report.plan_document(
        config(
            "profiles: [{resource: kyb.ai/gpu-4x-seat, seatsPerGroup: 1}]\n"
            "groups:\n  - {name: Gall, gpus: [3, 1, 2, 0]}\n"
        ),
        TOPOLOGY,
    )
    assert doc["resources"][R4]["groups"]["Gall"]["links"] == {
        "0-1": "NV4",
        "0-2": "SYS",
        "0-3": "SYS",
        "1-2": "SYS",
        "1-3": "SYS",
        "2-3": "NV4",
    }


def test_a_plan_names_the_gpus_discovery_set_aside() -> None:
    topology = Topology(
        TOPOLOGY.gpus[:2], TOPOLOGY.links, (SetAsideGpu(2, "GPU-mig", "MIG mode is enabled"),)
    )
    doc = report.plan_document(
        config("profiles: [{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 1}]\n"), topology
    )
    assert doc["setAsideGpus"] == [{"index": 2, "uuid": "GPU-mig", "why": "MIG mode is enabled"}]
    assert set(doc["resources"][R1]["groups"]) == {"G0", "G1"}
    out = io.StringIO()
    report.print_plan(doc, topology, out)
    assert out.getvalue().endswith("GPU 2 (GPU-mig) not served: MIG mode is enabled\n")


def test_the_plan_table_is_the_link_matrix_then_the_seat_map_with_links() -> None:
    doc = report.plan_document(
        config("profiles: [{resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 1}]\n"), TOPOLOGY
    )
    out = io.StringIO()
    report.print_plan(doc, TOPOLOGY, out)
    matrix, seat_map = out.getvalue().split("\n\n", 1)[0], out.getvalue().split("\n\n")[-1]
    assert matrix.splitlines()[0] == "\tGPU0\tGPU1\tGPU2\tGPU3\tNUMA Affinity"
    assert seat_map == (
        "kyb.ai/gpu-2x-seat: 2 group(s), 2 seat(s)\n"
        "  G01        GPUs [0,1]  Healthy  links 0-1:NV4\n"
        "    G01-s0=free/g0\n"
        "  G23        GPUs [2,3]  Healthy  links 2-3:NV4\n"
        "    G23-s0=free/g0\n"
    )


# ---- the link matrix ---------------------------------------------------------------------


def test_the_matrix_reads_like_nvidia_smi_topo_with_unknown_numa_as_na() -> None:
    gpus = [
        Gpu(0, "GPU-a", "NVIDIA H100 80GB HBM3", 81920, "00000000:18:00.0", minor=0, numa_node=0),
        Gpu(1, "GPU-b", "NVIDIA H100 80GB HBM3", 81920, "00000000:2A:00.0", minor=4),
    ]
    text = report.topology_matrix(Topology.from_matrix(gpus, [["X", "NV18"], ["NV18", "X"]]))
    assert text == (
        "\tGPU0\tGPU1\tNUMA Affinity\n"
        "GPU0\t X\t NV18\t0\n"
        "GPU1\t NV18\t X\tN/A\n"
        "\n"
        "GPU0: NVIDIA H100 80GB HBM3, GPU-a, 81920 MiB, PCI 00000000:18:00.0, /dev/nvidia0\n"
        "GPU1: NVIDIA H100 80GB HBM3, GPU-b, 81920 MiB, PCI 00000000:2A:00.0, /dev/nvidia4\n"
    )


def test_a_node_without_gpus_prints_one_line_not_an_empty_matrix() -> None:
    assert report.topology_matrix(Topology(())) == "no GPUs\n"


# ---- status ------------------------------------------------------------------------------


def test_the_status_view_of_a_state_file_is_the_boards_status_document(tmp_path: Path) -> None:
    # held, fenced (with why), drained, unhealthy and a GPU set aside: every field the
    # node agent reads, from the file as the plugin writes it (ledger detail and all)
    board = SeatBoard(
        seed_layout(),
        Policy(drain=frozenset({GroupName("G23")})),
        StateStore(tmp_path),
        release_grace_s=60,
    )
    board.set_aside_gpus([SetAsideGpu(7, "GPU-7", "MIG mode is enabled")])
    board.allocate(R1, [[DeviceId("G0-s1")]])
    board.set_unhealthy({TOPOLOGY.gpu(3).uuid: "XID 79"})
    settle()
    state = json.loads((tmp_path / "state.json").read_text())
    assert "binding" in state["resources"][R1]["groups"]["G0"]["seats"]["G0-s1"]
    view = report.status_view(state)
    assert view == json.loads(json.dumps(board.status()))
    assert view["resources"][R1]["groups"]["G0"]["seats"]["G0-s1"] == {
        "state": "held",
        "generation": 1,
    }
    assert view["resources"][R2]["groups"]["G01"]["seats"]["G01-s0"]["why"]
    board.close()


def test_the_status_view_drops_ledger_detail_and_tolerates_missing_sections() -> None:
    state = {
        "version": 3,
        "cleanStop": False,
        "setAsideGpus": [],
        "resources": {
            R1: {
                "groups": {
                    "G0": {
                        "gpus": [0],
                        "health": "Healthy",
                        "seats": {
                            "G0-s0": {
                                "state": "held",
                                "generation": 4,
                                "binding": {"generation": 4, "holder": None},
                            }
                        },
                    },
                    "G1": {"gpus": [1], "seats": None},
                }
            },
            R2: {"groups": None},
            R4: {},
        },
    }
    assert report.status_view(state) == {
        "resources": {
            R1: {
                "groups": {
                    "G0": {
                        "gpus": [0],
                        "health": "Healthy",
                        "seats": {"G0-s0": {"state": "held", "generation": 4}},
                    },
                    "G1": {"gpus": [1], "seats": {}},
                }
            },
            R2: {"groups": {}},
            R4: {"groups": {}},
        }
    }
    assert report.status_view({}) == {"resources": {}}


def test_the_seat_map_shows_health_fences_and_drains_groups_in_gpu_order() -> None:
    doc: StatusDoc = {
        "resources": {
            R2: {
                "groups": {
                    "A23": {
                        "gpus": [2, 3],
                        "uuids": ["GPU-2", "GPU-3"],
                        "health": "Unhealthy",
                        "numaNodes": [1],
                        "fenced": False,
                        "drained": True,
                        "seats": {"A23-s0": {"state": "unhealthy", "generation": 2}},
                    },
                    "Z01": {
                        "gpus": [0, 1],
                        "uuids": ["GPU-0", "GPU-1"],
                        "health": "Healthy",
                        "numaNodes": [0],
                        "fenced": True,
                        "drained": False,
                        "links": {"0-1": "NV4"},
                        "seats": {
                            "Z01-s0": {"state": "fenced", "generation": 0, "why": "GPU 0 ..."},
                            "Z01-s1": {"state": "held", "generation": 12},
                        },
                    },
                }
            },
            R1: {"groups": {}},
        }
    }
    out = io.StringIO()
    report.print_seat_map(doc, out)
    assert out.getvalue() == (
        "kyb.ai/gpu-1x-seat: 0 group(s), 0 seat(s)\n"
        "  (no group of this size on this node)\n"
        "kyb.ai/gpu-2x-seat: 2 group(s), 3 seat(s)\n"
        "  Z01        GPUs [0,1]  Healthy fenced\n"
        "    Z01-s0=fenced/g0  Z01-s1=held/g12\n"
        "  A23        GPUs [2,3]  Unhealthy draining\n"
        "    A23-s0=unhealthy/g2\n"
    )


def test_an_empty_seat_map_says_so() -> None:
    out = io.StringIO()
    report.print_seat_map({"resources": {}}, out)
    assert out.getvalue() == "no profiles\n"


def test_the_seat_map_names_each_known_holder() -> None:
    out = io.StringIO()
    report.print_seat_map(
        {
            "resources": {
                R1: {
                    "groups": {
                        "G0": {
                            "gpus": [0],
                            "uuids": ["GPU-0"],
                            "health": "Healthy",
                            "numaNodes": [0],
                            "fenced": False,
                            "drained": False,
                            "seats": {
                                "G0-s0": {
                                    "state": "held",
                                    "generation": 3,
                                    "holder": {"namespace": "ml", "pod": "p", "container": "c"},
                                },
                                "G0-s1": {"state": "held", "generation": 1},
                            },
                        }
                    }
                }
            }
        },
        out,
    )
    assert "    G0-s0=held/g3(ml/p/c)  G0-s1=held/g1\n" in out.getvalue()
