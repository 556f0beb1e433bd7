"""GPU health: probes and XID events turned into one view of the unhealthy GPUs.

One monitor watches every GPU for every profile, keyed by UUID, and hands the full
mapping ``uuid -> reason`` of the GPUs that are unhealthy now to ``on_change`` (the
seat board's ``set_unhealthy``) each time it changes, and only then.

The policy:

- **Probes.** Every ``probe_interval_s`` each GPU gets one cheap query
  (``Backend.probe``). A failed probe, or a probe that raises, makes the GPU
  unhealthy at once.
- **Hysteresis.** An unhealthy GPU counts as healthy again only after
  ``healthy_after`` *consecutive* good probes; one bad probe in between starts the
  count over, so a flapping GPU stays unhealthy. A probe that began before the GPU
  was marked does not count towards its recovery.
- **XID events.** A critical XID (any XID not in ``ignored_xids``; the defaults
  ignore the application-level 13, 31, 43, 45, 68 and 109 as NVIDIA's plugin does)
  makes its GPU unhealthy at once, whatever the probes say. An ignored XID is logged
  at debug level and changes nothing.
- **After an XID** (``xid_recovery``): ``"probes"`` lets the GPU come back after
  ``healthy_after`` consecutive good probes counted from the event, but only good
  probes in which the driver's recovery action field reads "none"; where the driver
  has no such field, only after the XIDs in :data:`RECOVERABLE_XIDS` (the rest call for
  a reset: the GPU stays unhealthy until the plugin restarts, one line says so).
  ``"never"`` keeps it unhealthy until the plugin restarts, and the line that marks it
  says so. The policy in force when the probes pass decides, so a reload to
  ``"probes"`` releases GPUs held by ``"never"``.
- **GPUs that vanish** from the topology while unhealthy keep being probed by UUID,
  so one that returns still has to pass its probes before it counts as healthy.

Each transition is one log line on ``pkg.deviceplugin.health`` carrying ``gpu``;
individual probes are never logged above debug level.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pkg.deviceplugin.nvml.backend import RECOVERY_ACTION_NONE, Backend, XidEvent
from pkg.deviceplugin.types import Gpu, XidRecovery

log = logging.getLogger("pkg.deviceplugin.health")


RECOVERABLE_XIDS: frozenset[int] = frozenset({8, 11, 13, 31, 43, 45, 68, 69, 94, 109})
"""XIDs after which a GPU that answers its probes is fit again, where the driver has no
recovery action field: those NVIDIA's XID catalog resolves by restarting the
application (RESTART_APP), e.g. 94, an ECC error that was contained. Every other
critical XID (48 double-bit ECC, 79 fell off the bus, 95 uncontained ECC, 64, 74, 119,
120, ...) calls for a GPU reset or more: only the driver's field, or a plugin restart
after the reset, returns such a GPU."""
_RECOVERY_ACTIONS = {1: "GPU reset", 2: "node reboot", 3: "drain P2P", 4: "drain and reset"}

XID_WAIT_S = 1.0
"""How long one wait for XID events blocks; it bounds how long ``stop`` takes. Each
wait's return costs about 0.2 ms on the mock: at 0.25 s it was a quarter of an idle
plugin's CPU (bench, idle section)."""

_STOP_JOIN_S = XID_WAIT_S + 0.5


@dataclass(frozen=True)
class GpuHealth:
    """One GPU as the monitor sees it now (for metrics and status)."""

    index: int
    uuid: str
    healthy: bool
    reason: str = ""


@dataclass
class _Sick:
    """What the monitor remembers about one unhealthy GPU."""

    reason: str
    since: float
    xid: int | None
    """The critical XID that marked it last (None: probes alone did)."""
    good_probes: int = 0
    waiting_noted: bool = False
    """Whether the line saying what its recovery waits for was written."""
    # Bumped whenever the GPU is marked again, so a probe that started earlier is ignored.
    mark: int = 0


@dataclass(frozen=True)
class _Outcome:
    uuid: str
    ok: bool
    reason: str
    mark: int | None
    recovery_action: int | None = None


