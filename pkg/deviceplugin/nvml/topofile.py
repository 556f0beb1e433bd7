"""The NVML mock topology file (SPEC 9): untrusted YAML/JSON in, a checked model out.

The file is the one source of truth for every mock: :mod:`.mock` serves it directly,
the C mock library (``mocklib/``) serves a flattened copy of it, and tests build fake
``pynvml`` modules from it. So every problem is caught here, once, and reported as one
line per problem naming the file and the key path (``x.yaml: gpus[2].minor: ...``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pkg.deviceplugin import boundedyaml
from pkg.deviceplugin.nvml.backend import NvmlError
from pkg.deviceplugin.types import Gpu, Link, LinkKind, Topology

_PCI_BUS_ID = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<device>[0-9a-fA-F]{1,2})\.(?P<function>[0-7])$"
)


def normalize_pci_bus_id(text: str) -> str:
    """The form NVML prints (``00000000:07:00.0``), whatever the input's domain width or case.

    NVML has used both a 4- and an 8-hex-digit domain over the years and sysfs spells it
    in lower case; one canonical spelling lets mock and real discovery compare equal.
    """
    match = _PCI_BUS_ID.match(text.strip())
    if match is None:
        raise ValueError(f"not a PCI bus id: {text!r} (expected e.g. '00000000:07:00.0')")
    domain = int(match["domain"] or "0", 16)
    bus, device, function = int(match["bus"], 16), int(match["device"], 16), match["function"]
    return f"{domain:08X}:{bus:02X}:{device:02X}.{function}"


_Int = Annotated[int, Strict()]
_Float = Annotated[float, Strict()]
_Str = Annotated[str, Strict()]


class _Model(BaseModel):
    # camelCase aliases are the file's spelling (SPEC 9); scalars are Strict so that
    # YAML's guesses (a bool or a float where a string belongs) are errors, not coercions.
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


class GpuEntry(_Model):
    """One ``gpus[]`` entry."""

    index: _Int = Field(ge=0)
    uuid: _Str = Field(min_length=1, pattern=r"^\S+$")
    name: _Str = Field(min_length=1)
    memory_mib: _Int = Field(alias="memoryMiB", ge=0)
    pci_bus_id: str
    minor: _Int = Field(ge=0)
    numa_node: _Int | None = Field(default=None, ge=0)

    @field_validator("pci_bus_id", mode="before")
    @classmethod
    def _bus_id(cls, value: object) -> str:
        if not isinstance(value, str):
            # YAML 1.1 reads an unquoted 00000000:07:00.0 as a base-60 number.
            raise ValueError(f'must be a quoted string like "00000000:07:00.0", got {value!r}')
        return normalize_pci_bus_id(value)

    def gpu(self) -> Gpu:
        return Gpu(
            index=self.index,
            uuid=self.uuid,
            name=self.name,
            memory_mib=self.memory_mib,
            pci_bus_id=self.pci_bus_id,
            minor=self.minor,
            numa_node=self.numa_node,
        )


RecoveryAction = Literal["none", "gpuReset", "nodeReboot", "drainP2P", "drainAndReset"]
RECOVERY_ACTION_CODES: dict[str, int] = {
    "none": 0,
    "gpuReset": 1,
    "nodeReboot": 2,
    "drainP2P": 3,
    "drainAndReset": 4,
}
"""``nvmlDeviceGpuRecoveryAction_t`` (NVML_GPU_RECOVERY_ACTION_NONE, _GPU_RESET, ...)."""


class Fault(_Model):
    """One scripted ``faults[]`` entry; ``at`` counts from the backend's start."""

    gpu: _Int = Field(ge=0)
    at: _Float = Field(ge=0)
    kind: Literal["lost", "xid"]
    recover_after: _Float | None = Field(default=None, gt=0)
    xid: _Int | None = Field(default=None, gt=0)
    recovery_action: RecoveryAction | None = None
    """What the driver's GPU recovery action field reads after this XID; absent: the
    driver has no such field (older drivers), and the XID decides (README)."""

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Fault:
        if self.kind == "lost" and self.recovery_action is not None:
            raise ValueError("recoveryAction belongs to kind xid, not lost")
        if self.kind == "lost" and self.xid is not None:
            raise ValueError("xid belongs to kind xid, not lost")
        if self.kind == "xid" and self.xid is None:
            raise ValueError("kind xid needs the xid number (e.g. xid: 79)")
        if self.kind == "xid" and self.recover_after is not None:
            raise ValueError("recoverAfter belongs to kind lost, not xid")
        return self

    @property
    def recovers_at(self) -> float | None:
        """Seconds after start when a lost GPU is back; ``None``: never (or not lost)."""
        if self.kind != "lost" or self.recover_after is None:
            return None
        return self.at + self.recover_after


