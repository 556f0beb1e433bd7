from __future__ import annotations

import json
import logging
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from pkg.deviceplugin import topocache
from pkg.deviceplugin.allocator.tests.support import four_gpus_in_nvlink_pairs
from pkg.deviceplugin.allocator.tests.test_store import FUZZ, damaged_bytes, damaged_shapes
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


@pytest.mark.parametrize(
    "content",
    [
        b'{"gpus": "nope"',
        b"[]",
        b'{"gpus": [{"index": "0"}], "links": [[1]], "extra": {}}',
        b'{"gpus": [], "links": \xff}',
        b'{"gpus": ' + b"[" * 100_000 + b"]" * 100_000 + b', "links": []}',
    ],
    ids=["not-json", "not-an-object", "not-a-topology", "invalid-utf8", "nested-100000-deep"],
)
def test_a_corrupt_cache_is_set_aside_with_one_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert topocache.load(tmp_path) is None
    (tmp_path / topocache.CACHE_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert topocache.load(tmp_path) is None
    [line] = [r.getMessage() for r in caplog.records]
    assert "ignoring the topology cache" in line and "\n" not in line
    assert [p.read_bytes() for p in tmp_path.glob("topology.json.corrupt-*")] == [content]
    # Set aside, so the next start finds no cache and says nothing.
    caplog.clear()
    assert topocache.load(tmp_path) is None
    assert not caplog.records


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


# ---- fuzz: no content of the cache stops the plugin ------------------------------------


@cache
def real_cache() -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        topocache.save(Path(scratch), four_gpus_in_nvlink_pairs())
        return (Path(scratch) / topocache.CACHE_FILE).read_bytes()


def assert_loads_or_is_none(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / topocache.CACHE_FILE).write_bytes(content)
        loaded = topocache.load(Path(scratch))
        assert loaded is None or isinstance(loaded, Topology)


@FUZZ
@given(damaged_bytes(real_cache()))
def test_no_bytes_in_the_topology_cache_stop_its_load(content: bytes) -> None:
    assert_loads_or_is_none(content)


@FUZZ
@given(damaged_shapes(json.loads(real_cache())))
def test_no_json_shape_in_the_topology_cache_stops_its_load(doc: Any) -> None:
    assert_loads_or_is_none(json.dumps(doc).encode())
