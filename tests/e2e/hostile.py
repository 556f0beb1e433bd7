"""Config files a careless or malicious operator may hand the plugin (issue 18).

Each must cost little to refuse: the CLI exits 2 with one line naming the file, and a
running plugin that reloads it keeps serving on its old config.
"""

from __future__ import annotations

import itertools


def alias_bomb(levels: int = 9, fan: int = 9) -> str:
    """About 1 KB that expands to ``fan ** levels`` strings, under an unknown key."""
    names = [chr(ord("a") + i) for i in range(levels)]
    lines = ["profiles: [{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 4}]", "x:"]
    lines.append(f"  {names[0]}: &{names[0]} [{', '.join(['lol'] * fan)}]")
    for prev, name in itertools.pairwise(names):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * fan)}]")
    return "\n".join(lines) + "\n"


HOSTILE_CONFIGS = {
    "alias bomb": alias_bomb(),
    "5000-deep flow nesting": "x: " + "[" * 5000 + "]" * 5000 + "\n",
    "200-deep block nesting": "x:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 201)),
    "NUL byte": "profiles:\n  - resource: kyb.ai/gpu-1x-seat\x00\n    seatsPerGroup: 4\n",
    "alias inside itself": "profiles: &p [{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 4}, *p]\n",
    "300 KB file": "# " + "a" * 300_000 + "\nprofiles: []\n",
}
