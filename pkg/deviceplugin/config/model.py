"""The plugin's configuration as validated data.

This is the one place where untrusted YAML becomes typed values, so every field is
checked here and the models are frozen: the running plugin swaps whole ``Config``
objects on hot reload and never edits one in place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pkg.deviceplugin.types import (
    GROUP_SIZES,
    RESOURCE_PATTERN,
    CudaVisibleDevices,
    DeviceListStrategy,
    GroupName,
    PlacementPolicy,
    ResourceName,
    XidRecovery,
    group_size_of,
)

Loc = tuple[str | int, ...]

# Device IDs are ``<group>-s<k>`` and must stay within the 63 characters the kubelet
# and CRI annotations tolerate; with k < 64 the suffix takes at most 4 of them.
MAX_SEATS_PER_GROUP = 64
MAX_GROUP_NAME_LENGTH = 59
GROUP_NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_GROUP_NAME_LENGTH - 1}}}$")


class EntryProblems(ValueError):
    """Problems that span several list entries, each with its own key path.

    A validator on a whole list can only fail the list; carrying the entry paths lets
    the loader say ``groups[2].name`` instead of just ``groups``.
    """

    def __init__(self, problems: Sequence[tuple[Loc, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{loc_text(loc)}: {text}" for loc, text in problems))


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def loc_text(loc: Loc) -> str:
    """``groups[2].name``; a key that is not a plain word (a node name with dots, a
    resource name) in brackets: ``nodes[ip-10-0-0-1.ec2.internal].drain``."""
    text = ""
    for part in loc:
        if isinstance(part, int) or (text and not _PLAIN_KEY.match(part)):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


_DURATION_PART = re.compile(
    r"(?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)(?P<unit>ms|h|m|s)"
)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: object) -> float:
    """Seconds from a number or a Go-style duration string (``500ms``, ``1m30s``)."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 500ms or 1m30s")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip())
    else:
        raise ValueError("must be a duration such as 30s, 500ms or 1m30s")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("must be a duration > 0")
    return seconds


def _parse_duration_text(text: str) -> float:
    if not text:
        raise ValueError("must be a duration such as 30s, 500ms or 1m30s")
    try:
        return float(text)
    except ValueError:
        pass
    position, seconds = 0, 0.0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            raise ValueError("must be a duration such as 30s, 500ms or 1m30s")
        seconds += float(part["number"]) * _UNIT_SECONDS[part["unit"]]
        position = part.end()
    return seconds


def format_duration(seconds: float) -> str:
    """A readable form of ``seconds`` that :func:`parse_duration` reads back exactly."""
    if seconds != int(seconds):
        return f"{seconds!r}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes and secs:
        return f"{minutes}m{secs}s"
    return f"{minutes}m" if minutes else f"{secs}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]


def _non_empty_path(value: object) -> object:
    # Path("") is ".", which would quietly point the plugin at its working directory.
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a non-empty path")
    return value


ConfigPath = Annotated[Path, BeforeValidator(_non_empty_path)]


def _group_name(value: object) -> object:
    if isinstance(value, str) and not GROUP_NAME_PATTERN.match(value):
        raise ValueError(
            f"must be 1-{MAX_GROUP_NAME_LENGTH} characters of letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return value


CheckedGroupName = Annotated[GroupName, Field(strict=True), BeforeValidator(_group_name)]

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*):(?P<port>[0-9]{1,5})$")


def _host_port(value: object) -> object:
    if isinstance(value, str):
        match = _HOST_PORT.match(value)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise ValueError("must be HOST:PORT (e.g. 0.0.0.0:9400, [::]:9400 or :9400)")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


SeatCount = Annotated[StrictInt, Field(ge=1, le=MAX_SEATS_PER_GROUP)]


