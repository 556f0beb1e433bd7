"""Structured log lines: text by default, JSON on request, the event's context in both."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest

from pkg.deviceplugin import logs


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger; what ``setup`` changes is put back afterwards."""
    logger = logging.getLogger()
    handlers, level, hook = list(logger.handlers), logger.level, threading.excepthook
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)
    threading.excepthook = hook
    logging.captureWarnings(False)


def _event(name: str = "pkg.deviceplugin.test") -> None:
    logging.getLogger(name).info(
        "seat bound", extra={"resource": "kyb.ai/gpu-2x-seat", "seat": "G01-s0", "gpu": 0}
    )


def test_text_lines_carry_the_context_in_brackets(root: logging.Logger) -> None:
    out = io.StringIO()
    logs.setup("text", stream=out)
    _event()
    line = out.getvalue().rstrip("\n")
    assert line.endswith("INFO    seat bound [resource=kyb.ai/gpu-2x-seat seat=G01-s0 gpu=0]")


def test_json_lines_are_one_object_with_time_level_message_and_context(
    root: logging.Logger,
) -> None:
    out = io.StringIO()
    logs.setup("json", stream=out)
    _event()
    [line] = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc.keys() == {"time", "level", "logger", "msg", "resource", "seat", "gpu"}
    assert (doc["level"], doc["msg"], doc["gpu"]) == ("info", "seat bound", 0)


def test_set_format_switches_the_installed_handler_and_leaves_others_alone(
    root: logging.Logger,
) -> None:
    out, other = io.StringIO(), io.StringIO()
    logs.setup("text", stream=out)
    foreign = logging.StreamHandler(other)
    foreign.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(foreign)
    logs.set_format("json")
    _event()
    assert json.loads(out.getvalue())["msg"] == "seat bound"
    assert other.getvalue() == "seat bound\n"
    logs.set_format("text")
    _event()
    assert out.getvalue().splitlines()[-1].endswith("seat=G01-s0 gpu=0]")


def test_a_thread_dying_of_an_exception_is_one_json_line_without_its_traceback(
    root: logging.Logger,
) -> None:
    out = io.StringIO()
    logs.setup("json", stream=out)

    def boom() -> None:
        raise RuntimeError("kubelet.sock vanished")

    thread = threading.Thread(target=boom, name="watch-kubelet")
    thread.start()
    thread.join()
    [line] = out.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["msg"]) == (
        "error",
        "thread watch-kubelet stopped: RuntimeError: kubelet.sock vanished",
    )
    assert "exception" not in doc


def test_python_warnings_become_log_lines(root: logging.Logger) -> None:
    out = io.StringIO()
    logs.setup("json", stream=out)
    warnings.warn("old flag", UserWarning, stacklevel=1)
    [line] = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["level"] == "warning" and "UserWarning: old flag" in doc["msg"]


def test_a_groups_gpus_are_a_list_in_json_and_comma_joined_in_text(
    root: logging.Logger,
) -> None:
    checks: list[tuple[str, Callable[[str], bool]]] = [
        ("json", lambda out: json.loads(out)["gpus"] == [2, 3]),
        ("text", lambda out: out.rstrip("\n").endswith("[group=G23 gpus=2,3]")),
    ]
    for fmt, check in checks:
        out = io.StringIO()
        logs.setup(fmt, stream=out)
        logging.getLogger("pkg.deviceplugin.test").info(
            "seat released", extra={"group": "G23", "gpus": (2, 3)}
        )
        assert check(out.getvalue()), out.getvalue()
