"""WorkerMonitor.health(): each source's state and counters, the reducer's and the picker's.

A mixin, as :mod:`workermon._loop` and :mod:`workermon._kvmonitor` are: the
facade stays one class while each part lives in a module of its own.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Optional

import attrs

from ._health import Health, SourceHealth, SourceStatus
from ._sources import Source

__all__ = ["HealthMethods"]


class HealthMethods:
    _lock: Any
    _forked_from: Optional[int]
    _state: Any
    _callback_errors: int
    _queue: Any
    _nats: Any
    _etcd: Any
    _zmq: Any
    _picker: Any
    _started: bool
    _stopped: bool
    _threads: Any
    _nats_cfg: Any
    _zmq_cfg: Any
    nats_required: bool
    _etcd_status: SourceStatus
    _nats_status: SourceStatus
    _zmq_status: SourceStatus
    _snapshot: Any
    event_plane: str
    static: bool

    if TYPE_CHECKING:
        @property
        def ready(self) -> bool: ...

    _kv_health: Callable[[], Optional[SourceHealth]]

    def health(self) -> Health:
        """Each source's state, last event and counters, and the reducer's counters.

        Any thread.  In a forked child it answers without the lock (which a
        parent thread may have held at fork time) and says ``alive=False``.
        """
        with self._lock if self._forked_from is None else contextlib.nullcontext():
            reducer = dict(self._state.counters)
            reducer["pending_workers"] = self._state.pending_workers
            reducer["pending_ranks"] = self._state.pending_ranks
            reducer["unadmitted_workers"] = self._state.unadmitted
            members = len(self._state.workers) - self._state.unadmitted
        reducer["callback_errors"] = self._callback_errors
        reducer["queued_items"] = self._queue.qsize()
        # Each source answers for itself, its backlog included (queued_items,
        # queued_bytes); each drop is counted once, where it happens.
        if self._nats is not None:
            reducer["queued_messages"] = self._nats.backlog.items  # the same figures, under their old names
            reducer["queued_bytes"] = self._nats.backlog.nbytes
        if self._etcd is not None:
            reducer["queued_card_events"] = self._etcd.backlog.items
        picker = dict(self._picker.counters)
        picker["in_flight"], picker["booked_blocks"] = self._picker.totals()
        alive = self._started and not self._stopped and all(t.is_alive() for t in self._threads)
        if self._forked_from is not None:
            alive = False
        required = ["etcd"]
        if self._nats_cfg is not None and self.nats_required:
            required.append("nats")
        if self._zmq_cfg is not None:
            required.append("zmq")
        return Health(
            etcd=self._source_health(self._etcd, self._etcd_status, None),
            nats=self._source_health(self._nats, self._nats_status, None if self._nats_cfg is not None else (
                "NATS disabled (event_plane='zmq')" if self.event_plane == "zmq"
                else "NATS disabled (nats_servers=None)")),
            reducer=reducer,
            members=members,
            busy=len(self._snapshot.busy),
            ready=self.ready,
            alive=alive or (self.static and self._started and not self._stopped),
            zmq=self._zmq_health(),
            required=tuple(required) if not self.static else ("etcd", "nats"),
            picker=picker,
            kv=self._kv_health(),
        )

    def _zmq_health(self) -> SourceHealth:
        h = self._source_health(self._zmq, self._zmq_status, None if self._zmq_cfg is not None else
                                "ZMQ disabled (event_plane='nats')")
        unknown = self._etcd.unknown_layout if self._etcd is not None else None
        if unknown is not None and self._zmq_cfg is not None:
            # Say it in words rather than stay silently blind to a newer release's channels.
            note = (f"kv_metrics channels found under an unknown layout (e.g. {unknown!r}): this workermon does not "
                    "know that Dynamo release's event-channel layout, so their load reports are not read")
            h = attrs.evolve(h, last_error=note if h.last_error is None else f"{h.last_error}; {note}")
        return h

    def _source_health(self, source: Optional[Source], status: SourceStatus, disabled: Optional[str]) -> SourceHealth:
        if source is not None:
            return source.health()
        if disabled is not None and not self.static:
            return SourceHealth(status.name, "idle", None, {}, disabled)
        return status.view()  # not started yet, or static