class Profile(_Model):
    """One extended resource and how many seats each of its groups offers."""

    resource: Annotated[ResourceName, Field(strict=True)]
    seats_per_group: SeatCount

    @field_validator("resource", mode="before")
    @classmethod
    def _known_resource(cls, value: object) -> object:
        if isinstance(value, str) and not RESOURCE_PATTERN.match(value):
            raise ValueError("must be kyb.ai/gpu-<1|2|4>x-seat")
        return value

    @property
    def group_size(self) -> int:
        """GPUs per group, read off the resource name."""
        return group_size_of(self.resource)


class GroupSpec(_Model):
    """An operator-fixed group; GPU indices are checked against the topology later."""

    name: CheckedGroupName
    gpus: tuple[Annotated[StrictInt, Field(ge=0)], ...]
    seats_per_group: SeatCount | None = None
    """This group's seats, in place of its profile's seatsPerGroup."""

    @field_validator("gpus")
    @classmethod
    def _sized_and_distinct(cls, gpus: tuple[int, ...]) -> tuple[int, ...]:
        if len(gpus) not in GROUP_SIZES:
            raise ValueError("must list 1, 2 or 4 GPUs")
        if len(set(gpus)) != len(gpus):
            raise ValueError("must not list a GPU twice")
        return gpus

    @property
    def size(self) -> int:
        return len(self.gpus)


