"""New bindings reach the disk as journal lines before their Allocate answers; the state
file is written behind them, and a restart replays what it does not hold yet."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkg.deviceplugin.allocator import durable
from pkg.deviceplugin.allocator import store as store_mod
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import GONE_CONFIRM_S, Holder, floor_after_loss
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.requests import AllocationError
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import (
    R1,
    R2,
    Clock,
    WritesBehind,
    allocate,
    seed_layout,
)
from pkg.deviceplugin.allocator.tests.test_store import (
    FUZZ,
    assert_generations_fit,
    damaged_bytes,
)
from pkg.deviceplugin.types import DeviceId, ResourceName

WALL = 1_800_000_000.0


def opened(
    state_dir: Path, writes: WritesBehind | None = None, mono: Clock | None = None
) -> SeatBoard:
    return SeatBoard(
        seed_layout(),
        Policy(),
        StateStore(state_dir, used_before="topology.json"),
        release_grace_s=60,
        clock=Clock(WALL),
        monotonic=mono or Clock(),
        write_behind=writes if writes is not None else WritesBehind(),
    )


def state(board: SeatBoard, resource: ResourceName, seat: str) -> tuple[str, int]:
    view = board.seat_views(resource)[DeviceId(seat)]
    return view.state, view.generation


def saved_state(state_dir: Path, resource: ResourceName, group: str, seat: str) -> str:
    doc = json.loads((state_dir / "state.json").read_text())
    shown: str = doc["resources"][resource]["groups"][group]["seats"][seat]["state"]
    return shown


def journal_lines(state_dir: Path) -> list[bytes]:
    return (state_dir / store_mod.JOURNAL_FILE).read_bytes().splitlines(keepends=True)


@cache
def journaled() -> tuple[bytes, bytes, bytes]:
    """A state file, a journal and the generation reservation as a crash leaves them
    after three Allocates whose writes behind never ran: the state file from the start,
    one line per binding."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        board = opened(root)
        (root / "topology.json").write_text("{}")
        allocate(board, R2, [["G01-s1"]])
        allocate(board, R1, [["G2-s1"]])
        allocate(board, R1, [["G3-s0"], ["G3-s1"]])
        return (
            (root / "state.json").read_bytes(),
            (root / store_mod.JOURNAL_FILE).read_bytes(),
            (root / store_mod.RESERVATION_FILE).read_bytes(),
        )


def restored_from(tmp_path: Path, journal: bytes) -> SeatBoard:
    saved, _, reserved = journaled()
    (tmp_path / "state.json").write_bytes(saved)
    (tmp_path / store_mod.RESERVATION_FILE).write_bytes(reserved)
    (tmp_path / "topology.json").write_text("{}")
    (tmp_path / store_mod.JOURNAL_FILE).write_bytes(journal)
    return opened(tmp_path)


def test_a_new_binding_is_durable_in_the_journal_before_the_state_file(tmp_path: Path) -> None:
    board = opened(tmp_path)
    (tmp_path / "topology.json").write_text("{}")
    answer = allocate(board, R2, [["G01-s1"]])[0]
    assert answer.envs["KYB_SEAT_GEN"] == "1"
    # the write behind it has not run: only the journal has the binding
    assert saved_state(tmp_path, R2, "G01", "G01-s1") == "free"
    assert len(journal_lines(tmp_path)) == 1
    restarted = opened(tmp_path)  # a crash now
    assert state(restarted, R2, "G01-s1") == ("held", 1)
    assert state(restarted, R1, "G0-s0") == ("fenced", 0)
    # nothing was lost, but nothing could tell if a line had been: generations go on
    # from above the reservation, never from a number the journal might have held
    reserved = reservation(tmp_path)
    assert reserved == 1 + durable.RESERVE_AHEAD
    assert allocate(restarted, R2, [["G01-s1"]])[0].envs["KYB_SEAT_GEN"] == str(reserved + 1)
    assert allocate(restarted, R2, [["G01-s2"]])[0].envs["KYB_SEAT_GEN"] == str(reserved + 1)


def test_after_a_clean_stop_generations_go_on_counting(tmp_path: Path) -> None:
    board = opened(tmp_path)
    (tmp_path / "topology.json").write_text("{}")
    allocate(board, R2, [["G01-s1"]])
    board.close()
    board.flush()
    assert journal_lines(tmp_path) == []
    assert json.loads((tmp_path / "state.json").read_text())["cleanStop"] is True
    restarted = opened(tmp_path)
    # the start's save takes the mark away: a crash from here on is not a clean stop
    assert "cleanStop" not in json.loads((tmp_path / "state.json").read_text())
    assert allocate(restarted, R2, [["G01-s1"]])[0].envs["KYB_SEAT_GEN"] == "2"
    assert allocate(restarted, R2, [["G01-s2"]])[0].envs["KYB_SEAT_GEN"] == "1"


