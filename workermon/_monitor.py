"""WorkerMonitor: the facade — configuration, lifecycle, reads, picking, callbacks, health.

Data flow: the source threads (:mod:`workermon._sources`) put updates on one
``queue.Queue``; ``workermon-reducer`` (:mod:`workermon._loop`) drains it in
batches, applies them to the :class:`~workermon._reduce.FleetState` under an
``RLock``, swaps in an immutable snapshot (which readers use without any
lock), then calls the callbacks outside the lock.  This module owns the
queue, the lock and the threads' lifecycle, and the API routers call.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from typing import (
    Any,
    Callable,
    Collection,
    Deque,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import attrs

from ._base import EMPTY, BaseMonitor, CallbackHandle, Snapshot, live_monitors, wait_on
from ._config import MonitorConfig, configure
from ._health import SourceStatus
from ._healthview import HealthMethods
from ._kvmonitor import KvMethods
from ._kvroute import KvRouting
from ._loop import STOP, ReducerLoop
from ._model import (
    BusyChange,
    EventPlane,
    Explanation,
    OutagePolicy,
    Overloaded,
    PickState,
    StalePolicy,
    Thresholds,
    WorkerLoadState,
)
from ._picker import Overflow, Picker, Reservation, Strategy, check_blocks
from ._reduce import FleetState
from ._sources import build_sources, source_configs
from ._sources.etcd import EtcdSource
from ._sources.nats import NatsSource
from ._sources.kvevents import KvSource
from ._sources.zmq import ZmqSource
from ._tokens import Prompt
from .options import EtcdOptions, KvOptions, Limits, NatsOptions, Reconnect

log = logging.getLogger(__name__)

__all__ = ["CallbackHandle", "WorkerMonitor"]


Callback = Callable[[BusyChange], Any]


class _FromEnv:
    def __repr__(self) -> str:
        return "<from environment>"


FROM_ENV: Any = _FromEnv()
_UNCHANGED: Any = object()
_UNSET: Any = object()

class WorkerMonitor(ReducerLoop, KvMethods, HealthMethods, BaseMonitor):
    """Which Dynamo workers are busy, kept current by three threads.

    Create it, register callbacks, :meth:`start` it, then read
    :meth:`busy_workers` / :meth:`is_busy` on every request (lock-free, O(1)).
    See the README for every option; names follow Dynamo's where it has one.

    With ``etcd_endpoints=None`` the monitor runs in static mode (no threads;
    nothing is ever busy), as Dynamo's router does without a discovery plane.
    With ``nats_servers=None`` only membership is tracked (nothing is busy).
    """

    _picker: Picker

    def __init__(
        self,
        etcd_endpoints: Union[Sequence[str], str, None] = FROM_ENV,
        nats_servers: Union[Sequence[str], str, None] = FROM_ENV,
        namespace: str = "dynamo",
        busy_threshold: Optional[float] = _UNSET,
        *,
        thresholds: Optional[Thresholds] = None,
        component: Optional[str] = None,
        endpoint: Optional[str] = None,
        event_plane: EventPlane = FROM_ENV,
        zmq_broker_url: Optional[str] = FROM_ENV,
        etcd: Optional[EtcdOptions] = None,
        nats: Optional[NatsOptions] = None,
        limits: Optional[Limits] = None,
        reconnect: Optional[Reconnect] = None,
        strategy: Strategy = "p2c",
        reservation_ttl: float = 300.0,
        admission: bool = True,
        overload_hold: float = 1.0,
        overflow: Overflow = "steer",
        kv_index: Union[bool, KvOptions] = False,
        _clock: Callable[[], float] = time.monotonic,
        **deprecated: Any,
    ) -> None:
        if not isinstance(overload_hold, (int, float)) or isinstance(overload_hold, bool) or not (
            0 <= overload_hold < float("inf")
        ):
            raise ValueError(f"overload_hold must be a number of seconds >= 0, got {overload_hold!r}")
        self.config: MonitorConfig = configure(
            etcd_endpoints=etcd_endpoints, nats_servers=nats_servers, namespace=namespace,
            busy_threshold=busy_threshold, unset=_UNSET, thresholds=thresholds, component=component,
            endpoint=endpoint, event_plane=event_plane, zmq_broker_url=zmq_broker_url, etcd=etcd, nats=nats,
            limits=limits, reconnect=reconnect, deprecated=deprecated, environ=os.environ, from_env=FROM_ENV)
        cfg = self.config
        self.namespace = namespace
        self.overload_hold = float(overload_hold)
        self._clock = _clock
        self._state = FleetState(cfg.thresholds, cfg.limits, admission=bool(admission))
        self._max_load_bytes = cfg.limits.max_load_bytes
        self._picker = Picker(self._state, lambda: self._snapshot.free_order, _clock, strategy, reservation_ttl,
                              overloaded=self._mark_overloaded, overflow=overflow)
        kv_opts = kv_index if isinstance(kv_index, KvOptions) else KvOptions() if kv_index else None
        self._kv = None if kv_opts is None else KvRouting(kv_opts, self._state, self._picker,
                                                         lambda: self._snapshot.members)
        self._kv_sources: Tuple[KvSource, ...] = ()
        self.event_plane: EventPlane = cfg.event_plane
        self.nats_required = cfg.nats_required
        self.static = cfg.static
        self.card_prefix = cfg.card_prefix
        self._cfgs = source_configs(cfg)
        self._etcd_cfg = self._cfgs.etcd
        self._nats_cfg = self._cfgs.nats
        self._zmq_cfg = self._cfgs.zmq

        self._lock = threading.RLock()
        self._callbacks_lock = self._lock  # registration also queues the first call, under the same lock
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._stopping = threading.Event()
        self._etcd_ready = threading.Event()
        self._nats_ready = threading.Event()
        self._zmq_ready = threading.Event()
        if self._nats_cfg is None or not self.nats_required:
            self._nats_ready.set()
        if self._zmq_cfg is None:
            self._zmq_ready.set()
        self._snapshot = EMPTY
        self._callbacks: Tuple[CallbackHandle, ...] = ()
        self._outbox: Deque[Tuple[BusyChange, Tuple[CallbackHandle, ...]]] = deque()
        self._lifecycle = threading.Lock()
        self._started = False
        self._stopped = False
        self._threads: List[threading.Thread] = []
        self._etcd: Optional[EtcdSource] = None
        self._nats: Optional[NatsSource] = None
        self._zmq: Optional[ZmqSource] = None
        self._etcd_status = SourceStatus("etcd", _clock)
        self._nats_status = SourceStatus("nats", _clock)
        self._zmq_status = SourceStatus("zmq", _clock)
        self._kv_status = SourceStatus("kv-events", _clock)
        self._kv_nats_status = SourceStatus("kv-events-nats", _clock)
        self._callback_errors = 0
        self._wake_pending = False
        self._snapshot_listeners: List[Callable[[], None]] = []
        # Static mode delivers on the registering thread: one at a time.
        self._deliver_lock = threading.Lock()
        self._delivering: Optional[int] = None
        self._warned_reasons: set[str] = set()
        self._owner_pid = os.getpid()
        self._forked_from: Optional[int] = None
        # Notified after every applied batch, for wait_for().
        self._changed = threading.Condition()

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> "WorkerMonitor":
        """Start the threads and return at once (see :meth:`wait_ready`).

        Raises ``RuntimeError`` if already started or stopped.  Thread-safe.
        """
        with self._lifecycle:
            self._check_fork()
            if self._started or self._stopped:
                raise RuntimeError("WorkerMonitor.start() was already called; create a new monitor")
            self._started = True
            if self.static:
                self._etcd_status.state = self._nats_status.state = self._zmq_status.state = "static"
                self._etcd_ready.set()
                self._nats_ready.set()
                self._zmq_ready.set()
                return self
            self._owner_pid = os.getpid()
            live_monitors.add(self)
            sources = build_sources(
                self._cfgs, self._queue.put, self._stopping,
                {"etcd": self._etcd_status, "nats": self._nats_status, "zmq": self._zmq_status,
                 "kv": self._kv_status, "kv-nats": self._kv_nats_status},
                {"nats": lambda: self._set_ready(self._nats_ready), "zmq": lambda: self._set_ready(self._zmq_ready)},
                self.config.limits, self.nats_required, self._kv.index if self._kv is not None else None,
                self._kv.options.max_message_bytes if self._kv is not None else 0, self.members,
                self._kv_changed)
            self._etcd, self._nats, self._zmq = sources.etcd, sources.nats, sources.zmq
            self._kv_sources = tuple(s for s in (sources.kv, sources.kv_nats) if s is not None)
            if self._kv_sources:
                self.add_listener(self._kv_members_listener())
            reducer = threading.Thread(target=self._run_reducer, name="workermon-reducer", daemon=True)
            self._threads = [reducer, *sources.all()]
            for thread in self._threads:
                thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop every thread and wait up to ``timeout`` seconds in all for them.

        Idempotent; safe from any thread, including a callback (the calling
        thread is not joined).  Returns True when every other thread ended.
        """
        with self._lifecycle:
            self._stopped = True
            self._stopping.set()
            threads = list(self._threads)
        if self._forked_from is not None:
            # A forked child's copy: its threads, gRPC calls and event loop
            # belong to the parent; touching them here could hang the child.
            return True
        # Every wait_for()/wait_ready() returns now (see their docstrings).
        with self._changed:
            self._changed.notify_all()
        deadline = time.monotonic() + max(0.0, timeout)
        # One sentinel, put last: the reducer applies what came before it.
        self._queue.put(STOP)
        for source in self._sources():
            source.wake(deadline)
        me = threading.current_thread()
        for thread in threads:
            if thread is me:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
        ok = not any(t.is_alive() for t in threads if t is not me)
        if not ok:
            log.warning("workermon: threads still running after stop(timeout=%s)", timeout)
        return ok

    def wait_ready(self, timeout: Optional[float] = 5.0) -> bool:
        """True once the initial etcd listing is applied and the event planes asked for are subscribed.

        False when ``timeout`` passes first (for example while a server is
        unreachable), and at once once :meth:`stop` has been called.  In
        static mode True at once.  Any thread.
        """
        return super().wait_ready(timeout)

    @property
    def ready(self) -> bool:
        """Whether the initial listing is applied and the metrics feed is subscribed (False after stop).
        Any thread."""
        if self.static:
            return True
        return (
            not self._stopping.is_set()
            and self._etcd_ready.is_set()
            and self._nats_ready.is_set()
            and self._zmq_ready.is_set()
        )

    def _kv_members_listener(self) -> Callable[[], None]:
        """A snapshot listener that tells the KV-events sources when the member set changed (O(1): the
        reducer keeps the member set's object while membership stays)."""
        seen = [self._snapshot.members]

        def listener() -> None:
            members = self._snapshot.members
            if members is not seen[0]:
                seen[0] = members
                for src in self._kv_sources:
                    src.members_changed()

        return listener

    def _kv_changed(self) -> None:
        # The KV index changed (a KV-events thread): wait_for() re-checks.
        with self._changed:
            self._changed.notify_all()

    def _set_ready(self, event: threading.Event) -> None:
        # Readiness is waited on under the condition; set it there too.
        with self._changed:
            event.set()
            self._changed.notify_all()
        self._notify_listeners()

    # --- for integrations (the host agent): public, cheap, never blocking ---------------

    def snapshot(self) -> "Snapshot":
        """The immutable snapshot readers use (``busy``, ``members``, ``free``, ``version``), one consistent
        triple: lock-free, any thread."""
        return self._snapshot

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (no arguments) whenever the snapshot or readiness changes.

        It runs on the reducer (or a source) thread and must not block: poke
        your own thread and read :meth:`snapshot` there.
        """
        self._snapshot_listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener`` (no error when it was not added).  Any thread."""
        try:
            self._snapshot_listeners.remove(listener)
        except ValueError:
            pass

    def count_bookings_from(self, booked: Optional[Callable[[int, int], int]]) -> None:
        """Count bookings made elsewhere: ``booked(worker_id, dp_rank)`` → blocks booked on that rank
        since its last report (the host agent passes its clients' shared-memory bookings).

        ``why()``, ``reserve()`` and ``select()`` then add them; None stops it.
        Called on any thread that picks or explains: it must be cheap and never block.
        """
        self._picker.external = booked

    def wait_pick_changes(self, timeout: Optional[float] = None
                          ) -> Tuple["Snapshot", Dict[int, Optional[PickState]]]:
        """``(snapshot, changes)``: what picking needs of every worker whose state changed since the
        last call (None: it left), and the snapshot those changes bring the reader up to.

        Taken together under the lock, so once the changes are applied
        elsewhere (the host agent's shared memory) that snapshot may be
        published beside them and never runs ahead of them.  The first call
        returns every worker.  Waits up to ``timeout`` seconds for a change
        (``{}`` at timeout or once stopped).  For one consumer; any thread but a callback.
        """
        state = self._state
        if state.track_dirty:
            wait_on(self._changed, lambda: state.has_dirty, timeout, self._stopping)
        with self._lock:
            first = not state.track_dirty
            dirty = state.take_dirty()
            if first:
                dirty = set(state.workers)
            return self._snapshot, {wid: state.pick_state(wid) for wid in dirty}

    def _notify_listeners(self) -> None:
        for listener in self._snapshot_listeners:
            # Internal (the host agent): must not block; it only pokes a waker.
            try:
                listener()
            except Exception:  # noqa: BLE001
                log.exception("workermon snapshot listener failed")

    def load_states(self) -> Dict[int, WorkerLoadState]:
        """A consistent copy of every member's state (takes the lock; O(fleet)).  Any thread."""
        self._check_fork()
        with self._lock:
            return self._state.load_states(self._clock())

    def load_state(self, worker_id: int) -> Optional[WorkerLoadState]:
        """One member's state, or None when it is not a member.  Any thread (takes the lock briefly)."""
        self._check_fork()
        if worker_id < 0:
            worker_id += 1 << 64
        with self._lock:
            if worker_id not in self._state.workers:
                return None
            return self._state.load_state(worker_id, self._clock())

    @property
    def thresholds(self) -> Thresholds:
        """The busy rule in force now (see :meth:`set_thresholds`): lock-free, any thread."""
        return self._state.thresholds

    # --- picking (a lock of the picker's own; reads above stay lock-free) ---------

    def select(
        self,
        *,
        strategy: Optional[Strategy] = None,
        exclude: Collection[int] = (),
        blocks: Optional[int] = None,
        model: Optional[str] = None,
        worker_type: Optional[str] = None,
    ) -> Optional[int]:
        """A worker :meth:`reserve` could book now with these arguments, without booking it (None: no
        member can take it).

        For ``"p2c"`` and ``"random"`` each call is an independent draw, so a
        ``reserve()`` right after may choose another worker; ``"least_loaded"``
        and ``"round_robin"`` answer what the next ``reserve()`` would choose
        if nothing changes in between (a ``select()`` does not advance round
        robin).  For dry runs, and for routers that book elsewhere (then call
        :meth:`overloaded` on a 529).  Any thread; never blocks on I/O.
        """
        if self._forked_from is not None:
            self._check_fork()
        chosen = self._picker.pick(book=False, strategy=strategy, exclude=exclude, blocks=blocks, model=model,
                                   worker_type=worker_type)
        return None if chosen is None else chosen.worker_id

    def reserve(
        self,
        *,
        strategy: Optional[str] = None,
        exclude: Collection[int] = (),
        blocks: Optional[int] = None,
        model: Optional[str] = None,
        worker_type: Optional[str] = None,
        tokens: Optional[Sequence[int]] = None,
        prompt: Optional[Prompt] = None,
        lora_name: Optional[str] = None,
        cache_salt: Optional[str] = None,
        tokenizer: Any = None,
    ) -> Optional[Reservation]:
        """Book a worker (and data-parallel rank) for one request; returns at once.

        ``None`` when no member can take it — every member busy or predicted
        busy: answer 503/529.  The booking adds ``blocks`` (default 1) to the
        rank's predicted load — max(report + bookings since it, unreleased
        bookings): a newer report takes it in, unless the report leaves it
        out — until the reservation is released (``release()``, or leave its
        ``with`` block); one never released expires after ``reservation_ttl``.
        ``strategy``: ``"p2c"`` (default), ``"least_loaded"``, ``"round_robin"``,
        ``"random"``; ``exclude``: ids not to choose (a retry after a failed
        forward); ``model`` / ``worker_type``: the card's ``display_name`` /
        ``worker_type``.  ``strategy="kv"`` (``kv_index=True``): by cached
        prefix and load, as Dynamo's KV router (see ``prefix_overlap`` for
        ``tokens`` / ``prompt`` / ``lora_name`` / ``cache_salt`` /
        ``tokenizer``); the reservation carries ``overlap_blocks`` and the
        ``token_ids`` to forward.  Thread-safe and atomic; any thread.
        """
        if self._forked_from is not None:
            self._check_fork()
        if strategy == "kv":
            return self._reserve_kv(tokens, prompt, model, worker_type, exclude, lora_name, cache_salt, tokenizer)
        chosen = self._picker.pick(book=True, strategy=strategy, exclude=exclude, blocks=blocks, model=model,
                                   worker_type=worker_type)
        return None if chosen is None else chosen.reservation

    def in_flight(self, worker_id: int) -> int:
        """Reservations held on ``worker_id`` now (expired ones dropped first).  Any thread."""
        if worker_id < 0:
            worker_id += 1 << 64
        return self._picker.in_flight(worker_id)

    def why(self, worker_id: int, *, blocks: Optional[int] = None) -> Explanation:
        """Why ``worker_id`` is (or is not) busy right now: each rank's values, the rule and threshold
        each was held against, staleness, the outage policy in force, bookings in flight, card
        admission (which field differs from the incumbent's), a 529 hold.

        ``blocks`` (default: the picker's, 1) is the request size: a rank the rule calls free but
        whose bookings leave no room for it is marked not ``pickable``.  ``str()`` of the result
        reads as a few lines of text.  Takes the lock; any thread.
        """
        self._check_fork()
        if isinstance(worker_id, bool) or not isinstance(worker_id, int):
            raise TypeError(f"worker_id must be an int, got {worker_id!r}")
        if worker_id < 0:
            worker_id += 1 << 64
        size = self._picker.default_blocks if blocks is None else check_blocks(blocks)
        in_flight = self._picker.in_flight(worker_id)
        with self._lock:
            explained = self._state.explain(worker_id, self._clock(), self._picker.booked, in_flight, size)
        if self._kv is None:
            return explained
        return attrs.evolve(explained, kv=self._kv.describe(worker_id, [r.rank for r in explained.ranks]))

    def overloaded(self, worker_id: int) -> None:
        """The frontend answered 529 (overloaded) for a request on ``worker_id``.

        The worker is busy (``is_busy``, ``busy_workers()``, callbacks; never
        picked) until its next load report or for ``overload_hold`` seconds,
        whichever is first — what the frontend itself remembers of a refusal.
        ``Reservation.overloaded()`` calls this after releasing; call it
        directly when you book elsewhere (``select()``).  Any thread; takes
        the lock briefly; a no-op with ``overload_hold=0``, in static mode or
        once stopped.
        """
        self._check_fork()
        if worker_id < 0:
            worker_id += 1 << 64
        self._mark_overloaded(worker_id)

    def _mark_overloaded(self, worker_id: int) -> None:
        if self._forked_from is not None or self.static or not self._started or self._stopping.is_set():
            return
        with self._lock:
            self._state.apply_overloaded(Overloaded(worker_id, self.overload_hold), self._clock())
            self._publish_locked()
        self._wake_reducer()

    # --- writes ---------------------------------------------------------------

    def set_thresholds(
        self,
        busy_threshold: Optional[float] = _UNCHANGED,
        *,
        recover_threshold: Optional[float] = _UNCHANGED,
        prefill_tokens_threshold: Optional[int] = _UNCHANGED,
        prefill_tokens_threshold_frac: Optional[float] = _UNCHANGED,
        metrics_ttl: Optional[float] = _UNCHANGED,
        stale_policy: StalePolicy = _UNCHANGED,
        outage_policy: OutagePolicy = _UNCHANGED,
        outage_grace: float = _UNCHANGED,
    ) -> Thresholds:
        """Change the busy rule at run time; pass None to turn an option off.

        When it returns, the snapshot already reflects the new rule; callbacks
        for the resulting change run on the reducer thread.  Any thread,
        including a callback.  Raises ``ValueError`` for invalid values (and
        then changes nothing).
        """
        changes: Dict[str, Any] = {
            name: value
            for name, value in (
                ("busy_threshold", busy_threshold),
                ("recover_threshold", recover_threshold),
                ("prefill_tokens_threshold", prefill_tokens_threshold),
                ("prefill_tokens_threshold_frac", prefill_tokens_threshold_frac),
                ("metrics_ttl", metrics_ttl),
                ("stale_policy", stale_policy),
                ("outage_policy", outage_policy),
                ("outage_grace", outage_grace),
            )
            if value is not _UNCHANGED
        }
        self._check_fork()
        with self._lock:
            new = attrs.evolve(self._state.thresholds, **changes)
            self._state.set_thresholds(new, self._clock())
            self._publish_locked()
        self._wake_reducer()
        return new

    def on_busy_change(self, callback: Callback) -> CallbackHandle:
        """Register ``callback(change: BusyChange)``; usable as a decorator.

        Callbacks run on the reducer thread, outside the lock, one at a time;
        one that raises is logged and the others still run.  They may call
        any method of the monitor, including :meth:`stop`, but should not
        block for long: ingestion waits while they run.  Registered after
        :meth:`start`, a callback is first called once with the current state.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._check_fork()
        handle = CallbackHandle(callback, self)
        with self._lock:
            self._callbacks = self._callbacks + (handle,)
            running = self._started and not self._stopped
            if running:
                snap = self._snapshot
                self._outbox.append(
                    (BusyChange(snap.busy, snap.busy, frozenset(), frozenset(), snap.version), (handle,))
                )
        if running:
            if self.static:
                self._deliver()
            else:
                self._wake_reducer()
        return handle

    def _sources(self) -> List[Any]:
        return [s for s in (self._etcd, self._nats, self._zmq, *self._kv_sources) if s is not None]

    # --- fork ---------------------------------------------------------------

    def __repr__(self) -> str:
        mode = "static" if self.static else ("running" if self._started and not self._stopped else
                                             "stopped" if self._stopped else "new")
        return (
            f"<WorkerMonitor {mode} namespace={self.namespace!r} members={len(self._snapshot.members)} "
            f"busy={len(self._snapshot.busy)} version={self._snapshot.version}>"
        )
