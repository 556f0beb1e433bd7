"""Durable, atomic storage of the seat ledger's JSON document, and its journal.

Every save is a complete document written to a temp file, fsync'd, renamed over the old
one, and the directory fsync'd, so a crash at any instant leaves either the old or the
new document, never a torn one; a save that fails removes its temp file.

A new binding need not wait for that: it is made durable by one line appended to
:data:`JOURNAL_FILE` and ``fdatasync``'d (a fifth of the cost on a local disk), and the
next save, which includes it, empties the journal. A load replays the journal over the
document. Every line holds whole seat entries, each with a generation above every one
its seat had before (a new binding), so a line is applied only where it raises the
seat's generation: lines a later save already holds, or that an emptying lost in a
crash left behind, change nothing, in any order. A last line without its newline was
torn by a crash before its Allocate answered and is ignored; any other line that is not
a record of this format is damage: the journal is set aside and generations may have
been lost (``lost``), as for a damaged state file.

A journal cut at a line boundary, or emptied, reads as a valid shorter one: nothing in
it can tell. So only the save at a clean stop (which holds every line, and empties the
journal) marks the document ``cleanStop``; every other save, the one at each start
included, leaves the mark out. A document without it comes from a run that may have
appended lines, and its journal is not trusted to hold them all (``crashed``: the board
starts generations above the reservation, which bounds every one handed out).

No content of the file stops the plugin (SPEC section 4). What a load keeps:

- The whole file is set aside (renamed ``state.json.corrupt-<time>``, kept for
  inspection, one error line) and the plugin starts afresh from the kubelet's
  PodResources when it is not a document of this format at all: unreadable, larger
  than :data:`MAX_FILE_BYTES`, not UTF-8, not JSON (nested too deeply for the parser
  included), not an object whose ``version`` is the integer :data:`FORMAT_VERSION`, or
  its skeleton has the wrong types: ``resources`` must be an object of objects, each
  with a ``groups`` object of objects, each with a ``seats`` object of seat entries;
  ``retired`` an object of objects of seat entries; every seat entry an object (an
  absent container counts as empty). A wrong skeleton was not written by this plugin,
  or is damaged past telling which entries are still right.
- Inside a seat entry, the values are checked: ``generation`` an integer (not a bool)
  in 0..:data:`MAX_GENERATION`; ``binding`` absent, null, or exactly what the ledger
  writes, with a generation in 1..:data:`MAX_GENERATION`, a finite ``allocatedAt``, a
  string ``group``, ``gpus`` integers in 0..:data:`MAX_GPU_INDEX`, and a ``holder``
  that is null or three strings. No coercion: ``"1"`` is not 1. An entry with a bad
  value loses its binding (PodResources shows the seat held again if it is) and keeps
  the highest valid generation among its own and its binding's, so generations still
  never go back where the file allows telling; one error line names the seat. The rest
  of the file is kept.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii as _encode_key
from pathlib import Path
from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from pkg.deviceplugin.allocator.document import (
    LedgerEntry,
    LoadedGroup,
    LoadedResource,
    LoadedState,
)
from pkg.deviceplugin.types import SIZE_CHARACTERS, GroupName

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024
"""A state or cache file larger than this is damaged, not read into memory."""
JOURNAL_FILE = "state.journal"
JOURNAL_LIMIT_BYTES = 1024 * 1024
"""A journal this long is emptied by the next binding's save of the whole document
(the board empties it right after each binding, unless bindings keep coming)."""
RESERVATION_FILE = "generations.json"
"""Next to the state file, a bound on every generation handed out, written once per
many bindings: a lost or damaged state file leaves it (see ``ledger.floor_after_loss``)."""
MAX_GENERATION = 2**63 - 1
"""Generations leave the plugin in ``KYB_SEAT_GEN``; readers may hold them in an int64."""
MAX_GPU_INDEX = 1023


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
    """Durably replace ``path`` with ``payload``: temp file, fsync, rename, dir fsync.

    Whatever fails before the rename completes removes the temp file and is re-raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DamagedFile(Exception):
    """A file that exists but cannot be used; the message says why, in one line."""


