"""The NVML adapter's contract: what the rest of the plugin may ask of the GPUs.

Two implementations exist: :mod:`pkg.deviceplugin.nvml.real` (pynvml, or the mock NVML
library loaded through pynvml) and :mod:`pkg.deviceplugin.nvml.mock` (a topology file).
Only the composition root (``pkg/deviceplugin/cli.py``) chooses between them; everything
else takes a ``Backend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pkg.deviceplugin.types import Topology


class NvmlError(Exception):
    """NVML (or the mock) could not answer; the message is one readable line."""


@dataclass(frozen=True)
class XidEvent:
    """A critical-error event NVML reported for one GPU; ``uuid`` is "" when NVML could
    not say which GPU (every GPU is then suspect)."""

    uuid: str
    xid: int


@dataclass(frozen=True)
class Probe:
    """The result of one cheap health query of one GPU. ``recovery_action``: what the
    driver says the GPU needs (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``: 0 nothing, 1 a
    GPU reset, 2 a node reboot, 3 a P2P drain, 4 a drain and reset); None where the
    driver cannot say."""

    uuid: str
    ok: bool
    reason: str = ""
    recovery_action: int | None = None


RECOVERY_ACTION_NONE = 0


class Backend(Protocol):
    """A source of GPU facts. Implementations must be safe to call from several threads."""

    def discover(self) -> Topology:
        """Every GPU present now with the link of every pair. Raises NvmlError."""
        ...

    def probe(self, uuid: str) -> Probe:
        """Look the GPU up by UUID and run a cheap query; never raises for a sick GPU."""
        ...

    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        """Block up to ``timeout_s`` for critical-error events; an empty list on timeout."""
        ...

    def close(self) -> None:
        """Release NVML."""
        ...