class HealthMonitor:
    """Watches GPUs through a ``Backend`` and reports the unhealthy ones to ``on_change``.

    ``on_change`` is called with the monitor's lock held (so calls arrive in order)
    and must not call back into the monitor.
    """

    def __init__(
        self,
        backend: Backend,
        gpus: Callable[[], Sequence[Gpu]],
        on_change: Callable[[Mapping[str, str]], None],
        *,
        probe_interval_s: float,
        healthy_after: int,
        ignored_xids: Collection[int],
        xid_recovery: XidRecovery,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._gpus = gpus
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._sick: dict[str, _Sick] = {}
        self._published: dict[str, str] = {}
        self._index_of: dict[str, int] = {}
        self._marks = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gpus_failing = False
        self._xid_failing = False
        self.reconfigure(
            probe_interval_s=probe_interval_s,
            healthy_after=healthy_after,
            ignored_xids=ignored_xids,
            xid_recovery=xid_recovery,
        )

    def reconfigure(
        self,
        *,
        probe_interval_s: float,
        healthy_after: int,
        ignored_xids: Collection[int],
        xid_recovery: XidRecovery,
    ) -> None:
        """Apply a new health policy (config reload); GPUs keep their current state."""
        if probe_interval_s <= 0:
            raise ValueError(f"probe interval must be > 0, got {probe_interval_s}")
        if healthy_after < 1:
            raise ValueError(f"healthy_after must be >= 1, got {healthy_after}")
        with self._lock:
            self._probe_interval_s = probe_interval_s
            self._healthy_after = healthy_after
            self._ignored_xids = frozenset(ignored_xids)
            self._xid_recovery: XidRecovery = xid_recovery

    # ---- reads -------------------------------------------------------------------

    def unhealthy(self) -> dict[str, str]:
        """The unhealthy GPUs now: UUID -> reason."""
        with self._lock:
            return dict(self._published)

    def gpu_health(self) -> list[GpuHealth]:
        """Every known GPU with its health, by index (vanished unhealthy ones included)."""
        gpus = self._current_gpus() or ()
        with self._lock:
            self._learn_locked(gpus)
            uuids = {gpu.uuid for gpu in gpus} | {u for u in self._sick if u in self._index_of}
            views = [
                GpuHealth(
                    self._index_of[uuid],
                    uuid,
                    uuid not in self._sick,
                    self._sick[uuid].reason if uuid in self._sick else "",
                )
                for uuid in uuids
            ]
        return sorted(views, key=lambda v: (v.index, v.uuid))

    # ---- the two inputs (the loops call these; tests call them directly) ------------

    def probe_once(self) -> None:
        """Probe every GPU once and apply the results."""
        gpus = self._current_gpus()
        if gpus is None:
            return
        with self._lock:
            self._learn_locked(gpus)
            uuids = list(dict.fromkeys([g.uuid for g in gpus] + list(self._sick)))
            marks = {uuid: self._sick[uuid].mark for uuid in uuids if uuid in self._sick}
        # Probing can be slow on a sick machine; do it without the lock.
        outcomes = [self._probe(uuid, marks.get(uuid)) for uuid in uuids]
        with self._lock:
            for outcome in outcomes:
                if outcome.ok:
                    self._good_probe_locked(outcome)
                else:
                    self._mark_locked(outcome.uuid, outcome.reason)
            self._publish_locked()

    def handle_events(self, events: Iterable[XidEvent]) -> None:
        """Apply XID events: critical ones mark their GPU unhealthy at once."""
        events = list(events)
        if not events:
            return
        gpus = self._current_gpus() or ()
        with self._lock:
            self._learn_locked(gpus)
            for event in events:
                if event.xid in self._ignored_xids:
                    log.debug(
                        "%s reported XID %d, which is ignored",
                        self._label(event.uuid),
                        event.xid,
                        extra={"gpu": self._gpu_key(event.uuid)},
                    )
                    continue
                if not event.uuid:
                    self._suspect_all_locked(
                        gpus, f"critical XID {event.xid} on a GPU NVML could not name"
                    )
                    continue
                self._mark_locked(event.uuid, f"critical XID {event.xid}", xid=event.xid)
            self._publish_locked()

    def _suspect_all(self, reason: str) -> None:
        gpus = self._current_gpus() or ()
        with self._lock:
            self._learn_locked(gpus)
            self._suspect_all_locked(gpus, reason)
            self._publish_locked()

    def _suspect_all_locked(self, gpus: Iterable[Gpu], reason: str) -> None:
        """None of ``gpus`` can be vouched for until its probes pass (an XID NVML cannot
        name: a phantom GPU "" would be marked, and probed, forever instead)."""
        for gpu in gpus:
            self._mark_locked(gpu.uuid, reason)

    # ---- threads -----------------------------------------------------------------

    def start(self) -> None:
        """Start the probe and XID threads; the first probe round runs at once."""
        if self._threads:
            raise RuntimeError("the health monitor is already running")
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._probe_loop, name="health-probes", daemon=True),
            threading.Thread(target=self._xid_loop, name="health-xid", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads; returns within about a second (one XID wait)."""
        self._stop.set()
        deadline = time.monotonic() + _STOP_JOIN_S
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        self._threads = []

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.probe_once()
            except Exception:
                log.exception("GPU health probe round failed")
            with self._lock:
                interval = self._probe_interval_s
            self._stop.wait(max(started + interval - self._clock(), 0.0))

    def _xid_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._backend.wait_xid_events(XID_WAIT_S)
            except Exception as exc:
                if not self._xid_failing:
                    log.warning(
                        "cannot read XID events (%s); every GPU is unhealthy until its "
                        "probes pass, retrying",
                        exc,
                    )
                    log.debug("XID wait failure", exc_info=True)
                    self._xid_failing = True
                # Critical XIDs may have been missed: no GPU can be vouched for but by
                # its probes (NVIDIA's plugin marks every GPU too).
                self._suspect_all(f"XID events could not be read ({exc})")
                self.probe_once()
                self._stop.wait(XID_WAIT_S)
                continue
            if self._xid_failing:
                log.info("reading XID events again")
                self._xid_failing = False
            if events:
                self.handle_events(events)

    # ---- internals ---------------------------------------------------------------

    def _learn_locked(self, gpus: Iterable[Gpu]) -> None:
        for gpu in gpus:
            self._index_of[gpu.uuid] = gpu.index

    def _current_gpus(self) -> Sequence[Gpu] | None:
        try:
            gpus = self._gpus()
        except Exception as exc:
            if not self._gpus_failing:
                log.warning("cannot list the GPUs to probe (%s); retrying", exc, exc_info=True)
                self._gpus_failing = True
            return None
        if self._gpus_failing:
            log.info("listing the GPUs to probe works again")
            self._gpus_failing = False
        return gpus

    def _probe(self, uuid: str, mark: int | None) -> _Outcome:
        try:
            probe = self._backend.probe(uuid)
        except Exception as exc:
            log.debug("probe of %s raised", uuid, exc_info=True)
            return _Outcome(uuid, False, f"probe failed: {exc}", mark)
        return _Outcome(uuid, probe.ok, probe.reason or "probe failed", mark, probe.recovery_action)

    def _mark_locked(self, uuid: str, reason: str, *, xid: int | None = None) -> None:
        by_xid = xid is not None
        sick = self._sick.get(uuid)
        self._marks += 1
        if sick is None:
            self._sick[uuid] = _Sick(reason, self._clock(), xid, mark=self._marks)
            log.warning(
                "%s unhealthy: %s%s",
                self._label(uuid),
                reason,
                self._never_note() if by_xid else "",
                extra={"gpu": self._gpu_key(uuid)},
            )
            return
        sick.good_probes = 0
        sick.mark = self._marks
        if by_xid:
            # News worth a line: the cause changes, and with "never" the GPU is now pinned.
            log.warning(
                "%s critical XID while unhealthy (%s): %s%s",
                self._label(uuid),
                sick.reason,
                reason,
                self._never_note(),
                extra={"gpu": self._gpu_key(uuid)},
            )
            sick.reason, sick.xid, sick.waiting_noted = reason, xid, False

    def _never_note(self) -> str:
        if self._xid_recovery == "never":
            return "; xidRecovery is 'never', so it stays unhealthy until the plugin restarts"
        return ""

    def _good_probe_locked(self, outcome: _Outcome) -> None:
        sick = self._sick.get(outcome.uuid)
        if sick is None or outcome.mark != sick.mark:
            return
        if sick.xid is not None:
            if self._xid_recovery == "never":
                return
            if not self._xid_cleared_locked(outcome, sick):
                sick.good_probes = 0
                return
        sick.good_probes += 1
        if sick.good_probes < self._healthy_after:
            return
        del self._sick[outcome.uuid]
        log.info(
            "%s healthy again after %d good probes (unhealthy %.1f s: %s)",
            self._label(outcome.uuid),
            sick.good_probes,
            self._clock() - sick.since,
            sick.reason,
            extra={"gpu": self._gpu_key(outcome.uuid)},
        )

    def _xid_cleared_locked(self, outcome: _Outcome, sick: _Sick) -> bool:
        """Whether a good probe of a GPU marked by a critical XID counts towards its
        recovery: the driver's recovery action says nothing is pending or, where the
        driver cannot say, the XID is one the GPU survives (:data:`RECOVERABLE_XIDS`)."""
        action = outcome.recovery_action
        if action == RECOVERY_ACTION_NONE:
            return True
        if action is None and sick.xid in RECOVERABLE_XIDS:
            return True
        if not sick.waiting_noted:
            sick.waiting_noted = True
            waits_for = (
                f"until the driver reports no recovery action pending (now: "
                f"{_RECOVERY_ACTIONS.get(action, action)})"
                if action is not None
                else "until the plugin restarts (after the GPU is reset): the driver "
                "cannot say when it is done"
            )
            log.warning(
                "%s answers its probes, but XID %s calls for a GPU reset or more; it stays "
                "unhealthy %s",
                self._label(outcome.uuid),
                sick.xid,
                waits_for,
                extra={"gpu": self._gpu_key(outcome.uuid)},
            )
        return False

    def _publish_locked(self) -> None:
        current = {uuid: sick.reason for uuid, sick in self._sick.items()}
        if current != self._published:
            self._published = current
            self._on_change(dict(current))

    def _gpu_key(self, uuid: str) -> int | str:
        return self._index_of.get(uuid, uuid)

    def _label(self, uuid: str) -> str:
        index = self._index_of.get(uuid)
        return f"GPU {index} ({uuid})" if index is not None else f"GPU {uuid}"
