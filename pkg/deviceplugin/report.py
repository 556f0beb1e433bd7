"""What ``plan`` and ``status`` show: the SPEC section 9 documents and their text tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Any, TextIO, cast

from pkg.deviceplugin import plan
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.document import GroupDoc, ResourceDoc, SeatDoc, StatusDoc
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.types import Topology


def plan_document(config: Config, topology: Topology) -> StatusDoc:
    """The status shape for a fresh node (every seat free at generation 0, or drained
    where the config drains it) plus group links."""
    layout = plan.build_layout(config, topology)
    policy = plan.policy_of(config)
    board = SeatBoard(layout, policy, None, release_grace_s=config.release_grace_period)
    board.set_aside_gpus(topology.set_aside)
    doc = board.status()
    for resource, group in layout.groups():
        entry = doc["resources"][resource]["groups"][group.name]
        entry["links"] = {
            f"{a}-{b}": topology.link(a, b).word for a, b in combinations(sorted(group.indices), 2)
        }
    return doc


def status_view(state: Mapping[str, Any]) -> StatusDoc:
    """The node agent's view of a state file (JSON as read, unchecked: a reader shows
    what is there): its ``resources``, ledger detail dropped."""
    resources: dict[str, ResourceDoc] = {}
    for resource, body in (state.get("resources") or {}).items():
        groups: dict[str, GroupDoc] = {}
        for name, group in (body.get("groups") or {}).items():
            seats = {
                seat_id: _seat_view(seat) for seat_id, seat in (group.get("seats") or {}).items()
            }
            shown = {**{k: v for k, v in group.items() if k != "seats"}, "seats": seats}
            groups[name] = cast("GroupDoc", shown)
        resources[resource] = {"groups": groups}
    view: StatusDoc = {"resources": resources}
    if state.get("setAsideGpus"):
        view["setAsideGpus"] = state["setAsideGpus"]
    for key in ("node", "override"):  # which node, and the config's override for it
        if key in state:
            view[key] = state[key]
    return view


def _seat_view(seat: Mapping[str, Any]) -> dict[str, Any]:
    """A state file's seat as the status shows it: its binding's holder as ``holder``."""
    shown = {k: v for k, v in seat.items() if k in ("state", "generation", "why")}
    holder = (seat.get("binding") or {}).get("holder")
    if holder:
        shown["holder"] = holder
    return shown


def print_plan(doc: StatusDoc, topology: Topology, out: TextIO) -> None:
    out.write(topology_matrix(topology))
    out.write("\n")
    print_seat_map(doc, out, with_links=True)


def topology_matrix(topology: Topology) -> str:
    """The link matrix as ``nvidia-smi topo -m`` prints it."""
    if not topology.gpus:
        return "no GPUs\n"
    names = [f"GPU{g.index}" for g in topology.gpus]
    lines = ["\t" + "\t".join(names) + "\tNUMA Affinity"]
    for gpu, row in zip(topology.gpus, topology.matrix(), strict=True):
        numa = "N/A" if gpu.numa_node is None else str(gpu.numa_node)
        lines.append(f"GPU{gpu.index}\t" + "\t".join(f" {cell.word}" for cell in row) + f"\t{numa}")
    lines.append("")
    for gpu in topology.gpus:
        lines.append(
            f"GPU{gpu.index}: {gpu.name}, {gpu.uuid}, {gpu.memory_mib} MiB, "
            f"PCI {gpu.pci_bus_id}, /dev/nvidia{gpu.minor}"
        )
    return "\n".join(lines) + "\n"


def print_seat_map(doc: StatusDoc, out: TextIO, *, with_links: bool = False) -> None:
    if "node" in doc:
        override = doc.get("override")
        said = json.dumps(override, separators=(",", ":")) if override else "none"
        out.write(f"node {doc['node']}: override {said}\n")
    resources = doc.get("resources") or {}
    if not resources:
        out.write("no profiles\n")
    for resource, body in sorted(resources.items()):
        groups = body.get("groups") or {}
        seats_total = sum(len(g.get("seats") or {}) for g in groups.values())
        out.write(f"{resource}: {len(groups)} group(s), {seats_total} seat(s)\n")
        if not groups:
            out.write("  (no group of this size on this node)\n")
        for name, group in sorted(groups.items(), key=lambda kv: (kv[1].get("gpus") or [], kv[0])):
            flags: list[str] = [group.get("health", "?")]
            if group.get("fenced"):
                flags.append("fenced")
            if group.get("drained"):
                why = group.get("drainedWhy")
                flags.append(f"draining ({why})" if why else "draining")
            gpus = ",".join(str(i) for i in group.get("gpus") or [])
            line = f"  {name:<10} GPUs [{gpus}]  {' '.join(flags)}"
            if with_links and group.get("links"):
                line += "  links " + " ".join(f"{k}:{v}" for k, v in sorted(group["links"].items()))
            out.write(line + "\n")
            out.write("    " + "  ".join(_seat_cells(group.get("seats") or {})) + "\n")
    for gpu in doc.get("setAsideGpus") or ():
        out.write(f"GPU {gpu.get('index')} ({gpu.get('uuid')}) not served: {gpu.get('why')}\n")


def _seat_cells(seats: Mapping[str, SeatDoc]) -> Iterable[str]:
    for seat_id, seat in seats.items():
        cell = f"{seat_id}={seat.get('state')}/g{seat.get('generation')}"
        holder = seat.get("holder")
        if holder:
            cell += f"({holder.get('namespace')}/{holder.get('pod')}/{holder.get('container')})"
        yield cell
