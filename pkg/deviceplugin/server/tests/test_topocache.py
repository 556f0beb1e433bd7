from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pkg.deviceplugin.allocator.tests.support import four_gpus_in_nvlink_pairs
from pkg.deviceplugin.server import topocache
from pkg.deviceplugin.types import Gpu, Topology


def without(topology: Topology, *indices: int) -> Topology:
    return Topology(
        tuple(g for g in topology.gpus if g.index not in indices),
        {pair: link for pair, link in topology.links.items() if not set(pair) & set(indices)},
    )


def test_the_cache_round_trips_gpus_and_links(tmp_path: Path) -> None:
    topology = four_gpus_in_nvlink_pairs()
    topocache.save(tmp_path, topology)
    assert topocache.load(tmp_path) == topology


def test_no_cache_is_none_and_a_corrupt_one_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert topocache.load(tmp_path) is None
    (tmp_path / topocache.CACHE_FILE).write_text('{"gpus": "nope"')
    with caplog.at_level(logging.WARNING):
        assert topocache.load(tmp_path) is None
    assert len(caplog.records) == 1 and "ignoring the topology cache" in caplog.text


def test_only_missing_gpus_that_held_seats_need_come_back_with_their_links() -> None:
    cached = four_gpus_in_nvlink_pairs()
    fresh = without(cached, 2, 3)
    merged, restored = topocache.restore(cached, fresh, needed={0, 1, 3})
    assert [g.index for g in restored] == [3]
    assert merged.indices == (0, 1, 3)
    assert merged.link(0, 1) == cached.link(0, 1)
    assert merged.link(1, 3) == cached.link(1, 3)
    # Nothing needed, nothing restored: a GPU gone for good stays gone.
    assert topocache.restore(cached, fresh, needed={0, 1}) == (fresh, [])


def test_a_gpu_whose_index_another_gpu_took_is_not_restored() -> None:
    cached = four_gpus_in_nvlink_pairs()
    stranger = Gpu(3, "GPU-ffffffff-0000-0000-0000-000000000000", "other", 1, "0000:99:00.0", 9)
    fresh = Topology((*without(cached, 2, 3).gpus, stranger))
    merged, restored = topocache.restore(cached, fresh, needed={2, 3})
    assert [g.index for g in restored] == [2]
    # GPU 3 is another GPU now: the cached link 2-3 says nothing about it.
    assert (2, 3) not in merged.links
