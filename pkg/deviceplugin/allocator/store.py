"""Durable, atomic storage of the seat ledger's JSON document.

Every save is a complete document written to a temp file, fsync'd, renamed over the old
one, and the directory fsync'd, so a crash at any instant leaves either the old or the
new document, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _encode_key
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT_VERSION = 1


def encode(value: Any) -> str:
    """``value`` as the state file holds it: JSON, keys sorted, compact.

    Compact separators keep json on its C encoder; ``indent`` would force the pure
    Python one, several milliseconds per save on a 16-GPU node (see bench/README.md).
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def encode_object(fields: Mapping[str, str]) -> str:
    """A JSON object from already encoded values: ``encode_object({k: encode(v) for k, v
    in d.items()}) == encode(d)`` for any dict ``d`` with string keys."""
    return "{" + ",".join(f"{_encode_key(key)}:{fields[key]}" for key in sorted(fields)) + "}"


def atomic_write(path: Path, payload: str) -> None:
    """Durably replace ``path`` with ``payload``: temp file, fsync, rename, dir fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved document, or None for a fresh start.

        A corrupt or unreadable file is moved aside (kept for inspection) and reported
        in one log line; the caller rebuilds from the kubelet's PodResources.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._set_aside(f"unreadable ({exc.strerror})")
            return None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            self._set_aside(f"not valid JSON ({exc})")
            return None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            found = doc.get("version") if isinstance(doc, dict) else type(doc).__name__
            self._set_aside(f"unknown format version {found!r} (expected {FORMAT_VERSION})")
            return None
        return doc

    def save(self, doc: Mapping[str, Any]) -> None:
        self.save_encoded({key: encode(value) for key, value in doc.items()})

    def save_encoded(self, fields: Mapping[str, str]) -> None:
        """Save a document given as its top-level fields, each already ``encode``d.

        The board keeps the encoded parts of the document that did not change, so a
        save re-encodes only what did; the file is the same as ``save`` would write.
        """
        self.write(encode_object({**fields, "version": encode(FORMAT_VERSION)}))

    def write(self, payload: str) -> None:
        """Durably replace the state file with ``payload``."""
        atomic_write(self.path, payload)

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
        try:
            os.replace(self.path, aside)
            kept = f"kept as {aside}"
        except OSError as exc:
            kept = f"could not be moved aside: {exc.strerror}"
        log.error(
            "seat ledger %s is %s; %s; rebuilding from the kubelet's PodResources",
            self.path,
            why,
            kept,
        )