def read_json(path: Path) -> object:
    """The JSON value in ``path``: ``FileNotFoundError`` when there is none,
    :class:`DamagedFile` for anything else that keeps it from being one."""
    return parse_json(read_bounded(path))


def read_bounded(path: Path) -> bytes:
    """The bytes of ``path``: ``FileNotFoundError`` when there is none,
    :class:`DamagedFile` when it cannot be read or is over :data:`MAX_FILE_BYTES`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DamagedFile(f"unreadable ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise DamagedFile(f"larger than {MAX_FILE_BYTES} bytes")
    return data


def parse_json(data: bytes) -> object:
    """The JSON value in ``data``; :class:`DamagedFile` when it holds none."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DamagedFile(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise DamagedFile("nested too deeply") from None
    except ValueError as exc:
        raise DamagedFile(f"not valid JSON ({exc})") from None


def set_aside(path: Path) -> str:
    """Rename a damaged ``path`` to ``<name>.corrupt-<time>``; says where it went."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"could not be moved aside: {exc.strerror or exc}"
    return f"kept as {aside}"


def printable(text: str, width: int = 80) -> str:
    """Untrusted text for a log line or an error message: escaped to printable ASCII on
    one line, at most ``width`` characters of it, then how long it was."""
    shown = ascii(text[:width])[1:-1]
    return shown if len(text) <= width else f"{shown}...({len(text)} chars)"


_Int = Annotated[int, Strict()]
_Str = Annotated[str, Strict()]


class _Holder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: _Str
    pod: _Str
    container: _Str


class _Binding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation: _Int = Field(ge=1, le=MAX_GENERATION)
    allocated_at: Annotated[float, Strict()] = Field(alias="allocatedAt", allow_inf_nan=False)
    group: _Str
    gpus: list[Annotated[int, Strict(), Field(ge=0, le=MAX_GPU_INDEX)]]
    holder: _Holder | None


class _Entry(BaseModel):
    # The state file's seats also carry their status (state, why) for readers.
    model_config = ConfigDict(extra="ignore")

    generation: _Int = Field(ge=0, le=MAX_GENERATION)
    binding: _Binding | None = None


class _JournalLine(BaseModel):
    """One Allocate's new bindings: per seat its resource, ID and whole ledger entry."""

    model_config = ConfigDict(extra="forbid")

    seats: list[tuple[_Str, _Str, _Entry]] = Field(min_length=1)


