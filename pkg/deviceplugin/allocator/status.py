"""The documents a board shows: the SPEC section 9 status, and the state file, which
is the status with each seat's ledger entry, the retired seats' entries and the time.

Both are built from the published :class:`views.Snapshot` and the board's facts. The
state file is saved after every change, so its groups are kept encoded, each until
something in it changes (:class:`StateEncoder`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pkg.deviceplugin.allocator.document import (
    GroupDoc,
    LedgerEntry,
    NodeDoc,
    SeatDoc,
    SetAsideDoc,
    StatusDoc,
)
from pkg.deviceplugin.allocator.layout import Group
from pkg.deviceplugin.allocator.policy import Policy
from pkg.deviceplugin.allocator.store import encode, encode_object
from pkg.deviceplugin.allocator.views import Facts, GroupKey, SeatView, Snapshot
from pkg.deviceplugin.types import GroupName, ResourceName, SetAsideGpu


def status(snapshot: Snapshot, facts: Facts, set_aside: Sequence[SetAsideGpu]) -> StatusDoc:
    """The status document, with ``setAsideGpus`` where discovery found GPUs the
    plugin does not serve."""
    doc: StatusDoc = {
        "resources": {
            resource: {
                "groups": {
                    name: group_document(facts, resource, name, views, with_ledger=False)
                    for name, views in groups.items()
                }
            }
            for resource, groups in snapshot.groups.items()
        }
    }
    if set_aside:
        doc["setAsideGpus"] = set_aside_document(set_aside)
    return {**doc, **node_document(facts.policy)}


class StateEncoder:
    """The state file's groups (and retired seats) as last encoded; whatever changes a
    group forgets its entry, so a save encodes only the groups that changed."""

    def __init__(self) -> None:
        self._groups: dict[GroupKey, str] = {}
        self._retired: str | None = None

    def forget(self, key: GroupKey) -> None:
        self._groups.pop(key, None)

    def forget_all(self) -> None:
        self._groups.clear()
        self._retired = None

    def fields(
        self,
        snapshot: Snapshot,
        facts: Facts,
        *,
        set_aside: Sequence[SetAsideGpu],
        awaiting_list: bool,
        now: float,
    ) -> dict[str, str]:
        """The state document, encoded for ``StateStore.save_encoded``."""
        resources: dict[str, str] = {}
        for resource, groups in snapshot.groups.items():
            encoded: dict[str, str] = {}
            for name, views in groups.items():
                text = self._groups.get((resource, name))
                if text is None:
                    text = self._groups[(resource, name)] = encode(
                        group_document(facts, resource, name, views, with_ledger=True)
                    )
                encoded[name] = text
            resources[resource] = encode_object({"groups": encode_object(encoded)})
        ledger = facts.ledger
        if self._retired is None:
            retired: dict[str, dict[str, LedgerEntry]] = {}
            for key in ledger.keys():  # noqa: SIM118 (a ledger, not a dict)
                resource, device_id = key
                if device_id not in snapshot.seats.get(resource, {}):
                    retired.setdefault(resource, {})[device_id] = ledger.to_entry(key)
            self._retired = encode(retired)
        fields = {
            "resources": encode_object(resources),
            "retired": self._retired,
            "updatedAt": encode(now),
        }
        if ledger.floor:
            fields["generationFloor"] = encode(ledger.floor)
        if awaiting_list:
            fields["awaitingList"] = encode(True)
        if set_aside:
            fields["setAsideGpus"] = encode(set_aside_document(set_aside))
        fields.update((key, encode(value)) for key, value in node_document(facts.policy).items())
        return fields


def group_document(
    facts: Facts,
    resource: ResourceName,
    name: GroupName,
    views: Sequence[SeatView],
    *,
    with_ledger: bool,
) -> GroupDoc:
    place = facts.places.get((resource, name))
    doc = _group_entry(facts, resource, name, place.group if place is not None else None)
    seats = doc["seats"]
    for view in views:
        seat: SeatDoc = {"state": view.state, "generation": view.generation}
        if view.why:
            seat["why"] = view.why
        if with_ledger:
            entry = facts.ledger.to_entry((resource, view.device_id))
            if "binding" in entry:
                seat["binding"] = entry["binding"]
        else:
            binding = facts.ledger.binding((resource, view.device_id))
            if binding is not None and binding.holder is not None:
                seat["holder"] = binding.holder.document()
        seats[view.device_id] = seat
    return doc


def _group_entry(
    facts: Facts, resource: ResourceName, name: GroupName, group: Group | None
) -> GroupDoc:
    if group is None:  # a group only live bindings the layout no longer has keep
        gpus = next(
            (b.gpus for (r, _), b in facts.ledger.held() if r == resource and b.group == name),
            (),
        )
        topology = facts.layout.topology
        return {
            "gpus": list(gpus),
            "uuids": [topology.gpu(i).uuid for i in gpus if i in topology.indices],
            "health": "Unhealthy",
            "numaNodes": [],
            "fenced": False,
            "drained": False,
            "seats": {},
        }
    unhealthy = [u for u in group.uuids if u in facts.unhealthy]
    drained = facts.drained_why(group)
    doc: GroupDoc = {
        "gpus": list(group.indices),
        "uuids": list(group.uuids),
        "health": "Unhealthy" if unhealthy else "Healthy",
        "numaNodes": list(group.numa_nodes),
        "fenced": bool(facts.fenced_by(resource, group)),
        "drained": bool(drained),
        "seats": {},
    }
    if drained:
        doc["drainedWhy"] = drained
    return doc


def node_document(policy: Policy) -> NodeDoc:
    """The node's part of the status: its name and the config's override for it."""
    doc: NodeDoc = {}
    if policy.node is not None:
        doc["node"] = policy.node
    if policy.override is not None:
        doc["override"] = policy.override
    return doc


def set_aside_document(gpus: Sequence[SetAsideGpu]) -> list[SetAsideDoc]:
    return [{"index": g.index, "uuid": g.uuid, "why": g.why} for g in gpus]
