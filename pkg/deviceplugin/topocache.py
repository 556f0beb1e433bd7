"""The topology cache: the GPUs the plugin last knew, kept next to the seat ledger.

While the process lives, a GPU that falls off the bus keeps its groups (they go
Unhealthy and come back with it). A plugin that starts while a GPU is off the bus
would not know that GPU at all: the groups holding seats on it would drop out of the
layout under their workloads, and their free seats vanish from ListAndWatch. So the
runtime writes the topology it serves to ``<stateDir>/topology.json`` (the mock
topology file's format, SPEC section 9) and, at start, brings back from it the
missing GPUs that held seats need; they are probed by UUID like any other and come
back Healthy when the GPU does. A missing GPU that no held seat needs stays out: a GPU
taken out of the node for good does not haunt the layout.

No content of the cache stops the plugin: a file that cannot be used (unreadable, too
large, not UTF-8 or JSON, nested too deeply, or not a valid topology) is set aside as
``topology.json.corrupt-<time>`` with one warning, and the start goes on without it.
Setting it aside rather than ignoring it keeps the bad bytes for inspection: the
runtime writes a fresh cache right after every start, which would overwrite them. It
is also what the seat ledger does with a bad state file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Set
from pathlib import Path

from pkg.deviceplugin.allocator.store import (
    DamagedFile,
    atomic_write,
    printable,
    read_json,
    set_aside,
)
from pkg.deviceplugin.nvml.topofile import TopologyFile, TopologyFileError, parse_topology_data
from pkg.deviceplugin.types import Gpu, Link, Topology

log = logging.getLogger(__name__)

CACHE_FILE = "topology.json"


def load(state_dir: Path) -> Topology | None:
    """The cached topology; None when there is none or it cannot be used (then it is
    set aside, with one warning)."""
    path = state_dir / CACHE_FILE
    try:
        return parse_topology_data(read_json(path), str(path)).topology()
    except FileNotFoundError:
        return None
    except DamagedFile as exc:
        why = str(exc)
    except TopologyFileError as exc:
        first = exc.problems[0].removeprefix(f"{path}: ") if exc.problems else str(exc)
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        why = f"{printable(first, 200)}{more}"
    except ValueError as exc:
        # Topology's own checks, should they ever refuse what the file's checks let in.
        why = printable(str(exc), 200)
    log.warning("ignoring the topology cache %s: %s; %s", path, why, set_aside(path))
    return None


def save(state_dir: Path, topology: Topology) -> None:
    """Write the cache; a failure is one log line (the cache only helps a later start)."""
    path = state_dir / CACHE_FILE
    try:
        atomic_write(path, json.dumps(TopologyFile.from_topology(topology).to_data()))
    except OSError as exc:
        log.warning("could not write the topology cache %s: %s", path, exc)


def restore(cached: Topology, fresh: Topology, needed: Set[int]) -> tuple[Topology, list[Gpu]]:
    """``fresh`` plus the cached GPUs it lacks whose index ``needed`` names.

    A cached GPU comes back only if neither its UUID nor its index is in ``fresh`` (an
    index now taken by another GPU means the node changed). Its links to the GPUs that
    are still the same ones (same index, same UUID) come from the cache.
    """
    fresh_uuids = {g.uuid for g in fresh.gpus}
    fresh_indices = {g.index for g in fresh.gpus}
    restored = [
        g
        for g in cached.gpus
        if g.index in needed and g.uuid not in fresh_uuids and g.index not in fresh_indices
    ]
    if not restored:
        return fresh, []
    cached_uuid = {g.index: g.uuid for g in cached.gpus}
    same = {g.index for g in fresh.gpus if cached_uuid.get(g.index) == g.uuid}
    back = {g.index for g in restored}
    links: dict[tuple[int, int], Link] = dict(fresh.links)
    for (a, b), link in cached.links.items():
        if (a in back or b in back) and {a, b} <= back | same:
            links[(a, b)] = link
    return Topology((*fresh.gpus, *restored), links, fresh.set_aside), restored