def test_no_line_follows_a_document_marked_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start whose own save failed still has the clean stop's document on disk: a line
    # appended behind it would be trusted as the last one, so the binding saves whole.
    board = opened(tmp_path)
    (tmp_path / "topology.json").write_text("{}")
    board.close()
    board.flush()
    real = store_mod.atomic_write
    calls = []

    def failing_once(path: Path, payload: str) -> None:
        calls.append(path.name)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(store_mod, "atomic_write", failing_once)
    restarted = opened(tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["cleanStop"] is True
    allocate(restarted, R2, [["G01-s1"]])
    assert "cleanStop" not in json.loads((tmp_path / "state.json").read_text())
    assert not (tmp_path / store_mod.JOURNAL_FILE).exists() or journal_lines(tmp_path) == []


def reservation(state_dir: Path) -> int:
    reserved: int = json.loads((state_dir / store_mod.RESERVATION_FILE).read_text())["reserved"]
    return reserved


def test_the_state_file_follows_on_the_writer_thread_and_empties_the_journal(
    tmp_path: Path,
) -> None:
    board = SeatBoard(seed_layout(), Policy(), StateStore(tmp_path), release_grace_s=60)
    allocate(board, R2, [["G01-s1"]])
    durable.settle()
    assert saved_state(tmp_path, R2, "G01", "G01-s1") == "held"
    assert journal_lines(tmp_path) == []


def test_a_restart_replays_every_line_a_crash_left(tmp_path: Path) -> None:
    _, journal, _ = journaled()
    assert len(journal.splitlines()) == 3
    board = restored_from(tmp_path, journal)
    assert state(board, R2, "G01-s1") == ("held", 1)
    assert state(board, R1, "G2-s1") == ("held", 1)
    assert state(board, R1, "G3-s0") == ("held", 1)
    assert state(board, R1, "G3-s1") == ("held", 1)
    # the start's save holds them all and empties the journal
    assert saved_state(tmp_path, R1, "G3", "G3-s1") == "held"
    assert journal_lines(tmp_path) == []


def test_a_torn_last_line_is_ignored_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, journal, _ = journaled()
    last = journal.splitlines(keepends=True)[-1]
    with caplog.at_level(logging.WARNING):
        board = restored_from(tmp_path, journal[: -len(last)] + last[: len(last) // 2])
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 2
    assert "torn by a crash" in messages[0]
    assert "not saved at a clean stop" in messages[1]
    assert state(board, R1, "G2-s1") == ("held", 1)
    # the torn Allocate never answered: its seats are free, and no ledger was lost
    assert state(board, R1, "G3-s0") == ("free", 0)
    assert not board.needs_observation(R1, [[DeviceId("G3-s0")]])
    reserved = reservation(tmp_path)
    assert allocate(board, R1, [["G3-s0"]])[0].envs["KYB_SEAT_GEN"] == str(reserved + 1)


@pytest.mark.parametrize("how", ["bit-flip", "line-dropped-newline", "not-a-binding"])
def test_a_damaged_line_is_a_lost_ledger_and_the_journal_is_set_aside(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, journal, _ = journaled()
    lines = journal.splitlines(keepends=True)
    if how == "bit-flip":
        lines[0] = lines[0].replace(b'"generation":1', b'"generation":"', 1)
    elif how == "line-dropped-newline":
        lines[0] = lines[0].rstrip(b"\n")
    else:
        record = json.loads(lines[1])
        del record["seats"][0][2]["binding"]
        lines[1] = json.dumps(record).encode() + b"\n"
    damaged = b"".join(lines)
    with caplog.at_level(logging.ERROR):
        board = restored_from(tmp_path, damaged)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "bindings it held may be lost" in errors[0]
    aside = list(tmp_path.glob(f"{store_mod.JOURNAL_FILE}.corrupt-*"))
    assert [p.read_bytes() for p in aside] == [damaged]
    # only PodResources can say what is held now, and generations jump above the floor
    with pytest.raises(AllocationError) as refused:
        allocate(board, R2, [["G23-s0"]])
    assert refused.value.code == "unavailable"
    assert board._ledger.floor > floor_after_loss(WALL - 1)


def test_a_line_a_later_save_holds_changes_nothing(tmp_path: Path) -> None:
    # The journal is emptied after the save that holds its lines; a crash may lose that
    # emptying (it is not synced): the old line must not bring a released binding back.
    writes, mono = WritesBehind(), Clock()
    board = opened(tmp_path, writes, mono)
    allocate(board, R2, [["G01-s1"]])
    stale = (tmp_path / store_mod.JOURNAL_FILE).read_bytes()
    writes.land()
    pod = {(R2, DeviceId("G01-s1")): Holder("ns", "a", "main")}
    board.reconcile(pod)
    board.reconcile({})
    mono.now += GONE_CONFIRM_S
    board.reconcile({})
    assert state(board, R2, "G01-s1") == ("free", 1)
    (tmp_path / store_mod.JOURNAL_FILE).write_bytes(stale)
    assert state(opened(tmp_path), R2, "G01-s1") == ("free", 1)


def test_a_release_an_allocate_observed_is_durable_with_its_binding(tmp_path: Path) -> None:
    # Found by the generations machine (single-gpu CI run): the Allocate of a fenced 2x
    # seat asks List, which shows the 1x holder gone, and releases it; only the 2x
    # binding went to the journal, so a crash brought the 1x binding back under it.
    writes, mono = WritesBehind(), Clock()
    board = opened(tmp_path, writes, mono)
    allocate(board, R1, [["G0-s0"]])
    board.reconcile({(R1, DeviceId("G0-s0")): Holder("ns", "a", "main")})
    board.reconcile({})
    mono.now += GONE_CONFIRM_S
    assert board.needs_observation(R2, [[DeviceId("G01-s0")]])  # fenced by the 1x seat on GPU 0
    allocate(board, R2, [["G01-s0"]], {})
    writes.drop()  # a crash
    restarted = opened(tmp_path)
    assert state(restarted, R1, "G0-s0") == ("fenced", 1)  # released, fenced by the 2x seat
    assert state(restarted, R2, "G01-s0") == ("held", 1)


def test_a_failed_line_refuses_the_allocate_and_the_next_binding_saves_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = opened(tmp_path)
    real = os.fdatasync

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full_disk)
    with pytest.raises(AllocationError) as refused:
        allocate(board, R2, [["G01-s1"]])
    assert refused.value.code == "unavailable"
    assert state(board, R2, "G01-s1") == ("free", 0)
    monkeypatch.setattr(os, "fdatasync", real)
    # the failed line may be on disk, torn: no line may follow it, the file is saved whole
    allocate(board, R2, [["G01-s2"]])
    assert saved_state(tmp_path, R2, "G01", "G01-s2") == "held"
    assert journal_lines(tmp_path) == []
    assert state(opened(tmp_path), R2, "G01-s1") == ("free", 0)


def test_a_long_journal_is_emptied_by_the_next_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "JOURNAL_LIMIT_BYTES", 300)
    board = opened(tmp_path)  # its writes behind never land
    for seat in ("G0-s0", "G0-s1", "G0-s2", "G0-s3"):
        allocate(board, R1, [[seat]])
        assert sum(map(len, journal_lines(tmp_path))) < 300 + 300
    assert saved_state(tmp_path, R1, "G0", "G0-s2") == "held"


@FUZZ
@given(damaged_bytes(journaled()[1]))
def test_no_bytes_in_the_journal_stop_the_board(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        assert_generations_fit(restored_from(Path(scratch), content))


R1_SEATS = [f"G{g}-s{s}" for g in range(4) for s in range(4)]


@FUZZ
@given(
    seats=st.lists(st.sampled_from(R1_SEATS), min_size=1, max_size=10),
    cut=st.none() | st.integers(min_value=0, max_value=10),
)
def test_a_journal_cut_at_a_line_or_removed_after_a_crash_hands_out_no_generation_again(
    seats: list[str], cut: int | None
) -> None:
    # A journal cut at a line boundary, emptied or removed reads as a shorter one (found
    # by the hostile suite's state trial): the bindings of its lost lines are gone, and
    # their seats' next holders must still get generations above theirs.
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        mono = Clock()
        board = opened(root, mono=mono)  # its writes behind never land
        (root / "topology.json").write_text("{}")
        handed: dict[str, int] = {}
        for seat in seats:
            mono.now += 10  # past the hand-off window: a new holder each time
            generation = int(allocate(board, R1, [[seat]])[0].envs["KYB_SEAT_GEN"])
            assert generation > handed.get(seat, 0)
            handed[seat] = generation
        journal = root / store_mod.JOURNAL_FILE
        if cut is None:
            journal.unlink()
        else:
            journal.write_bytes(b"".join(journal_lines(root)[:cut]))
        restarted = opened(root)
        for seat, before in handed.items():
            again = int(allocate(restarted, R1, [[seat]])[0].envs["KYB_SEAT_GEN"])
            assert again > before, f"{seat} handed out {again} after {before}"


def open_files(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


def test_a_write_behind_that_ends_after_the_clean_stop_leaves_the_journal_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write behind a binding is saving when the plugin stops: the stop's flush
    # waits for it, saves, empties and closes the journal. The write behind then
    # emptied the journal once more: it opened it again (created it, in a directory
    # being removed: CI's unit env, "Directory not empty") and left it open.
    writes = WritesBehind()
    board = opened(tmp_path, writes)
    allocate(board, R2, [["G01-s1"]])
    saving, go = threading.Event(), threading.Event()
    real_save = StateStore.save_encoded

    def slow_save(self: StateStore, *args: Any, **kwargs: Any) -> None:
        real_save(self, *args, **kwargs)
        if threading.current_thread().name == "write-behind":
            saving.set()
            go.wait(10)

    monkeypatch.setattr(StateStore, "save_encoded", slow_save)
    behind = threading.Thread(target=writes.land, name="write-behind")
    behind.start()
    assert saving.wait(10)
    board.close()
    stop = threading.Thread(target=board.flush, name="stop")
    stop.start()
    deadline = time.monotonic() + 10
    while board._lock.acquire(blocking=False):  # until the stop's flush holds it
        board._lock.release()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    go.set()
    stop.join(10)
    behind.join(10)
    assert open_files(tmp_path / store_mod.JOURNAL_FILE) == 0
    assert journal_lines(tmp_path) == []
    assert saved_state(tmp_path, R2, "G01", "G01-s1") == "held"