class _Sidecar(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reserved: _Int = Field(ge=0, le=MAX_GENERATION)
    held_over: dict[
        Annotated[str, Field(pattern=rf"^{SIZE_CHARACTERS}$")],
        list[tuple[_Str, list[Annotated[int, Strict(), Field(ge=0, le=MAX_GPU_INDEX)]]]],
    ] = Field(default_factory=dict, alias="heldOver")


class StateStore:
    """``used_before``: a file that an earlier start left in the state directory (the
    topology cache): with it there, a missing state file was lost, not never written."""

    def __init__(self, state_dir: Path, used_before: str | None = None) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self._used_before = used_before
        self.lost: str | None = None
        """After :meth:`load`: why generations may have been lost (None: nothing was)."""
        self.crashed = False
        """After :meth:`load`: the document was not saved at a clean stop, so journal
        lines appended after it may be gone without a trace (see the module docstring)."""
        self.journal_path = state_dir / JOURNAL_FILE
        self._journal_file: io.FileIO | None = None
        self._journal_bytes = 0
        self._journal_torn = False
        self._unmarked = True
        """No save of this run has yet left a document without ``cleanStop`` on disk."""
        self.appended = 0
        """Lines appended to the journal so far (never goes back): a save whose document
        was taken at this count holds every one of them."""

    def load(self) -> LoadedState | None:
        """The saved document, checked and repaired as the module docstring says, or
        None for a fresh start (no file, or one set aside)."""
        self.lost = None
        self.crashed = False
        damaged: list[str] = []
        try:
            doc = _checked(read_json(self.path), damaged)
        except FileNotFoundError:
            if self._used_before and (self.state_dir / self._used_before).exists():
                self.lost = f"{self.path} is missing, though {self.state_dir} was used before"
            return None
        except DamagedFile as exc:
            self.lost = f"{self.path} was {exc}"
            log.error(
                "seat ledger %s is %s; %s; rebuilding from the kubelet's PodResources",
                self.path,
                exc,
                set_aside(self.path),
            )
            return None
        self.crashed = not doc["cleanStop"]
        self._replay(doc, damaged)
        if damaged:
            self.lost = f"{self.path} had damaged entries ({', '.join(damaged[:3])}...)"
        return doc

    def _replay(self, doc: LoadedState, damaged: list[str]) -> None:
        """Apply the journal's lines to ``doc`` (see the module docstring)."""
        try:
            data = read_bounded(self.journal_path)
        except FileNotFoundError:
            return
        except DamagedFile as exc:
            self._journal_damaged(str(exc), damaged)
            return
        *lines, torn = data.split(b"\n")
        if torn:
            log.warning(
                "seat journal %s ends in %d bytes without a newline: a record torn by a "
                "crash before its Allocate answered; ignored",
                self.journal_path,
                len(torn),
            )
        entries = _entry_index(doc)
        bad: list[int] = []
        for number, line in enumerate(lines, 1):
            try:
                record = _JournalLine.model_validate(parse_json(line))
            except (DamagedFile, ValidationError):
                bad.append(number)
                continue
            if any(
                e.binding is None or e.binding.generation != e.generation for *_, e in record.seats
            ):
                bad.append(number)  # not a new binding: no line the board writes
                continue
            for resource, seat, entry in record.seats:
                seats = entries.get((resource, seat))
                if seats is None:
                    seats = entries[(resource, seat)] = doc["retired"].setdefault(resource, {})
                elif entry.generation <= seats[seat]["generation"]:
                    continue  # a later save holds it
                seats[seat] = _dumped(entry)
        if bad:
            shown = ", ".join(str(number) for number in bad[:3])
            self._journal_damaged(f"damaged (line {shown} of {len(lines)})", damaged)

    def _journal_damaged(self, why: str, damaged: list[str]) -> None:
        damaged.append(JOURNAL_FILE)
        log.error(
            "seat journal %s is %s; %s; bindings it held may be lost",
            self.journal_path,
            why,
            set_aside(self.journal_path),
        )

    def save(self, doc: Mapping[str, Any], *, clean: bool = False) -> None:
        self.save_encoded({key: encode(value) for key, value in doc.items()}, clean=clean)

    def save_encoded(self, fields: Mapping[str, str], *, clean: bool = False) -> None:
        """Save a document given as its top-level fields, each already ``encode``d.

        The board keeps the encoded parts of the document that did not change, so a
        save re-encodes only what did; the file is the same as ``save`` would write.
        ``clean``: the save at a clean stop, which marks the document ``cleanStop``.
        """
        marks = {"version": encode(FORMAT_VERSION)}
        if clean:
            marks["cleanStop"] = encode(True)
        self._unmarked = True  # until the file on disk says which it is
        self.write(encode_object({**fields, **marks}))
        self._unmarked = clean

    def write(self, payload: str) -> None:
        """Durably replace the state file with ``payload``."""
        atomic_write(self.path, payload)

    @property
    def journal_full(self) -> bool:
        """Whether the next binding must save the whole document instead of appending:
        the journal is long, an append failed part way (a torn line must not be
        followed by another), or no save of this run has yet replaced a document marked
        ``cleanStop`` (a line after it would be trusted to be the last)."""
        return self._unmarked or self._journal_torn or self._journal_bytes >= JOURNAL_LIMIT_BYTES

    def append(self, seats: Sequence[tuple[str, str, LedgerEntry]]) -> None:
        """Durably add one line to the journal: these seats' ledger entries, each a new
        binding. Raises ``OSError`` when it may not have reached the disk."""
        data = (encode({"seats": [list(seat) for seat in seats]}) + "\n").encode()
        try:
            journal = self._journal()
            self._journal_torn = True  # until the line is whole and synced
            if journal.write(data) != len(data):
                raise OSError(errno.ENOSPC, "short write to the seat journal")
            os.fdatasync(journal.fileno())
        except OSError:
            self._close_journal()
            raise
        self._journal_torn = False
        self._journal_bytes += len(data)
        self.appended += 1

    def empty_journal(self) -> None:
        """After a save that holds every line appended: start the journal afresh. A
        failure is logged; the lines left change nothing at a load, and the next
        binding saves the whole document (and tries again)."""
        try:
            self._journal().truncate(0)
        except OSError as exc:
            self._close_journal()
            self._journal_torn = True
            log.error("could not empty the seat journal %s: %s", self.journal_path, exc)
            return
        self._journal_torn = False
        self._journal_bytes = 0

    def close(self) -> None:
        self._close_journal()

    def _journal(self) -> io.FileIO:
        if self._journal_file is None:
            created = not self.journal_path.exists()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._journal_file = io.FileIO(self.journal_path, "a")
            self._journal_bytes = os.fstat(self._journal_file.fileno()).st_size
            if created:  # the file itself must survive a crash, not only its lines
                _fsync_dir(self.state_dir)
        return self._journal_file

    def _close_journal(self) -> None:
        if self._journal_file is not None:
            with contextlib.suppress(OSError):
                self._journal_file.close()
            self._journal_file = None

    def sidecar(self) -> tuple[int, dict[int, list[tuple[GroupName, tuple[int, ...]]]]]:
        """What :data:`RESERVATION_FILE` keeps: the generation reservation (every
        generation ever handed out is below it; 0 when there is none) and the groups
        held over from an earlier config or topology (per group size, name and GPU
        indices: what a seat adopted after a lost ledger is bound on). A damaged file is
        set aside and counts as none."""
        path = self.state_dir / RESERVATION_FILE
        try:
            doc = read_json(path)
        except FileNotFoundError:
            return 0, {}
        except DamagedFile as exc:
            log.error("generation reservation %s is %s; %s", path, exc, set_aside(path))
            return 0, {}
        try:
            checked = _Sidecar.model_validate(doc)
        except ValidationError:
            log.error("generation reservation %s is damaged; %s", path, set_aside(path))
            return 0, {}
        held = {
            int(size): [(GroupName(name), tuple(gpus)) for name, gpus in groups]
            for size, groups in checked.held_over.items()
        }
        return checked.reserved, held

    def save_sidecar(
        self, reserved: int, held_over: Mapping[int, Sequence[tuple[str, Sequence[int]]]]
    ) -> None:
        """Durably record the reservation and the held-over groups."""
        doc = {
            "reserved": reserved,
            "heldOver": {
                str(size): [[name, list(gpus)] for name, gpus in groups]
                for size, groups in held_over.items()
            },
        }
        atomic_write(self.state_dir / RESERVATION_FILE, encode(doc))


def _checked(doc: object, damaged: list[str]) -> LoadedState:
    """``doc`` cut down to what the ledger reads, with damaged entries repaired; raises
    :class:`DamagedFile` for a document that is not of this format at all."""
    if not isinstance(doc, dict):
        raise DamagedFile(f"not a ledger document (a JSON {_json_type(doc)})")
    version = doc.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        found = printable(repr(version))
        raise DamagedFile(f"of unknown format version {found} (expected {FORMAT_VERSION})")
    resources: dict[str, LoadedResource] = {}
    for resource, body in _objects(doc, "resources").items():
        groups: dict[str, LoadedGroup] = {}
        for group, group_body in _objects(body, "groups", f"resources/{resource}").items():
            seats = _objects(group_body, "seats", f"resources/{resource}/groups/{group}")
            groups[group] = {"seats": _entries(resource, seats, damaged)}
        resources[resource] = {"groups": groups}
    retired = {
        resource: _entries(resource, _objects(seats, None, f"retired/{resource}"), damaged)
        for resource, seats in _objects(doc, "retired").items()
    }
    floor = doc.get("generationFloor", 0)
    if type(floor) is not int or not 0 <= floor <= MAX_GENERATION:
        damaged.append("generationFloor")
        floor = 0
    # a lost ledger not yet rebuilt from PodResources when this was written
    awaiting = doc.get("awaitingList", False) is not False
    return {
        "version": FORMAT_VERSION,
        "resources": resources,
        "retired": retired,
        "generationFloor": floor,
        "awaitingList": awaiting,
        # written only by the save at a clean stop: anything else may have a journal
        "cleanStop": doc.get("cleanStop") is True,
    }


def _entry_index(doc: LoadedState) -> dict[tuple[str, str], dict[str, LedgerEntry]]:
    """Where each seat's entry is in a checked document: (resource, seat) -> the seats
    object holding it (a group's, or the retired ones)."""
    index: dict[tuple[str, str], dict[str, LedgerEntry]] = {}
    for resource, seats in doc["retired"].items():
        index.update(((resource, seat), seats) for seat in seats)
    for resource, body in doc["resources"].items():
        for group in body["groups"].values():
            index.update(((resource, seat), group["seats"]) for seat in group["seats"])
    return index


def _objects(parent: dict[str, Any], key: str | None, where: str = "") -> dict[str, dict[str, Any]]:
    """``parent[key]`` (``parent`` itself when ``key`` is None): an object of objects,
    absent meaning empty; anything else is a wrong skeleton."""
    value = parent if key is None else parent.get(key, {})
    path = "/".join(part for part in (where, key) if part)
    if not isinstance(value, dict):
        raise DamagedFile(f"damaged: {printable(path)} is a JSON {_json_type(value)}")
    for child, body in value.items():
        if not isinstance(body, dict):
            child_path = printable(f"{path}/{child}")
            raise DamagedFile(f"damaged: {child_path} is a JSON {_json_type(body)}")
    return value


def _entries(
    resource: str, seats: dict[str, dict[str, Any]], damaged: list[str]
) -> dict[str, LedgerEntry]:
    return {seat: _entry(resource, seat, raw, damaged) for seat, raw in seats.items()}


def _entry(resource: str, seat: str, raw: dict[str, Any], damaged: list[str]) -> LedgerEntry:
    """One seat entry, checked; a damaged one keeps only its best generation."""
    try:
        return _dumped(_Entry.model_validate(raw))
    except ValidationError as exc:
        damaged.append(printable(f"{resource}/{seat}"))
        problem = exc.errors()[0]
        binding = raw.get("binding")
        found = [
            raw.get("generation"),
            binding.get("generation") if isinstance(binding, dict) else None,
        ]
        generation = max(
            (g for g in found if type(g) is int and 0 <= g <= MAX_GENERATION), default=0
        )
        log.error(
            "seat ledger entry %s/%s is damaged (%s: %s); dropping its binding, "
            "keeping generation %d",
            printable(resource),
            printable(seat),
            printable(".".join(str(part) for part in problem["loc"])),
            problem["msg"],
            generation,
        )
        return {"generation": generation}


def _dumped(entry: _Entry) -> LedgerEntry:
    # the model has exactly the entry's fields and aliases (checked by its tests)
    return cast("LedgerEntry", entry.model_dump(by_alias=True))


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}
