"""The source threads, side by side behind one declared shape: etcd (cards and event channels),
NATS and ZMQ (load reports), and the backlog that bounds what each hands the reducer.

Every source is a :class:`Source`: a daemon thread named ``workermon-<name>``
that runs until the monitor's stop event is set, can be woken from any thread
(:meth:`Source.wake`), keeps its :class:`~workermon._health.SourceStatus`,
reports a failure once per distinct error (:meth:`Source.note_error`), and
answers its own :meth:`Source.health` — its counters together with what
waits in its backlog.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

import attrs

from .._health import SourceHealth, SourceStatus
from .backlog import Backlog

__all__ = ["Source"]


class Source(threading.Thread):
    """One source thread (see the package docstring)."""

    def __init__(self, name: str, stopping: threading.Event, status: SourceStatus, backlog: Backlog) -> None:
        super().__init__(name=f"workermon-{name}", daemon=True)
        self._stopping = stopping
        self.status = status
        self.backlog = backlog
        self._last_error_logged: Optional[str] = None

    def wake(self, deadline: Optional[float] = None) -> None:
        """Make the thread notice the stop event soon (any thread; never blocks)."""
        raise NotImplementedError

    def health(self) -> SourceHealth:
        """Its status, with the load waiting in its backlog (``queued_items``, ``queued_bytes``)."""
        view = self.status.view()
        return attrs.evolve(view, counters={**view.counters, "queued_items": self.backlog.items,
                                            "queued_bytes": self.backlog.nbytes})

    def note_error(self, text: str, log: logging.Logger, level: int = logging.WARNING,
                   exc: Optional[BaseException] = None, message: Optional[str] = None) -> None:
        """Count a failure and keep ``text`` as ``last_error``; log ``message`` (default ``text``) once
        per distinct error, not once per retry."""
        self.status.inc("errors")
        self.status.last_error = text
        if text != self._last_error_logged:
            self._last_error_logged = text
            log.log(level, "%s", message or text, exc_info=exc)

    def recovered(self) -> None:
        """Connected again: the next error is logged even if it is the last one again."""
        self.status.state = "connected"
        self.status.last_error = None
        self._last_error_logged = None