def _gpu_ref(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a GPU index (a number) or a GPU UUID")
    if isinstance(value, int) and value < 0:
        raise ValueError("must be a GPU index >= 0 or a GPU UUID")
    if isinstance(value, str) and (not value or value.isdigit() or any(c.isspace() for c in value)):
        raise ValueError("must be a GPU UUID (GPU-...), or an index written as a number")
    return value


GpuRef = Annotated[int | str, BeforeValidator(_gpu_ref)]
"""A GPU by NVML index (a number) or by UUID (a string)."""


def _check_groups(groups: tuple[GroupSpec, ...]) -> tuple[GroupSpec, ...]:
    problems: list[tuple[Loc, str]] = []
    names: dict[str, int] = {}
    # A GPU may sit in one group per size (that is overprovisioning), never in two.
    owners: dict[tuple[int, int], int] = {}
    for i, group in enumerate(groups):
        if group.name in names:
            problems.append(
                (
                    (i, "name"),
                    f"duplicate group name {group.name!r} (also groups[{names[group.name]}])",
                )
            )
        else:
            names[group.name] = i
        for gpu in group.gpus:
            owner = owners.setdefault((group.size, gpu), i)
            if owner != i:
                problems.append(
                    (
                        (i, "gpus"),
                        f"GPU {gpu} is already in {group.size}-GPU group "
                        f"{groups[owner].name!r} (groups[{owner}])",
                    )
                )
    if problems:
        raise EntryProblems(problems)
    return groups


class NodeOverride(_Model):
    """One node's changes to the pool-wide config: each key it sets replaces the
    pool-wide value on that node (lists are not merged); ``seatsPerGroup`` replaces
    the seat counts of the profiles it names."""

    drain: tuple[CheckedGroupName, ...] | None = None
    """Group names that take no new seats on this node."""
    drain_gpus: tuple[GpuRef, ...] | None = None
    """GPUs of this node (index or UUID) whose groups take no new seats."""
    seats_per_group: dict[Annotated[str, Field(strict=True)], SeatCount] | None = None
    """Seats per group by profile resource, for the profiles named."""
    groups: tuple[GroupSpec, ...] | None = None
    """This node's explicit groups, in place of the pool-wide ones."""

    @field_validator("groups")
    @classmethod
    def _distinct_names_and_gpus(
        cls, groups: tuple[GroupSpec, ...] | None
    ) -> tuple[GroupSpec, ...] | None:
        return None if groups is None else _check_groups(groups)

    def to_data(self) -> dict[str, Any]:
        """The keys this override sets, camelCase, as the file spells them."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


DEFAULT_IGNORED_XIDS = (13, 31, 43, 45, 68, 109)
"""Application-level XIDs NVIDIA's device plugin ignores too: the application's own
faults (13 graphics exception, 31 memory page fault, 43 stopped channel, 45 preemptive
cleanup, 68 video decoder exception, 109 context switch timeout), not the GPU's."""


class Config(_Model):
    """The whole plugin configuration (``config.yaml``, after flag and env overrides).

    The attribute docstrings double as the ``--help`` text of the matching flags.
    """

    version: Literal["v1"] = "v1"
    profiles: Annotated[tuple[Profile, ...], Field(min_length=1)]
    """The seat resources to serve, each with its seatsPerGroup (a YAML list)."""
    groups: tuple[GroupSpec, ...] = ()
    """Explicit GPU groups; they replace auto grouping for their size (a YAML list)."""
    allow_overprovision: bool = False
    """Offer every profile's seats even where their GPUs overlap a held seat of another."""
    preferred_allocation_policy: PlacementPolicy = "spread"
    """Prefer seats on the least used groups (spread) or fill groups up first (pack)."""
    device_list_strategy: DeviceListStrategy = "envvar"
    """Hand GPUs to containers as device specs (envvar) or as CDI device names (cdi)."""
    cuda_visible_devices: CudaVisibleDevices = "ordinal"
    """What CUDA_VISIBLE_DEVICES lists: the container's own ordinals 0..n-1 (ordinal:
    under the NVIDIA runtime or CDI a container sees only its GPUs), host indices (index:
    containers that see every GPU), or UUIDs (uuid: right in both cases)."""
    drain: tuple[CheckedGroupName, ...] = ()
    """Group names that take no new seats (comma-separated or a YAML list)."""
    drain_gpus: tuple[GpuRef, ...] = ()
    """GPUs, by index or UUID, whose groups in every profile take no new seats
    (comma-separated or a YAML list)."""
    nodes: dict[Annotated[str, Field(strict=True, min_length=1)], NodeOverride] = Field(
        default_factory=dict
    )
    """Per-node overrides: node name (KYB_NODE_NAME) -> drain, drainGpus, seatsPerGroup
    (by resource) and groups for that node only (a YAML mapping)."""
    refresh_interval: Duration = 30.0
    """How often the GPU topology is read again (e.g. 30s)."""
    reconcile_interval: Duration = 10.0
    """How often held seats are checked against the kubelet's PodResources (e.g. 10s)."""
    release_grace_period: Duration = 60.0
    """How long a seat stays held when its pod never shows up in PodResources (e.g. 60s)."""
    handoff_window: Duration = 2.0
    """How soon after a seat's Allocate the same seat's next Allocate may still be the
    kubelet handing an init container's seat to the next container of the same pod
    (same generation); later it is a new holder (e.g. 2s)."""
    health_probe_interval: Duration = 1.0
    """How often each GPU is probed for health (e.g. 1s); a lost GPU shows within one interval."""
    healthy_after_probes: Annotated[StrictInt, Field(ge=1)] = 3
    """Consecutive good probes before a failed GPU counts as healthy again."""
    ignored_xids: tuple[Annotated[StrictInt, Field(ge=0)], ...] = DEFAULT_IGNORED_XIDS
    """Application-level XID events that do not mark a GPU unhealthy (comma-separated).
    Setting it replaces the defaults; to add to them, use extraIgnoredXids."""
    extra_ignored_xids: tuple[Annotated[StrictInt, Field(ge=0)], ...] = ()
    """XID events ignored on top of ignoredXids (comma-separated), e.g. 94."""
    xid_recovery: XidRecovery = "probes"
    """Whether a GPU marked by a critical XID comes back once its probes pass (probes)
    or only after a plugin restart (never)."""
    kubelet_dir: ConfigPath = Path("/var/lib/kubelet/device-plugins")
    """The kubelet's device-plugin directory (holds kubelet.sock and the plugin sockets)."""
    pod_resources_socket: ConfigPath = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
    """The kubelet's PodResources socket."""
    state_dir: ConfigPath = Path("/var/lib/kyb/device-plugin")
    """Where the seat ledger is persisted."""
    log_format: Literal["text", "json"] = "text"
    """Log line format."""
    metrics_address: Annotated[str | None, BeforeValidator(_host_port)] = None
    """HOST:PORT to serve Prometheus metrics on; unset means no metrics endpoint."""

    @field_validator("profiles")
    @classmethod
    def _unique_resources(cls, profiles: tuple[Profile, ...]) -> tuple[Profile, ...]:
        first: dict[str, int] = {}
        problems: list[tuple[Loc, str]] = []
        for i, profile in enumerate(profiles):
            if profile.resource in first:
                problems.append(
                    (
                        (i, "resource"),
                        f"duplicate resource {profile.resource!r} "
                        f"(also profiles[{first[profile.resource]}])",
                    )
                )
            else:
                first[profile.resource] = i
        if problems:
            raise EntryProblems(problems)
        return profiles

    @field_validator("groups")
    @classmethod
    def _distinct_names_and_gpus(cls, groups: tuple[GroupSpec, ...]) -> tuple[GroupSpec, ...]:
        return _check_groups(groups)

    @model_validator(mode="after")
    def _overrides_name_profiles(self) -> Config:
        problems: list[tuple[Loc, str]] = []
        served = self.resources
        for node, override in self.nodes.items():
            for resource in override.seats_per_group or {}:
                if resource not in served:
                    problems.append(
                        (
                            ("nodes", node, "seatsPerGroup", resource),
                            f"no profile serves {resource!r} (profiles: {', '.join(served)})",
                        )
                    )
        if problems:
            raise EntryProblems(problems)
        return self

    def for_node(self, node: str | None) -> Config:
        """The config in force on ``node``: this one with its override applied (this
        one itself where the config has no override for it)."""
        override = self.nodes.get(node) if node else None
        if override is None:
            return self
        update: dict[str, Any] = {
            name: value
            for name in ("drain", "drain_gpus", "groups")
            if (value := getattr(override, name)) is not None
        }
        counts = override.seats_per_group
        if counts:
            update["profiles"] = tuple(
                p.model_copy(update={"seats_per_group": counts[p.resource]})
                if p.resource in counts
                else p
                for p in self.profiles
            )
        return self.model_copy(update=update)

    @property
    def resources(self) -> tuple[ResourceName, ...]:
        return tuple(p.resource for p in self.profiles)

    @property
    def all_ignored_xids(self) -> frozenset[int]:
        """Every XID the health monitor ignores: ignoredXids and extraIgnoredXids."""
        return frozenset((*self.ignored_xids, *self.extra_ignored_xids))

    @property
    def dropped_default_xids(self) -> tuple[int, ...]:
        """The default-ignored XIDs that this config's ignoredXids leaves out (and
        extraIgnoredXids does not add back): they now mark a GPU unhealthy."""
        return tuple(x for x in DEFAULT_IGNORED_XIDS if x not in self.all_ignored_xids)

    def profile(self, resource: ResourceName | str) -> Profile | None:
        return next((p for p in self.profiles if p.resource == resource), None)

    def groups_of_size(self, size: int) -> tuple[GroupSpec, ...]:
        """The explicit groups of one size; empty means that size is auto-grouped."""
        return tuple(g for g in self.groups if g.size == size)

    def to_data(self) -> dict[str, Any]:
        """The camelCase mapping that the loader accepts, with plain YAML scalars."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False, default_flow_style=None)


def builtin_default() -> Config:
    """The seed's two profiles with auto grouping: what runs when no config file exists."""
    return Config(
        profiles=(
            Profile(resource=ResourceName("kyb.ai/gpu-1x-seat"), seats_per_group=4),
            Profile(resource=ResourceName("kyb.ai/gpu-2x-seat"), seats_per_group=3),
        )
    )
