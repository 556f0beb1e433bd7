"""Structured logs: one line per event, text or JSON, carrying the resource, group, seat
and GPU an event concerns (passed as ``extra=``).

Whatever else would write to stderr goes through the same handler once :func:`setup`
ran: Python warnings, and a thread that dies of an exception (one line; its traceback
only at debug level), so that a JSON log stays one object per line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, TextIO

# ``gpu``: the one GPU an event concerns; ``gpus``: a group's GPUs (a seat's event).
CONTEXT_KEYS = ("resource", "group", "seat", "gpu", "gpus", "generation")


def _text(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{key}={_text(getattr(record, key))}" for key in CONTEXT_KEYS if hasattr(record, key)
        )
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.getMessage()}"
        if context:
            line = f"{line} [{context}]"
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            if hasattr(record, key):
                value = getattr(record, key)
                doc[key] = list(value) if isinstance(value, tuple) else value
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(fmt: str = "text", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_death


def _log_thread_death(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger(__name__).error(
        "thread %s stopped: %s: %s",
        name,
        args.exc_type.__name__,
        args.exc_value,
        exc_info=None
        if args.exc_value is None
        else (args.exc_type, args.exc_value, args.exc_traceback),
    )


def set_format(fmt: str) -> None:
    """Switch the handlers :func:`setup` installed to ``fmt`` (a live config change);
    other handlers (a test's capture) keep theirs."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, TextFormatter | JsonFormatter):
            handler.setFormatter(formatter(fmt))
