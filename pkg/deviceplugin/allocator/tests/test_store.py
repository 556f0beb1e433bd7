from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkg.deviceplugin.allocator import store as store_mod
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import GONE_CONFIRM_S, floor_after_loss
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import MAX_GENERATION, StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    Clock,
    allocate,
    model_examples,
    seed_layout,
)
from pkg.deviceplugin.types import DeviceId, ResourceName

FREE_SEAT = ("kyb.ai/gpu-2x-seat", "G01", "G01-s0")
HELD_SEAT = ("kyb.ai/gpu-2x-seat", "G01", "G01-s1")


def test_missing_file_is_a_fresh_start(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load() is None


MONOTONIC = Clock()


def rebuilt_then_bound(board: SeatBoard) -> int:
    """After a lost ledger: PodResources answers twice, 2 s apart (nothing held), then
    a seat is bound; its generation."""
    board.reconcile({})
    MONOTONIC.now += GONE_CONFIRM_S
    return int(allocate(board, R2, [["G01-s0"]], {})[0].envs["KYB_SEAT_GEN"])


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        json.dumps({"version": 99, "resources": {}}).encode(),
        b"[1, 2]",
        b'{"version": true, "resources": {}}',
        b'{"version":1,"resources":{"kyb.ai/gpu-2x-seat":[]}}',
        b'{"version":1,"resources":{"kyb.ai/gpu-2x-seat":5}}',
        b'{"version":1,"resources":{"kyb.ai/gpu-2x-seat":{"groups":{"G01":{"seats":[]}}}}}',
        b'{"version":1,"retired":{"kyb.ai/gpu-2x-seat":{"G01-s0":7}}}',
        b'{"version":1,"resources":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"version":1,"resources":{"kyb.ai/gpu-\xff\xfe":{}}}',
    ],
    ids=[
        "not-json",
        "foreign-version",
        "not-an-object",
        "version-true",
        "resource-is-a-list",
        "resource-is-a-number",
        "seats-is-a-list",
        "retired-entry-is-a-number",
        "nested-100000-deep",
        "invalid-utf8",
    ],
)
def test_corrupt_file_is_set_aside_with_one_log_line_and_never_crashes(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        board = SeatBoard(seed_layout(), Policy(), store, release_grace_s=60, monotonic=MONOTONIC)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "rebuilding from the kubelet's PodResources" in errors[0].getMessage()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    # the ledger was lost: generations continue above the wall-clock floor, never at 1
    # (no new binding before PodResources has answered: it alone knows what is held)
    generation = rebuilt_then_bound(board)
    assert generation > floor_after_loss(time.time() - 60)
    assert json.loads(store.path.read_text())["version"] == 1


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"resources": {}})
    store.save({"resources": {"x": {}}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert json.loads(store.path.read_text()) == {"resources": {"x": {}}, "version": 1}


def test_a_failed_durable_write_refuses_the_allocate_and_binds_nothing(tmp_path: Path) -> None:
    # A state "directory" that is a regular file: every save fails as a full or broken
    # disk would (root ignores permission bits, so chmod cannot stand in here).
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    board = SeatBoard(seed_layout(), Policy(), StateStore(not_a_dir), release_grace_s=60)
    with pytest.raises(AllocationError) as refused:
        allocate(board, R2, [["G01-s0"]])
    assert refused.value.code == "unavailable"
    view = board.seat_views(R2)[DeviceId("G01-s0")]
    assert (view.state, view.generation) == ("free", 0)


def test_a_file_over_the_size_bound_is_set_aside_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store_mod, "MAX_FILE_BYTES", 1000)
    store = StateStore(tmp_path)
    store.path.write_bytes(real_state())
    with caplog.at_level(logging.ERROR):
        assert store.load() is None
    assert "larger than 1000 bytes" in caplog.text
    assert [p.read_bytes() for p in tmp_path.glob("state.json.corrupt-*")] == [real_state()]


@pytest.mark.parametrize("generation", [-5, 10**30, 2**63, True, "3", 1.5])
def test_a_bad_generation_is_dropped_with_one_log_line_and_never_handed_out(
    tmp_path: Path, generation: object, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path)
    store.path.write_text(json.dumps(with_entry(FREE_SEAT, {"generation": generation})))
    with caplog.at_level(logging.ERROR):
        board = SeatBoard(seed_layout(), Policy(), store, release_grace_s=60, monotonic=MONOTONIC)
    given_out = rebuilt_then_bound(board)
    assert 1 <= given_out <= MAX_GENERATION
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "kyb.ai/gpu-2x-seat/G01-s0" in errors[0]
    assert not list(tmp_path.glob("state.json.corrupt-*"))
    # The rest of the file is kept: the held seats are still held.
    assert board.seat_views(R2)[DeviceId("G01-s1")].state == "held"
    assert board.seat_views(R1)[DeviceId("G2-s1")].state == "held"


@pytest.mark.parametrize(
    ("generation", "change", "kept"),
    [
        (5, {"gpus": ["0"]}, 7),
        (5, {"gpus": [1024]}, 7),
        (5, {"allocatedAt": float("inf")}, 7),
        (5, {"group": 7}, 7),
        (5, {"holder": {"namespace": "ns", "pod": "p"}}, 7),
        (5, {"holder": "ns/p/c"}, 7),
        (5, {"extra": 1}, 7),
        (5, {"generation": 0}, 5),
        (5, {"generation": 10**30}, 5),
        (-5, {}, 7),
        (-5, {"generation": -7}, 0),
    ],
)
def test_a_damaged_entry_loses_its_binding_and_keeps_its_highest_valid_generation(
    tmp_path: Path,
    generation: int,
    change: dict[str, Any],
    kept: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    binding = {**state_entry(HELD_SEAT)["binding"], "generation": 7, **change}
    store = StateStore(tmp_path)
    store.path.write_text(
        json.dumps(with_entry(HELD_SEAT, {"generation": generation, "binding": binding}))
    )
    with caplog.at_level(logging.ERROR):
        board = SeatBoard(seed_layout(), Policy(), store, release_grace_s=60)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "kyb.ai/gpu-2x-seat/G01-s1" in errors[0]
    view = board.seat_views(R2)[DeviceId("G01-s1")]
    assert (view.state, view.generation) == ("free", kept)
    assert board.seat_views(R1)[DeviceId("G2-s1")].state == "held"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_save_leaves_no_temp_file_and_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = StateStore(tmp_path)
    store.save({"resources": {}})
    before = store.path.read_bytes()

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        store.save({"resources": {"x": {}}})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert store.path.read_bytes() == before


# ---- fuzz: no content of the state file stops the plugin -------------------------------


@cache
def real_state() -> bytes:
    """A state file as the real board writes it, with seats held on two profiles."""
    with tempfile.TemporaryDirectory() as scratch:
        board = SeatBoard(seed_layout(), Policy(), StateStore(Path(scratch)), release_grace_s=60)
        allocate(board, R2, [["G01-s1"]])
        allocate(board, R1, [["G2-s1"]])
        allocate(board, R1, [["G3-s0"]])
        board.close()
        board.flush()
        return (Path(scratch) / "state.json").read_bytes()


def state_entry(seat: tuple[str, str, str]) -> dict[str, Any]:
    resource, group, device_id = seat
    doc = json.loads(real_state())
    entry: dict[str, Any] = doc["resources"][resource]["groups"][group]["seats"][device_id]
    return entry


def with_entry(seat: tuple[str, str, str], entry: dict[str, Any]) -> dict[str, Any]:
    resource, group, device_id = seat
    doc: dict[str, Any] = json.loads(real_state())
    doc["resources"][resource]["groups"][group]["seats"][device_id] = entry
    return doc


def damaged_bytes(original: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and ``original`` with bits flipped, truncated, or bytes spliced in."""

    def flipped(bits: list[int]) -> bytes:
        data = bytearray(original)
        for bit in bits:
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)

    positions = st.integers(0, len(original))
    return st.one_of(
        st.binary(max_size=200),
        st.lists(st.integers(0, len(original) * 8 - 1), min_size=1, max_size=4).map(flipped),
        positions.map(lambda n: original[:n]),
        st.tuples(positions, st.binary(min_size=1, max_size=8)).map(
            lambda p: original[: p[0]] + p[1] + original[p[0] :]
        ),
    )


JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([-5, -1, 0, 1, 1023, 1024, MAX_GENERATION, MAX_GENERATION + 1, 10**30])
    | st.floats()
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=8,
)


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    children: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    return [here] + [p for key, child in children for p in _paths(child, (*here, key))]


def damaged_shapes(original: Any) -> st.SearchStrategy[Any]:
    """``original`` (parsed JSON) with any value in it replaced by random JSON, or a
    random key added to any object in it, a few times over."""
    paths = _paths(original)

    def apply(edits: list[tuple[tuple[Any, ...], str | None, Any]]) -> Any:
        doc = json.loads(json.dumps(original))
        for path, new_key, value in edits:
            parent: Any = None
            node = doc
            try:
                for key in path:
                    parent, node = node, node[key]
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit replaced what this one would change
            if new_key is not None and isinstance(node, dict):
                node[new_key] = value
            elif parent is None:
                doc = value
            else:
                parent[path[-1]] = value
        return doc

    edit = st.tuples(st.sampled_from(paths), st.none() | st.text(max_size=10), JSON_VALUES)
    return st.lists(edit, min_size=1, max_size=3).map(apply)


def assert_loads_and_restores(content: bytes) -> None:
    """A board starts on ``content`` (``StateStore.load``, then a restore of whatever it
    returned) and shows only generations that fit an int64."""
    with tempfile.TemporaryDirectory() as scratch:
        store = StateStore(Path(scratch))
        store.path.write_bytes(content)
        assert_generations_fit(SeatBoard(seed_layout(), Policy(), store, release_grace_s=60))


def assert_generations_fit(board: SeatBoard) -> None:
    """The board shows seats, every generation in 0..int64."""
    shown = [
        seat["generation"]
        for body in board.status()["resources"].values()
        for group in body["groups"].values()
        for seat in group["seats"].values()
    ]
    assert shown and all(0 <= g <= MAX_GENERATION for g in shown)


FUZZ = settings(
    max_examples=model_examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(damaged_bytes(real_state()))
def test_no_bytes_in_the_state_file_stop_the_board(content: bytes) -> None:
    assert_loads_and_restores(content)


@FUZZ
@given(damaged_shapes(json.loads(real_state())))
def test_no_json_shape_in_the_state_file_stops_the_board(doc: Any) -> None:
    assert_loads_and_restores(json.dumps(doc).encode())


def test_the_fuzz_starts_from_a_document_the_board_restores_as_written(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(real_state())
    board = SeatBoard(seed_layout(), Policy(), store, release_grace_s=60)

    def held(resource: ResourceName) -> list[str]:
        return sorted(d for d, v in board.seat_views(resource).items() if v.state == "held")

    assert (held(R1), held(R2)) == (["G2-s1", "G3-s0"], ["G01-s1"])


LEDGER_ENTRIES: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"generation": st.integers(0, MAX_GENERATION)},
    optional={
        "binding": st.none()
        | st.fixed_dictionaries(
            {
                "generation": st.integers(1, MAX_GENERATION),
                "allocatedAt": st.floats(allow_nan=False, allow_infinity=False),
                "group": st.sampled_from(["G01", "G23", "G0", "G3"]) | st.text(max_size=6),
                "gpus": st.lists(st.integers(0, 1023), max_size=4),
                "holder": st.none()
                | st.fixed_dictionaries(
                    {"namespace": st.text(), "pod": st.text(), "container": st.text()}
                ),
            }
        )
    },
)

SEATS = [p for p in _paths(json.loads(real_state())) if len(p) == 6 and p[4] == "seats"]


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(SEATS)
            | st.tuples(st.just("retired"), st.text(max_size=20), st.text(max_size=6)),
            LEDGER_ENTRIES,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_seat_entry_that_passes_the_checks_restores(
    entries: list[tuple[tuple[str, ...], dict[str, Any]]],
) -> None:
    doc = json.loads(real_state())
    for path, entry in entries:
        *parents, seat = path
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[seat] = entry
    assert_loads_and_restores(json.dumps(doc).encode())
