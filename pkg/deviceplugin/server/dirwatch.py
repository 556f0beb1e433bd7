"""Sleeping until a directory changes: what lets an idle plugin cost nothing.

The loops that react to the node (a kubelet restart wipes and recreates its sockets, a
ConfigMap update swaps a symlink) wait here instead of polling: on the directories'
inotify events, on ``wake()`` from another thread (a stream ended, SIGHUP, stop), or on a
timeout the caller computes from its own timers. Where inotify cannot watch a directory
(absent, no inotify, out of watches) ``watching`` is False and the caller polls; each
wait tries again, so a directory created later is watched from then on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from inotify_simple import INotify, flags

log = logging.getLogger(__name__)

# Entries appearing, going or renamed: sockets (re)created, a ConfigMap's ..data swap.
ENTRIES = (
    flags.CREATE
    | flags.DELETE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)
# ... and files written in place (an operator editing config.yaml).
CONTENTS = ENTRIES | flags.CLOSE_WRITE | flags.MODIFY | flags.ATTRIB
_GONE = flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF


class DirWatch:
    """Waits until an entry of one of ``dirs`` changes, ``wake()`` is called, or a timeout."""

    def __init__(self, *dirs: Path, mask: int = ENTRIES) -> None:
        self._mask = mask
        self._dirs: tuple[Path, ...] = ()
        self._inotify: INotify | None = None
        self._watches: dict[Path, int] = {}
        self._unavailable: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watch(dirs)

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._watches.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def watch(self, dirs: Iterable[Path]) -> None:
        """Watch exactly ``dirs`` from the next wait on (e.g. a symlink's new target)."""
        wanted = tuple(dict.fromkeys(dirs))
        for gone in set(self._watches) - set(wanted):
            self._unwatch(gone)
        self._dirs = wanted

    @property
    def watching(self) -> bool:
        """Whether every directory is watched (else the caller must poll); a wait
        arms what is not."""
        return all(d in self._watches for d in self._dirs)

    def wake(self) -> None:
        """Ends the current (or the next) wait at once; safe from any thread."""
        with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._wake_w, b"x")

    def wait(self, timeout_s: float | None) -> bool:
        """Blocks until a watched directory changed or ``wake()`` (True), or until
        ``timeout_s`` passed (False; None waits without a timeout).

        A directory watched for the first time (at the first wait, or again after it was
        replaced) returns True at once: it may have changed before the watch began, so
        the caller looks again, and from then on no change goes unseen."""
        if self._arm():
            return True
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._inotify is not None and self._watches:
            poller.register(self._inotify.fileno(), select.POLLIN)
        timeout_ms = None if timeout_s is None else max(0, round(timeout_s * 1000))
        ready = poller.poll(timeout_ms)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 64):
                pass
        if self._inotify is not None and self._watches:
            self._drain()
        return True

    def _drain(self) -> None:
        assert self._inotify is not None
        by_watch = {wd: d for d, wd in self._watches.items()}
        for event in self._inotify.read(timeout=0):
            if event.mask & _GONE and event.wd in by_watch:
                # The directory went (or moved): watch the new one at the next wait.
                d = by_watch.pop(event.wd)
                if not event.mask & flags.IGNORED:
                    with contextlib.suppress(OSError):
                        self._inotify.rm_watch(event.wd)
                self._watches.pop(d, None)

    def _arm(self) -> bool:
        """Watch every directory not watched yet; True when one more is watched now."""
        added = False
        for d in self._dirs:
            if d in self._watches:
                continue
            try:
                if self._inotify is None:
                    self._inotify = INotify(nonblocking=True)
                self._watches[d] = self._inotify.add_watch(d, self._mask)
            except OSError as exc:
                # Absent: quietly, the next wait tries again. Anything else is said once:
                # the caller polls instead, so it works, a little later and less cheaply.
                if not isinstance(exc, FileNotFoundError | NotADirectoryError) and (
                    str(exc) != self._unavailable
                ):
                    self._unavailable = str(exc)
                    log.warning("cannot watch %s (%s); polling it instead", d, exc)
                continue
            added = True
        return added

    def _unwatch(self, d: Path) -> None:
        wd = self._watches.pop(d, None)
        if wd is not None and self._inotify is not None:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)
