"""The reducer thread: drains the queue, applies each batch, swaps in the snapshot, delivers callbacks.

A mixin of :class:`~workermon.WorkerMonitor`: ``workermon-reducer`` is the
only writer of the fleet state.  It drains the queue in batches (each NATS or
ZMQ item is itself a batch of payloads), applies them under the monitor's
``RLock``, lets the state expire what is due, publishes a new immutable
snapshot when something changed, wakes every waiter, and then — outside the
lock — calls the callbacks in version order.  Once ``stop()`` is called no
callback runs, but everything queued before the sentinel is still applied.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Deque, List, Optional, Set, Tuple

from ._base import CallbackHandle, Snapshot
from ._model import BusyChange, CardDelete, CardListing, CardPut
from ._parse import Malformed, parse_load_fields
from ._reduce import FleetState
from ._sources.backlog import PayloadBatch

log = logging.getLogger("workermon._monitor")

__all__ = ["ReducerLoop", "STOP", "WAKE"]

STOP = object()
WAKE = object()
_ETCD_ITEMS = (CardPut, CardDelete, CardListing)
_MAX_BATCH = 512  # queue items per reducer pass (each NATS item is itself a batch)


class ReducerLoop:
    """The ``workermon-reducer`` thread's work (see the module docstring)."""

    _state: FleetState
    _lock: Any
    _queue: "queue.Queue[object]"
    _stopping: threading.Event
    _changed: threading.Condition
    _etcd_ready: threading.Event
    _snapshot: Snapshot
    _callbacks: Tuple[CallbackHandle, ...]
    _outbox: Deque[Tuple[BusyChange, Tuple[CallbackHandle, ...]]]
    _threads: List[threading.Thread]
    _started: bool
    _wake_pending: bool
    _max_load_bytes: int
    _warned_reasons: Set[str]
    _callback_errors: int
    _deliver_lock: threading.Lock
    _delivering: Optional[int]
    _etcd: Any
    static: bool
    _clock: Callable[[], float]

    def _notify_listeners(self) -> None:
        raise NotImplementedError

    def _wake_reducer(self) -> None:
        # At most one wake-up waits in the queue, however many threads call
        # set_thresholds()/on_busy_change(); none once stopped.
        if (
            self._started
            and not self.static
            and not self._stopping.is_set()
            and not self._wake_pending
            and threading.current_thread() is not self._threads[0]
        ):
            self._wake_pending = True
            self._queue.put(WAKE)

    def _run_reducer(self) -> None:
        while True:
            try:
                if self._reduce_once():
                    break
            except Exception:  # noqa: BLE001 - the reducer must never die silently
                self._state.counters.inc("reducer_errors")
                log.exception("workermon reducer failed on a batch; continuing")
                if self._stopping.is_set():
                    break
        log.debug("workermon reducer stopped")

    def _reduce_once(self) -> bool:
        """Apply one batch; True when the thread should end."""
        q = self._queue
        with self._lock:
            deadline = self._state.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        items: List[object] = []
        try:
            items.append(q.get(timeout=timeout))
        except queue.Empty:
            pass
        while len(items) < _MAX_BATCH:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        stop = False
        listed = False
        with self._lock:
            now = self._clock()
            state = self._state
            for item in items:
                if item is STOP:
                    stop = True
                    break
                if item is WAKE:
                    self._wake_pending = False
                    continue
                try:
                    if type(item) is PayloadBatch:
                        self._apply_loads(item, now)
                    else:
                        try:
                            state.apply(item, now)
                        finally:
                            if isinstance(item, _ETCD_ITEMS) and self._etcd is not None:
                                self._etcd.backlog.note_applied(1)
                        if isinstance(item, CardListing):
                            listed = True
                except Exception:  # noqa: BLE001 - one bad update must not cost the others
                    state.counters.inc("reducer_errors")
                    log.exception("workermon reducer failed on %s; continuing", type(item).__name__)
            try:
                state.expire(now)
            except Exception:  # noqa: BLE001
                state.counters.inc("reducer_errors")
                log.exception("workermon reducer failed while expiring state; continuing")
            self._publish_locked()
        first_listing = listed and not self._etcd_ready.is_set()
        with self._changed:
            if listed:
                self._etcd_ready.set()
            self._changed.notify_all()
        if first_listing:
            self._notify_listeners()
        if stop:
            return True
        # Once stop() is called no callback runs, but everything queued
        # before the sentinel is still applied (bounded by the backlogs).
        if not self._stopping.is_set():
            self._deliver()
        return False

    def _apply_loads(self, batch: PayloadBatch, now: float) -> None:
        state = self._state
        apply = state.apply_load_fields
        limit = self._max_load_bytes
        bare = batch.bare
        applied = 0
        try:
            for raw in batch:
                try:
                    wid, rank, kv, decode, prefill, revision = parse_load_fields(raw, limit, bare)
                except Malformed as exc:
                    state.counters.inc("malformed_load")
                    state.counters.inc(f"malformed_load_{exc.reason}")
                    if exc.reason not in self._warned_reasons:
                        self._warned_reasons.add(exc.reason)
                        log.warning("dropping malformed load report (%s); further ones are only counted", exc)
                    continue
                applied += apply(wid, rank, kv, decode, prefill, revision, now)
        finally:
            state.counters.inc("load_reports", applied)
            batch.backlog.note_applied(len(batch), batch.nbytes)

    def _publish_locked(self) -> None:
        """Swap in a new snapshot and queue the change for the callbacks."""
        state = self._state
        change = state.commit()
        membership = state.take_membership_changed()
        if change is None and not membership:
            return
        old = self._snapshot
        busy = change.busy if change is not None else old.busy
        # Rebuilding the member set is O(fleet): only when membership changed.
        members = state.members if membership else old.members
        self._snapshot = Snapshot(busy, members, state.version)
        if change is not None:
            self._outbox.append((change, self._callbacks))
        self._notify_listeners()

    def _deliver(self) -> None:
        # The reducer thread delivers in version order.  In static mode the
        # registering thread delivers: one thread at a time, and a callback
        # that registers another leaves it to the loop already running.
        if not self.static:
            self._drain_outbox()
            return
        me = threading.get_ident()
        if self._delivering == me:
            return
        with self._deliver_lock:
            self._delivering = me
            try:
                self._drain_outbox()
            finally:
                self._delivering = None

    def _drain_outbox(self) -> None:
        outbox = self._outbox
        while outbox:
            try:
                change, targets = outbox.popleft()
            except IndexError:
                return
            for handle in targets:
                if handle.cancelled or self._stopping.is_set():
                    continue
                try:
                    handle.callback(change)
                except Exception:  # noqa: BLE001 - isolate each callback
                    self._callback_errors += 1
                    log.exception("workermon callback %r raised; the others still run", handle)

