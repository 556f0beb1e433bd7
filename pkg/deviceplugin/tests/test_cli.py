"""The command line in process: exit codes 0 ok, 2 usage or config, 1 anything else.

Every error is one readable line per problem on stderr, never a traceback (SPEC 9).
``serve`` and ``demo`` start the whole plugin; tests/e2e runs those as processes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pkg.deviceplugin import cli, report
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.durable import settle
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.allocator.tests.support import R1, R2, seed_layout
from pkg.deviceplugin.server.plugin import SeatPlugin
from pkg.deviceplugin.server.tests.support import ServedPlugin, short_dir
from pkg.deviceplugin.types import DeviceId, socket_name_of

MOCK = "nvlink-pairs-4"  # four GPUs in two NVLink pairs
PROFILES = (
    "profiles:\n"
    "  - {resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 2}\n"
    "  - {resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 1}\n"
)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.splitlines()


@dataclass
class Cli:
    root: Path
    capsys: pytest.CaptureFixture[str]

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "dp"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def config(self, text: str = PROFILES, name: str = "config.yaml") -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def paths(self) -> list[str]:
        return ["--kubelet-dir", str(self.kubelet_dir), "--state-dir", str(self.state_dir)]

    def run(self, *argv: str) -> Ran:
        self.capsys.readouterr()
        code = cli.main(list(argv))
        out, err = self.capsys.readouterr()
        return Ran(code, out, err)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    # main() sets up logging for the process and reads KYB_* variables: keep both local
    for name in [n for n in os.environ if n.startswith("KYB_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, threading.excepthook
    path = short_dir()
    (path / "dp").mkdir()
    yield Cli(path, capsys)
    root.handlers[:] = handlers
    root.setLevel(level)
    threading.excepthook = hook
    logging.captureWarnings(False)
    shutil.rmtree(path, ignore_errors=True)


def seats(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        seat_id: seat
        for body in doc["resources"].values()
        for group in body["groups"].values()
        for seat_id, seat in group["seats"].items()
    }


# ---- plan: 0 ---------------------------------------------------------------------------


def test_plan_on_a_mock_node_exits_0_printing_every_seat_free_as_json(run: Cli) -> None:
    done = run.run("plan", "--config", str(run.config()), "--nvml-mock", MOCK, "--output", "json")
    assert (done.code, done.err) == (0, "")
    doc = json.loads(done.out)
    assert set(doc["resources"]) == {R1, R2}
    assert len(seats(doc)) == 4 * 2 + 2 * 1
    assert all(seat == {"state": "free", "generation": 0} for seat in seats(doc).values())


def test_plan_as_text_prints_the_link_matrix_and_the_seat_map(run: Cli) -> None:
    done = run.run("plan", "--config", str(run.config()), "--nvml-mock", MOCK)
    assert (done.code, done.err) == (0, "")
    assert done.out.startswith("\tGPU0\tGPU1\tGPU2\tGPU3\tNUMA Affinity\n")
    assert "kyb.ai/gpu-2x-seat: 2 group(s), 2 seat(s)\n" in done.out


def test_the_config_file_and_the_mock_may_come_from_the_environment(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "KYB_CONFIG",
        str(run.config("profiles: [{resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 3}]\n")),
    )
    monkeypatch.setenv("KYB_NVML_MOCK", MOCK)
    done = run.run("plan", "--output", "json")
    assert done.code == 0, done.err
    assert set(json.loads(done.out)["resources"]) == {R2}
    assert len(seats(json.loads(done.out))) == 2 * 3


# ---- bad usage, bad config: 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--no-such-flag"],
        ["plan", "--output", "yaml"],
        ["frobnicate"],
        ["--no-such-flag"],  # flags alone mean serve: still parsed before anything runs
    ],
)
def test_bad_usage_exits_2_with_one_line(run: Cli, argv: list[str]) -> None:
    done = run.run(*argv)
    assert done.code == 2
    [line] = done.lines
    assert line.startswith("kyb-device-plugin")
    assert done.out == ""


@pytest.mark.parametrize("command", ["plan", "status", "healthz"])
def test_a_bad_config_exits_2_with_one_line_per_problem_each_naming_the_file(
    run: Cli, command: str
) -> None:
    config = run.config(
        "profiles:\n  - resource: kyb.ai/gpu-3x-seat\n    seatsPerGroup: 0\n", "bad.yaml"
    )
    done = run.run(command, "--config", str(config), "--nvml-mock", MOCK, *run.paths())
    assert done.code == 2
    assert len(done.lines) == 2, done.err
    assert all(line.startswith(f"error: {config}: profiles[0].") for line in done.lines)
    assert {line.split(": ")[2] for line in done.lines} == {
        "profiles[0].resource",
        "profiles[0].seatsPerGroup",
    }
    assert "Traceback" not in done.err


def test_a_config_file_that_is_not_there_exits_2_naming_it(run: Cli) -> None:
    missing = run.root / "typo.yaml"
    done = run.run("plan", "--config", str(missing), "--nvml-mock", MOCK)
    assert done.code == 2
    assert done.lines == [f"error: {missing}: config file not found"]


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_a_bad_override_exits_2_naming_the_flag_or_variable_that_set_it(
    run: Cli, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    argv = ["plan", "--config", str(run.config()), "--nvml-mock", MOCK]
    if where == "flag":
        argv += ["--allow-overprovision", "maybe"]
    else:
        monkeypatch.setenv("KYB_ALLOW_OVERPROVISION", "maybe")
    done = run.run(*argv)
    assert done.code == 2
    [line] = done.lines
    named = "--allow-overprovision" if where == "flag" else "KYB_ALLOW_OVERPROVISION"
    assert line.startswith(f"error: {named}: "), line


def test_a_group_the_gpus_do_not_fit_exits_2_naming_the_file_and_key_path(run: Cli) -> None:
    config = run.config(
        "profiles: [{resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 1}]\n"
        "groups:\n  - {name: G01, gpus: [0, 1]}\n  - {name: G29, gpus: [2, 9]}\n"
    )
    done = run.run("plan", "--config", str(config), "--nvml-mock", MOCK)
    assert done.code == 2
    [line] = done.lines
    assert line.startswith(f"error: {config}: groups[1].gpus: unknown GPU index 9"), line


# ---- failures: 1 -----------------------------------------------------------------------


def test_an_unknown_mock_topology_exits_1_listing_the_built_in_ones(run: Cli) -> None:
    done = run.run("plan", "--config", str(run.config()), "--nvml-mock", "no-such-box")
    assert done.code == 1
    [line] = done.lines
    assert line.startswith("error: ") and "no-such-box" in line and MOCK in line


def test_healthz_with_no_plugin_serving_exits_1_with_one_line_per_profile(run: Cli) -> None:
    done = run.run("healthz", "--config", str(run.config()), *run.paths())
    assert done.code == 1
    assert done.lines == [
        f"unhealthy: {r}: socket {run.kubelet_dir / socket_name_of(r)} does not exist"
        for r in (R1, R2)
    ]


def test_healthz_exits_0_only_once_every_profile_answers(run: Cli) -> None:
    board = SeatBoard(seed_layout(), Policy(), None, release_grace_s=60)
    served = [ServedPlugin(SeatPlugin(R1, board, None), run.kubelet_dir / socket_name_of(R1))]
    try:
        argv = ["healthz", "--config", str(run.config()), *run.paths()]
        half = run.run(*argv)
        assert half.code == 1
        [line] = half.lines
        assert line.startswith(f"unhealthy: {R2}: ")
        served.append(
            ServedPlugin(SeatPlugin(R2, board, None), run.kubelet_dir / socket_name_of(R2))
        )
        whole = run.run(*argv)
        assert (whole.code, whole.err) == (0, "")
    finally:
        for one in served:
            one.stop()
        board.close()


def test_status_without_a_state_file_exits_1_saying_where_it_looked(run: Cli) -> None:
    done = run.run("status", "--config", str(run.config()), *run.paths())
    assert done.code == 1
    [line] = done.lines
    assert line.startswith(f"error: no state file at {run.state_dir / 'state.json'}")
    assert f"--state-dir {run.state_dir}" in line


def test_status_of_a_state_file_that_is_not_json_exits_1_with_one_line(run: Cli) -> None:
    run.state_dir.mkdir()
    (run.state_dir / "state.json").write_text("{ not json")
    done = run.run("status", "--config", str(run.config()), *run.paths())
    assert done.code == 1
    [line] = done.lines
    assert line.startswith(f"error: cannot read {run.state_dir / 'state.json'}: ")


def test_an_unexpected_failure_exits_1_with_one_line_and_its_traceback_only_under_debug(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> dict[str, Any]:
        raise RuntimeError("the planner fell over")

    monkeypatch.setattr(report, "plan_document", broken)
    argv = ["plan", "--config", str(run.config()), "--nvml-mock", MOCK]
    quiet = run.run(*argv)
    assert quiet.code == 1
    assert quiet.lines == ["error: RuntimeError: the planner fell over"]
    debug = run.run(*argv, "--debug")
    assert debug.code == 1
    assert "Traceback" in debug.err
    assert debug.lines[-1] == "error: RuntimeError: the planner fell over"


def test_an_interrupt_exits_1_quietly(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: object) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plan_document", interrupted)
    done = run.run("plan", "--config", str(run.config()), "--nvml-mock", MOCK)
    assert (done.code, done.err) == (1, "")


def test_codegen_outside_a_source_checkout_exits_1_with_one_line(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_codegen(name: str) -> types.ModuleType:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", no_codegen)
    done = run.run("codegen", "stubs", "--check")
    assert done.code == 1
    assert done.lines == ["error: codegen needs a source checkout; run it from the repository root"]


def test_codegen_gets_its_arguments_untouched_and_its_exit_code_is_passed_on(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[list[str]] = []
    fake = types.ModuleType("codegen.__main__")

    def codegen_main(args: list[str]) -> int:
        given.append(args)
        return 3

    fake.main = codegen_main  # type: ignore[attr-defined]
    monkeypatch.setattr(importlib, "import_module", lambda name: fake)
    assert run.run("codegen", "stubs", "--check", "--config", "x").code == 3
    assert given == [["stubs", "--check", "--config", "x"]]


# ---- status: 0 -------------------------------------------------------------------------


def test_status_shows_the_live_seat_map_as_json_and_as_a_table(run: Cli) -> None:
    board = SeatBoard(seed_layout(), Policy(), StateStore(run.state_dir), release_grace_s=60)
    board.allocate(R1, [[DeviceId("G0-s1")]])
    settle()
    argv = ["status", "--config", str(run.config()), *run.paths()]
    shown = run.run(*argv, "--output", "json")
    assert (shown.code, shown.err) == (0, "")
    assert json.loads(shown.out) == json.loads(json.dumps(board.status()))
    table = run.run(*argv)
    assert table.code == 0
    assert "    G0-s0=free/g0  G0-s1=held/g1  G0-s2=free/g0  G0-s3=free/g0\n" in table.out
    board.close()


def test_a_flag_beats_its_environment_variable(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KYB_STATE_DIR", str(run.root / "elsewhere"))
    board = SeatBoard(seed_layout(), Policy(), StateStore(run.state_dir), release_grace_s=60)
    settle()
    done = run.run("status", "--config", str(run.config()), "--state-dir", str(run.state_dir))
    assert done.code == 0, done.err
    board.close()


def test_help_exits_0_listing_the_subcommands(run: Cli) -> None:
    with pytest.raises(SystemExit) as exited:
        run.run("--help")
    assert exited.value.code == 0
    out = run.capsys.readouterr().out
    assert all(name in out for name in ("serve", "plan", "status", "demo", "healthz"))


@pytest.fixture
def signal_pipe() -> Iterator[cli._SignalPipe]:
    kept = {n: signal.getsignal(n) for n in (signal.SIGHUP, signal.SIGUSR1)}
    pipe = cli._SignalPipe((signal.SIGHUP, signal.SIGUSR1))
    try:
        yield pipe
    finally:
        pipe.close()
        for signum, handler in kept.items():
            signal.signal(signum, handler)


def test_serve_waits_for_signals_in_order_and_none_is_lost_before_the_wait(
    signal_pipe: cli._SignalPipe,
) -> None:
    # Both came while the main thread was busy (a handler that only set an Event could
    # leave the main thread asleep on its lock): both are there, in order.
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signal_pipe.wait() == signal.SIGHUP
    assert signal_pipe.wait() == signal.SIGUSR1
    # one sent by another thread while the main thread waits wakes it
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGHUP))
    timer.start()
    assert signal_pipe.wait() == signal.SIGHUP
    timer.join()
