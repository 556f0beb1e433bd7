"""The card's generator: config plus topology rendered as registrations, purely."""

from __future__ import annotations

from pathlib import Path

from pkg.deviceplugin import plan
from pkg.deviceplugin.allocator.tests.support import four_gpus_in_nvlink_pairs
from pkg.deviceplugin.config import loader

CONFIG = """
profiles:
  - resource: kyb.ai/gpu-1x-seat
    seatsPerGroup: 2
  - resource: kyb.ai/gpu-2x-seat
    seatsPerGroup: 3
drain: [G01]
preferredAllocationPolicy: pack
"""


def test_render_gives_one_registration_per_resource_on_its_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    config = loader.load(path, {})
    registrations = plan.render(config, four_gpus_in_nvlink_pairs())
    assert [(r.resource, r.socket) for r in registrations] == [
        ("kyb.ai/gpu-1x-seat", "kyb-gpu-1x-seat.sock"),
        ("kyb.ai/gpu-2x-seat", "kyb-gpu-2x-seat.sock"),
    ]
    one, two = registrations
    assert [g.indices for g in one.groups] == [(0,), (1,), (2,), (3,)]
    assert one.seats[:3] == ("G0-s0", "G0-s1", "G1-s0")
    assert len(one.seats) == 4 * 2
    assert [g.indices for g in two.groups] == [(0, 1), (2, 3)]
    assert len(two.seats) == 2 * 3
    assert two.policy.placement == "pack"
    assert two.policy.drain == frozenset({"G01"})
    # pure: the same inputs render the same registrations
    assert plan.render(config, four_gpus_in_nvlink_pairs()) == registrations