class _Problems(ValueError):
    """Several located problems found by the whole-file checks, reported one per line."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in self.problems))


class TopologyFile(_Model):
    """A whole mock topology file; construction guarantees a consistent topology."""

    version: Literal["v1"] = "v1"
    gpus: tuple[GpuEntry, ...]
    links: tuple[tuple[_Str, ...], ...]
    faults: tuple[Fault, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> TopologyFile:
        problems = [*_gpu_problems(self.gpus), *_link_problems(self.gpus, self.links)]
        known = {g.index for g in self.gpus}
        for k, fault in enumerate(self.faults):
            if fault.gpu not in known:
                problems.append(
                    (f"faults[{k}].gpu", f"no GPU with index {fault.gpu} (have {sorted(known)})")
                )
        if problems:
            raise _Problems(problems)
        return self

    def link_matrix(self) -> list[list[Link]]:
        return [[Link.parse(word) for word in row] for row in self.links]

    def topology(self) -> Topology:
        """Every GPU of the file with every pair's link (faults not applied)."""
        return Topology.from_matrix((g.gpu() for g in self.gpus), self.link_matrix())

    @classmethod
    def from_topology(cls, topology: Topology, faults: Iterable[Fault] = ()) -> TopologyFile:
        """The file that describes ``topology`` (for writing fixtures and round trips)."""
        return cls(
            gpus=tuple(
                GpuEntry(
                    index=g.index,
                    uuid=g.uuid,
                    name=g.name,
                    memoryMiB=g.memory_mib,
                    pci_bus_id=g.pci_bus_id,
                    minor=g.minor,
                    numa_node=g.numa_node,
                )
                for g in topology.gpus
            ),
            links=tuple(tuple(link.word for link in row) for row in topology.matrix()),
            faults=tuple(faults),
        )

    def to_data(self) -> dict[str, Any]:
        """Plain data in the file's own spelling, ready for ``yaml.safe_dump``."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True) | {
            "version": self.version
        }


def _gpu_problems(gpus: Sequence[GpuEntry]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key in ("index", "uuid", "minor", "pci_bus_id"):
        seen: dict[object, int] = {}
        for k, entry in enumerate(gpus):
            value = getattr(entry, key)
            if value in seen:
                problems.append(
                    (
                        f"gpus[{k}].{to_camel(key)}",
                        f"duplicate {value!r} (also gpus[{seen[value]}])",
                    )
                )
            else:
                seen[value] = k
    for k in range(1, len(gpus)):
        if gpus[k].index < gpus[k - 1].index:
            problems.append(
                (
                    f"gpus[{k}].index",
                    f"{gpus[k].index} comes after {gpus[k - 1].index}; list GPUs by ascending "
                    "index (the rows and columns of links follow this order)",
                )
            )
    return problems


def _link_problems(
    gpus: Sequence[GpuEntry], rows: Sequence[Sequence[str]]
) -> list[tuple[str, str]]:
    n = len(gpus)
    widths = {len(row) for row in rows}
    if len(rows) != n or widths - {n}:
        shape = f"{len(rows)}x{'/'.join(str(w) for w in sorted(widths)) or 0}"
        return [("links", f"matrix is {shape}, expected {n}x{n} (one row and column per GPU)")]
    problems: list[tuple[str, str]] = []
    parsed: dict[tuple[int, int], Link] = {}
    for i, row in enumerate(rows):
        for j, word in enumerate(row):
            try:
                parsed[i, j] = Link.parse(word)
            except ValueError as exc:
                problems.append((f"links[{i}][{j}]", str(exc)))
    for (i, j), link in sorted(parsed.items()):
        if i == j and link.kind is not LinkKind.SELF:
            problems.append((f"links[{i}][{j}]", f"the diagonal must be X, got {link.word}"))
        elif i != j and link.kind is LinkKind.SELF:
            problems.append((f"links[{i}][{j}]", "X belongs only on the diagonal"))
        elif (
            i < j
            and (j, i) in parsed
            and parsed[j, i].kind is not LinkKind.SELF
            and parsed[j, i] != link
        ):
            problems.append(
                (
                    f"links[{i}][{j}]",
                    f"{link.word} but links[{j}][{i}] is {parsed[j, i].word}; "
                    "the matrix must be symmetric",
                )
            )
    return problems


class TopologyFileError(NvmlError):
    """A mock topology file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


def _loc(parts: Iterable[int | str]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _validation_lines(source: str, error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors():
        cause = item.get("ctx", {}).get("error")
        prefix = _loc(item["loc"])
        if isinstance(cause, _Problems):
            lines += [f"{source}: {_join(prefix, path)}: {msg}" for path, msg in cause.problems]
            continue
        msg = item["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {prefix or '(top level)'}: {msg}")
    return lines


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def parse_topology_data(data: object, source: str) -> TopologyFile:
    """Validate already-parsed data; ``source`` names it in error lines."""
    if data is None:
        raise TopologyFileError([f"{source}: the file is empty (expected gpus and links)"])
    if not isinstance(data, dict):
        raise TopologyFileError(
            [f"{source}: expected a mapping with gpus and links, got {type(data).__name__}"]
        )
    try:
        return TopologyFile.model_validate(data)
    except ValidationError as exc:
        raise TopologyFileError(_validation_lines(source, exc)) from None


def load_topology_file(path: str | Path) -> TopologyFile:
    """Read a mock topology file (``.json`` as JSON, anything else as YAML)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TopologyFileError([f"{source}: cannot read: {reason}"]) from None
    try:
        if source.endswith(".json"):
            if len(text) > boundedyaml.MAX_BYTES:
                raise TopologyFileError(
                    [
                        f"{source}: file is {len(text)} bytes, more than the "
                        f"{boundedyaml.MAX_BYTES} allowed"
                    ]
                )
            data = json.loads(text)
        else:
            data = boundedyaml.load(text, source)
    except json.JSONDecodeError as exc:
        raise TopologyFileError(
            [f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]
        ) from None
    except RecursionError:
        raise TopologyFileError([f"{source}: JSON nested too deeply"]) from None
    except boundedyaml.YamlError as exc:
        raise TopologyFileError([str(exc)]) from None
    return parse_topology_data(data, source)
