"""The running plugin: topology, seat board, per-profile servers and background loops.

Used by ``serve`` (the real process) and ``demo`` (in-process). It owns the threads and
stops them in order: servers first (kubelet sees the plugin go), then the ledger flush.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.board import Policy, SeatBoard
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.nvml.backend import Backend
from pkg.deviceplugin.server.manager import PluginManager
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.types import GroupName, ResourceName, Topology, group_size_of

log = logging.getLogger(__name__)


def profile_specs(config: Config) -> list[layout_mod.ProfileSpec]:
    return [
        layout_mod.ProfileSpec(
            ResourceName(p.resource), group_size_of(p.resource), p.seats_per_group
        )
        for p in config.profiles
    ]


def group_specs(config: Config) -> list[layout_mod.GroupSpec]:
    return [layout_mod.GroupSpec(GroupName(g.name), tuple(g.gpus)) for g in config.groups]


def policy_of(config: Config) -> Policy:
    return Policy(
        allow_overprovision=config.allow_overprovision,
        placement=config.preferred_allocation_policy,
        drain=frozenset(GroupName(name) for name in config.drain),
        device_list_strategy=config.device_list_strategy,
    )


def build_layout(config: Config, topology: Topology) -> layout_mod.Layout:
    return layout_mod.build(profile_specs(config), group_specs(config), topology)


class Runtime:
    def __init__(self, config: Config, backend: Backend, *, dev_root: Path = Path("/")) -> None:
        self.config = config
        self.backend = backend
        self.topology = backend.discover()
        self.board = SeatBoard(
            build_layout(config, self.topology),
            policy_of(config),
            StateStore(config.state_dir),
            release_grace_s=config.release_grace_period,
            dev_root=dev_root,
        )
        self.pod_resources = PodResourcesClient(config.pod_resources_socket)
        self.manager = PluginManager(self.board, config.kubelet_dir, self.pod_resources)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.reconcile_once()
        self.manager.sync()
        self.manager.tick()
        self._spawn("watch-kubelet", self.manager.run, self._stop)
        self._spawn("reconcile", self._reconcile_loop)

    def reconcile_once(self) -> None:
        observed = self.pod_resources.observe()
        if observed is not None:
            self.board.reconcile(observed)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.config.reconcile_interval):
            self.reconcile_once()

    def _spawn(self, name: str, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.manager.stop()
        self.board.close()
        self.board.flush()
        self.pod_resources.close()
        self.backend.close()
        log.info("stopped; sockets removed and seat ledger flushed")
