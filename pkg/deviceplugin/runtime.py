"""The running plugin: topology, seat board, per-profile servers and background loops.

Used by ``serve`` (the real process) and ``demo`` (in-process). It owns the threads and
stops them in order: servers first (the kubelet sees the plugin go), then the ledger
flush.

Live changes:
- the config file is read again by content when its directory (or its symlink
  target's) changes, through whatever symlinks a ConfigMap mount swaps, and SIGHUP asks
  for a reload at once; a valid new config is
  applied (profiles served or stopped, seat counts, drain, overprovisioning, log
  format, and this node's override under ``nodes``), an invalid one is logged and
  the old one keeps running;
- the topology is rediscovered every ``refreshInterval``. GPUs are never dropped from
  the layout while the process lives: a GPU that disappears keeps its groups, which go
  Unhealthy through the health monitor and come back with it. A GPU that appears joins
  the auto grouping; groups with held seats are pinned and never regrouped. The
  topology is cached in the state dir (``topocache``), so a restart while a held GPU
  is off the bus keeps that GPU's groups too.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkg.deviceplugin import logs, metrics, topocache
from pkg.deviceplugin.allocator import layout as layout_mod
from pkg.deviceplugin.allocator.board import SeatBoard
from pkg.deviceplugin.allocator.ledger import GONE_CONFIRM_S
from pkg.deviceplugin.allocator.store import StateStore
from pkg.deviceplugin.config import loader
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.config.source import ConfigSource
from pkg.deviceplugin.health.monitor import HealthMonitor
from pkg.deviceplugin.nvml.backend import Backend
from pkg.deviceplugin.plan import absent_drain_gpus, explicit_gpus, plan_of, policy_of
from pkg.deviceplugin.server import dirwatch
from pkg.deviceplugin.server.dirwatch import DirWatch
from pkg.deviceplugin.server.manager import PluginManager
from pkg.deviceplugin.server.podresources import PodResourcesClient
from pkg.deviceplugin.topology.merge import merge_topology
from pkg.deviceplugin.types import Topology

log = logging.getLogger(__name__)

# The config file's directories are watched (inotify) and the file read again when
# they change, and every CONFIG_SAFETY_POLL_S anyway; where they cannot be watched, the
# file is read every CONFIG_POLL_S.
CONFIG_POLL_S = 1.0
CONFIG_SAFETY_POLL_S = 30.0
# Paths name where the plugin talks to the kubelet and keeps its ledger; moving them
# under a running process would strand sockets and state, so they wait for a restart.
# So does the metrics address: the servers hold the recorder chosen at start.
RESTART_ONLY = ("kubelet_dir", "pod_resources_socket", "state_dir", "metrics_address")


class Runtime:
    def __init__(
        self,
        config: Config,
        backend: Backend,
        *,
        topology: Topology | None = None,
        source: ConfigSource | None = None,
        dev_root: Path = Path("/"),
    ) -> None:
        """``topology``: a discovery the caller already made (else the backend's now)."""
        self.config = config
        self.backend = backend
        self.source = source
        self.node = source.node if source is not None else None
        discovered = topology if topology is not None else backend.discover()
        # A GPU that is off the bus right now but named by the config's groups, or
        # (below) under held seats, comes back from the topology cache: Unhealthy
        # until it answers, instead of an unknown index that stops every profile.
        self.topology = self._with_lost_gpus(discovered, explicit_gpus(config))
        self.board = SeatBoard(
            plan_of(config, self.topology),
            policy_of(config, self.node),
            StateStore(config.state_dir, used_before=topocache.CACHE_FILE),
            release_grace_s=config.release_grace_period,
            handoff_s=config.handoff_window,
        )
        self.board.set_aside_gpus(discovered.set_aside)
        held = {i for groups in self.board.held_groups().values() for _, m in groups for i in m}
        restored = self._with_lost_gpus(self.topology, held)
        if restored is not self.topology:
            self.topology = restored
            self.board.apply(plan=plan_of(config, restored))
        topocache.save(config.state_dir, self.topology)
        self.health = HealthMonitor(
            backend,
            lambda: self.topology.gpus,
            self.board.set_unhealthy,
            **self._health_policy(config),
        )
        _warn_dropped_xids(config)
        self._log_node(None)
        _warn_absent_drain_gpus(config, self.topology)
        self.metrics: metrics.Recorder = (
            metrics.Metrics(status=self.board.status, gpu_health=self.health.gpu_health)
            if config.metrics_address
            else metrics.NullMetrics()
        )
        self._metrics_server: metrics.MetricsServer | None = None
        self.pod_resources = PodResourcesClient(config.pod_resources_socket)
        self.manager = PluginManager(
            self.board,
            config.kubelet_dir,
            self.pod_resources,
            recorder=self.metrics,
            dev_root=dev_root,
        )
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._config_watch: DirWatch | None = None
        self._threads: list[threading.Thread] = []
        self._reload_lock = threading.Lock()
        self._fingerprint = source.fingerprint() if source is not None else None

    def start(self) -> None:
        if isinstance(self.metrics, metrics.Metrics) and self.config.metrics_address:
            self._metrics_server = self.metrics.serve(self.config.metrics_address)
            log.info("metrics on http://%s/metrics", self.config.metrics_address)
        self.health.probe_once()
        self.health.start()
        pending = self.reconcile_once()
        self.manager.sync()
        self.manager.tick()
        self._spawn("watch-kubelet", lambda: self.manager.run(self._stop))
        self._spawn("reconcile", lambda: self._reconcile_loop(pending))
        self._spawn("refresh-topology", self._refresh_loop)
        if self.source is not None:
            self._spawn("watch-config", self._config_loop)

    def request_reload(self) -> None:
        """SIGHUP: reload the config now."""
        self._reload_requested.set()
        watch = self._config_watch
        if watch is not None:
            watch.wake()

    def reconcile_once(self) -> bool:
        """One PodResources ``List``; whether a holder is missing but not yet gone."""
        observed = self.pod_resources.observe()
        return observed is not None and self.board.reconcile(observed)

    def reload(self) -> bool:
        """Load and apply the config; False (old config kept) when it is invalid."""
        if self.source is None:
            return False
        with self._reload_lock:
            try:
                new, waiting = self._keep_restart_only(self.source.load())
                topology = self._with_lost_gpus(self.topology, explicit_gpus(new))
                self.board.apply(plan=plan_of(new, topology), policy=policy_of(new, self.node))
            except loader.ConfigError as exc:
                self._reject(exc.problems)
                return False
            except layout_mod.LayoutError as exc:
                self._reject(exc.located(self.source.origin))
                return False
            if topology is not self.topology:
                self.topology = topology
                topocache.save(self.config.state_dir, topology)
            if new.log_format != self.config.log_format:
                logs.set_format(new.log_format)
            for key in waiting:
                log.warning("config key %s changed; it takes effect after a restart", key)
            self.board.set_windows(new.release_grace_period, new.handoff_window)
            self.health.reconfigure(**self._health_policy(new))
            if new.dropped_default_xids != self.config.dropped_default_xids:
                _warn_dropped_xids(new)
            if new.drain_gpus != self.config.drain_gpus:
                _warn_absent_drain_gpus(new, topology)
            previous, self.config = self.config, new
            self._log_node(previous)
            self.manager.sync()
            log.info(
                "config reloaded: serving %s",
                ", ".join(f"{p.resource} x{p.seats_per_group}" for p in new.profiles),
            )
            self.metrics.config_reload(True)
            return True

    def _log_node(self, previous: Config | None) -> None:
        """Say which node override is in force: at start, and when a reload changes it."""
        if self.node is None:
            return
        override = self.config.nodes.get(self.node)
        if previous is not None and override == previous.nodes.get(self.node):
            return
        if override is None:
            log.info("node %s: no override for it in the config (nodes)", self.node)
        else:
            log.info(
                "node %s: override nodes.%s in force: %s",
                self.node,
                self.node,
                json.dumps(override.to_data(), separators=(",", ":")),
            )

    def _reject(self, problems: list[str]) -> None:
        for problem in problems:
            log.error("config rejected: %s", problem)
        log.error("keeping the running config")
        self.metrics.config_reload(False)

    def _with_lost_gpus(self, topology: Topology, needed: set[int]) -> Topology:
        """``topology`` plus the GPUs in ``needed`` that it lacks and the topology cache
        knows (the same object when there are none)."""
        if needed <= set(topology.indices):
            return topology
        cached = topocache.load(self.config.state_dir)
        if cached is None:
            return topology
        merged, restored = topocache.restore(cached, topology, needed)
        for gpu in restored:
            log.warning(
                "GPU %s (%s) is missing, but the config's groups or held seats need it: "
                "keeping it from the topology cache (Unhealthy until it answers)",
                gpu.index,
                gpu.uuid,
                extra={"gpu": gpu.index},
            )
        return merged

    def refresh_topology(self) -> None:
        try:
            fresh = self.backend.discover()
        except Exception as exc:  # NvmlError, or anything a driver's answer breaks
            log.warning("topology refresh failed (%s); keeping the cached topology", exc)
            log.debug("topology refresh failure", exc_info=True)
            return
        with self._reload_lock:
            merged, added = merge_topology(self.topology, fresh)
            if merged is self.topology:
                return
            learned = merged.links != self.topology.links
            self.topology = merged
            self.board.set_aside_gpus(fresh.set_aside)
            topocache.save(self.config.state_dir, merged)
            if not added:
                if learned:
                    log.info("topology refresh learned links between GPUs it sees again")
                return
            for index in added:
                log.info("GPU %s appeared", index, extra={"gpu": index})
            try:
                self.board.apply(plan=plan_of(self.config, merged))
            except layout_mod.LayoutError as exc:
                log.error("new GPUs not grouped: %s", "; ".join(exc.problems))
            self.manager.sync()

    @staticmethod
    def _health_policy(config: Config) -> dict[str, Any]:
        return {
            "probe_interval_s": config.health_probe_interval,
            "healthy_after": config.healthy_after_probes,
            "ignored_xids": config.all_ignored_xids,
            "xid_recovery": config.xid_recovery,
        }

    def _keep_restart_only(self, new: Config) -> tuple[Config, list[str]]:
        """``new`` with the running values of the keys that wait for a restart, and the
        config keys (as the file spells them) whose change must wait."""
        kept = {
            name: getattr(self.config, name)
            for name in RESTART_ONLY
            if getattr(new, name) != getattr(self.config, name)
        }
        waiting = [Config.model_fields[name].alias or name for name in kept]
        return (new.model_copy(update=kept) if kept else new), waiting

    def _reconcile_loop(self, pending: bool) -> None:
        """``pending``: the first wait is short (the answer at start left a holder
        missing, or a lost ledger waiting for a second answer). A pass asks ``List``
        only when its answer could change something (``SeatBoard.list_can_change``):
        an idle node makes no call (each one wakes grpc's thread pool for about a
        second; bench/README.md, "Idle")."""
        while not self._stop.wait(
            min(self.config.reconcile_interval, GONE_CONFIRM_S)
            if pending
            else self.config.reconcile_interval
        ):
            pending = self.board.list_can_change() and self.reconcile_once()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.refresh_interval):
            self.refresh_topology()

    def _config_loop(self) -> None:
        assert self.source is not None
        with DirWatch(mask=dirwatch.CONTENTS) as watch:
            self._config_watch = watch
            try:
                while not self._stop.is_set():
                    # The file's directory and, through symlinks, its target's: a
                    # ConfigMap update renames a symlink in the first, an edit in place
                    # writes in the second.
                    watch.watch(self.source.dirs())
                    watch.wait(CONFIG_SAFETY_POLL_S if watch.watching else CONFIG_POLL_S)
                    if self._stop.is_set():
                        return
                    requested = self._reload_requested.is_set()
                    if requested:  # one that comes after this is left for the next turn
                        self._reload_requested.clear()
                    fingerprint = self.source.fingerprint()
                    if requested or fingerprint != self._fingerprint:
                        self._fingerprint = fingerprint
                        why = "reload requested" if requested else "changed"
                        log.info("config %s; reloading", why)
                        self.reload()
            finally:
                self._config_watch = None

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.manager.wake()
        self.request_reload()  # wakes the config loop, which sees the stop
        self.health.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.manager.stop()
        self.board.close()
        self.board.flush()
        self.pod_resources.close()
        self.backend.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log.info("stopped; sockets removed and seat ledger flushed")


def _warn_dropped_xids(config: Config) -> None:
    dropped = config.dropped_default_xids
    if dropped:
        log.warning(
            "ignoredXids replaces the default list and leaves out XIDs %s, which now mark "
            "a GPU unhealthy; to add XIDs to the defaults, set extraIgnoredXids instead",
            ", ".join(map(str, dropped)),
        )


def _warn_absent_drain_gpus(config: Config, topology: Topology) -> None:
    for line in absent_drain_gpus(config, topology):
        log.warning("%s", line)
