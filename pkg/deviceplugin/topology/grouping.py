"""Exact optimal grouping of GPUs by link quality, and stable group names.

A grouping of size N splits the GPUs into groups of N so that the sum, over the groups,
of :attr:`Link.score` over every pair inside a group is as large as possible. GPUs that
do not fill a whole group are left out, and which ones are left out is part of the
optimisation. Ties go to the lexicographically smallest result, so the same hardware
always gets the same groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from pkg.deviceplugin.types import PARTITION_SIZES, GroupName, Topology

MAX_EXACT_GPUS = 16
"""The search is exponential in the GPU count; beyond this it is refused, not slow."""

Grouping = tuple[tuple[int, ...], ...]


def group_score(topology: Topology, members: Iterable[int]) -> int:
    """The summed link score of every pair inside one group."""
    return sum(topology.link(a, b).score for a, b in itertools.combinations(members, 2))


def grouping_score(topology: Topology, groups: Iterable[Iterable[int]]) -> int:
    """The objective :func:`partition` maximises."""
    return sum(group_score(topology, group) for group in groups)


def partition(topology: Topology, size: int, gpus: Iterable[int] | None = None) -> Grouping:
    """Split ``gpus`` (default: every GPU of ``topology``) into the best groups of ``size``.

    Returns ``len(gpus) // size`` groups, each sorted, ordered by their first index.
    """
    if size not in PARTITION_SIZES:
        raise ValueError(f"group size must be one of {PARTITION_SIZES}, got {size}")
    indices = _checked_indices(topology, gpus)
    if size == 1:
        return tuple((index,) for index in indices)
    if len(indices) < size:
        return ()
    if len(indices) > MAX_EXACT_GPUS:
        raise ValueError(
            f"exact grouping supports at most {MAX_EXACT_GPUS} GPUs, got {len(indices)}"
        )
    return _Search(topology, indices, size).best()


def group_name(members: Sequence[int]) -> GroupName:
    """``G`` and the member indices: ``G01``, ``G0123``, ``G5``, ``G12``.

    A group with a member of 10 or more joins its indices with dashes (``G10-11``,
    ``G9-10``) so that a pair never reads like another pair. The name depends on the
    members alone, never on which other GPUs the node has at the moment: a node whose
    GPUs 10 and up are off the bus at a restart keeps every name.
    """
    ordered = sorted(members)
    if not ordered:
        raise ValueError("a group needs at least one GPU")
    if any(index < 0 for index in ordered):
        raise ValueError(f"GPU indices must not be negative: {ordered}")
    wide = len(ordered) > 1 and ordered[-1] >= 10
    return GroupName("G" + ("-" if wide else "").join(str(index) for index in ordered))


def _checked_indices(topology: Topology, gpus: Iterable[int] | None) -> tuple[int, ...]:
    if gpus is None:
        return topology.indices
    requested = list(gpus)
    known = set(topology.indices)
    unknown = sorted(set(requested) - known)
    if unknown:
        raise ValueError(f"GPU indices {unknown} are not in the topology")
    if len(set(requested)) != len(requested):
        raise ValueError(f"GPU indices listed twice: {sorted(requested)}")
    return tuple(sorted(requested))


class _Search:
    """Memoised search over the set of GPUs still to place (a bitmask of positions).

    The lowest GPU still to place either joins a group with ``size - 1`` of the others or,
    while the count left over allows it, stays out. Every state keeps the same number of
    spare GPUs modulo ``size``, so the remaining set alone is the memo key. Options are
    listed in lexicographic order (staying out last) and the first best one wins, so the
    result is the lexicographically smallest optimum.
    """

    def __init__(self, topology: Topology, indices: tuple[int, ...], size: int) -> None:
        self._indices = indices
        self._size = size
        weight = [[0 if a == b else topology.link(a, b).score for b in indices] for a in indices]
        self._group_scores = _GroupScores(weight)
        self._memo: dict[int, tuple[int, tuple[int, ...]]] = {}

    def best(self) -> Grouping:
        _, masks = self._solve((1 << len(self._indices)) - 1)
        return tuple(self._members(mask) for mask in masks)

    def _members(self, mask: int) -> tuple[int, ...]:
        return tuple(index for pos, index in enumerate(self._indices) if mask >> pos & 1)

    def _solve(self, remaining: int) -> tuple[int, tuple[int, ...]]:
        """The best score for ``remaining`` and its groups as bitmasks, lowest first."""
        cached = self._memo.get(remaining)
        if cached is not None:
            return cached
        size = self._size
        count = remaining.bit_count()
        if count < size:
            result: tuple[int, tuple[int, ...]] = (0, ())
        elif count == size:
            result = (self._group_scores[remaining], (remaining,))
        else:
            first = remaining & -remaining
            rest = [
                1 << pos
                for pos in range(first.bit_length(), remaining.bit_length())
                if remaining >> pos & 1
            ]
            scores = self._group_scores
            groups = [first | other for other in map(sum, itertools.combinations(rest, size - 1))]
            if count == 2 * size:
                # The hot path: both halves are whole groups.
                totals = [scores[group] + scores[remaining ^ group] for group in groups]
                best_score = max(totals)
                group = groups[totals.index(best_score)]
                best_groups: tuple[int, ...] = (group, remaining ^ group)
            else:
                memo = self._memo
                subs = [memo.get(remaining ^ g) or self._solve(remaining ^ g) for g in groups]
                totals = [scores[g] + sub[0] for g, sub in zip(groups, subs, strict=True)]
                best_score = max(totals)
                best = totals.index(best_score)
                best_groups = (groups[best], *subs[best][1])
            if count % size:
                sub_score, sub_groups = self._solve(remaining ^ first)
                if sub_score > best_score:
                    best_score, best_groups = sub_score, sub_groups
            result = (best_score, best_groups)
        self._memo[remaining] = result
        return result


class _GroupScores(dict[int, int]):
    """Group bitmask -> the summed score of its pairs, filled in on first use."""

    def __init__(self, weight: Sequence[Sequence[int]]) -> None:
        super().__init__({1 << pos: 0 for pos in range(len(weight))})
        # Per GPU, its summed score towards any set of others, as two byte-indexed
        # tables, so that a group's score follows from a smaller one in constant time.
        self._low = [_row_sums(row[:8]) for row in weight]
        self._high = [_row_sums(row[8:]) for row in weight]

    def __missing__(self, mask: int) -> int:
        low = mask & -mask
        rest = mask ^ low
        pos = low.bit_length() - 1
        score = self[rest] + self._low[pos][rest & 0xFF] + self._high[pos][rest >> 8]
        self[mask] = score
        return score


def _row_sums(row: Sequence[int]) -> list[int]:
    """``sums[m]``: the sum of ``row[i]`` over the bits ``i`` set in ``m``."""
    sums = [0] * (1 << len(row))
    for mask in range(1, len(sums)):
        low = mask & -mask
        sums[mask] = sums[mask ^ low] + row[low.bit_length() - 1]
    return sums
