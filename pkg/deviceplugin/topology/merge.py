"""Merging a fresh discovery into the topology the plugin serves."""

from __future__ import annotations

from pkg.deviceplugin.types import Topology


def merge_topology(known: Topology, fresh: Topology) -> tuple[Topology, list[int]]:
    """Known GPUs plus the ones that appeared; returns the merge and the new indices.

    Links the known topology lacks come from ``fresh`` wherever it sees both ends: a GPU
    that appeared while another was off the bus learns its link to that one when it
    comes back. Known links are kept (a refresh does not regroup anything).
    """
    known_uuids = {g.uuid for g in known.gpus}
    added = [g for g in fresh.gpus if g.uuid not in known_uuids]
    taken = {g.index for g in added}
    gpus = [g for g in known.gpus if g.index not in taken] + added
    uuid_of = {g.index: g.uuid for g in gpus}
    seen = {g.index for g in fresh.gpus if uuid_of.get(g.index) == g.uuid}
    learned = {
        pair: link
        for pair, link in fresh.links.items()
        if set(pair) <= seen and pair not in known.links
    }
    if not added and not learned:
        if fresh.set_aside == known.set_aside:
            return known, []
        return Topology(known.gpus, known.links, fresh.set_aside), []
    kept = {pair: link for pair, link in known.links.items() if not set(pair) & taken}
    return Topology(tuple(gpus), {**kept, **learned}, fresh.set_aside), [g.index for g in added]
