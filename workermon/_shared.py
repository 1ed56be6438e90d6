"""SharedMonitor: a WorkerMonitor's router-facing API, served by the host agent.

One thread per process (``workermon-shared``) holds the connection to
``workermon agent``: it applies the state the agent pushes (busy set,
membership, version, readiness) to an immutable local snapshot that every read
uses without a lock, fires ``on_busy_change`` callbacks from the differences,
and maps the agent's shared memory.  No load report ever reaches this process.

``reserve()``, ``select()`` and ``release()`` never wait on another process:
they pick from the shared memory (:class:`~workermon._picker.SharedPicker`) and
book in this process's own row there, so bookings are host-wide at once.
The socket carries only what is rare — ``why()``, ``load_states()``,
``health()``, ``set_thresholds()`` (waiting at most ``request_timeout``), and a
529's ``overloaded()`` (sent without waiting).  Nothing on a request thread
blocks on the agent: sends go through a bounded outbox the connection thread
flushes (:class:`~workermon._sharedlink.AgentLink`).

When the agent is gone, hung or restarting: reads keep serving the last state;
``ready`` and ``wait_ready()`` turn False (a hung agent within ``hung_after``
seconds); picking goes on over the last state the agent published, booking in
this process only; requests raise ``AgentUnavailable``.  The connection is
re-established with capped, jittered back-off.  Bookings belong to one
connection: after a reconnect an old reservation's ``release()`` frees nothing
of the new one's, and ``version`` never goes backwards across agent restarts.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket as sockets
import threading
import time
import warnings
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import attrs

from ._base import BaseMonitor, CallbackHandle, Snapshot, live_monitors
from ._health import Backoff, Health, SourceHealth
from ._model import (
    BusyChange,
    Explanation,
    RankExplanation,
    Thresholds,
    WorkerLoadState,
    check_worker_id,
    normalize_worker_id,
)
from ._picker import OVERFLOW, STRATEGIES, Overflow, Reservation, Strategy, check_blocks
from ._sharedlink import AgentLink
from ._sharedpick import SharedPicker
from ._protocol import (
    MAX_REPLY,
    FrameError,
    FrameReader,
    check_socket_file,
    default_socket_path,
    peer_uid,
)
from ._reduce import Counters
from ._shm import SharedFleet
from ._waker import Waker
from .options import Reconnect

log = logging.getLogger(__name__)

__all__ = ["AgentUnavailable", "SharedMonitor"]



class AgentUnavailable(RuntimeError):
    """The host agent is not connected, or did not answer within the bound."""


class SharedMonitor(BaseMonitor):
    """The same API as :class:`WorkerMonitor` for everything a router uses, over the host agent.

    Create it after fork (gunicorn ``post_fork``), like ``WorkerMonitor``.
    ``socket``: the agent's socket (default ``$WORKERMON_AGENT_SOCKET``, else
    a per-user runtime path: see ``workermon agent --help``).
    ``strategy``, ``overflow`` and ``reservation_ttl``: as for ``WorkerMonitor``;
    ``strategy`` and ``overflow`` left None follow the agent's (``workermon
    agent --strategy/--overflow``; ``"p2c"`` and ``"steer"`` until it says).
    ``hung_after``: seconds without any frame from the agent (it is pinged
    every second) after which ``ready`` turns False; ``reconnect``: the
    back-off between connection attempts (default 50 ms → 1 s).
    """

    _picker: SharedPicker

    def __init__(self, socket: Optional[str] = None, *, request_timeout: float = 1.0,
                 reconnect: Optional[Reconnect] = None, strategy: Optional[Strategy] = None,
                 reservation_ttl: float = 300.0, overload_hold: float = 1.0, hung_after: float = 2.0,
                 overflow: Optional[Overflow] = None,
                 **deprecated: Any) -> None:
        unknown = set(deprecated) - {"timeout", "backoff_initial", "backoff_cap"}
        if unknown:
            raise TypeError(f"SharedMonitor() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        if "timeout" in deprecated:
            warnings.warn("SharedMonitor(timeout=…) is deprecated and unused: no request thread waits on the agent "
                          "any more", DeprecationWarning, stacklevel=2)
        if "backoff_initial" in deprecated or "backoff_cap" in deprecated:
            warnings.warn("SharedMonitor(backoff_initial=…, backoff_cap=…) is deprecated: use "
                          "reconnect=Reconnect(initial=…, cap=…)", DeprecationWarning, stacklevel=2)
            base = reconnect or Reconnect(0.05, 1.0)
            reconnect = Reconnect(deprecated.get("backoff_initial", base.initial),
                                  deprecated.get("backoff_cap", base.cap))
        if not 0 < hung_after < float("inf"):
            raise ValueError(f"hung_after must be a number of seconds > 0, got {hung_after!r}")
        if not 0 <= overload_hold < float("inf"):
            raise ValueError(f"overload_hold must be a number of seconds >= 0, got {overload_hold!r}")
        self.socket_path = socket or default_socket_path()
        self.request_timeout = request_timeout
        self.hung_after = hung_after
        self.overload_hold = float(overload_hold)
        self.reconnect = reconnect if reconnect is not None else Reconnect(0.05, 1.0)
        self._own_defaults = (strategy, overflow)
        self._picker = SharedPicker(strategy or "p2c", reservation_ttl, overloaded=self.overloaded,
                                    overflow=overflow or "steer")
        self._snapshot = Snapshot(frozenset(), frozenset(), 0)
        self._agent_ready = False
        self._had_ready_state = False
        self._had_state = False
        self._connected = False
        self._hung = False
        self._epoch: Optional[int] = None
        self._version_base = 0
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._callbacks_lock = self._changed
        self._lifecycle = threading.Lock()
        self._started = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._waker = Waker()
        self._callbacks: Tuple[CallbackHandle, ...] = ()
        self._pending_initial: List[CallbackHandle] = []
        # Workers this process saw answer 529: worker -> until (the agent's hold reaches the
        # shared memory a few ms later; this process leaves them out from the first moment).
        self._local_holds: Dict[int, float] = {}
        self._fleet: Optional[SharedFleet] = None  # the agent's mapping (owned by the picker once attached)
        self.counters = Counters()
        self._link = AgentLink(self.counters, self._waker.poke)
        self.last_error: Optional[str] = None
        self._last_state_at: Optional[float] = None
        self._owner_pid = os.getpid()
        self._forked_from: Optional[int] = None
        self.static = False

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> "SharedMonitor":
        """Start the connection thread and return at once (see :meth:`wait_ready`).

        RuntimeError if already started or stopped, or used across a fork.  Any thread.
        """
        with self._lifecycle:
            self._check_fork()
            if self._started or self._stopped:
                raise RuntimeError("SharedMonitor.start() was already called; create a new one")
            self._started = True
            self._owner_pid = os.getpid()
            live_monitors.add(self)  # marked unusable in a forked child, as WorkerMonitor
            self._thread = threading.Thread(target=self._run, name="workermon-shared", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Close the connection and join the thread, within ``timeout`` whatever the agent does.

        Idempotent; any thread, including a callback (which is not joined).  True when the thread ended.
        """
        with self._lifecycle:
            self._stopped = True
            self._stopping.set()
        if self._forked_from is not None:
            return True
        self._waker.poke()
        with self._changed:
            self._changed.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def ready(self) -> bool:
        """Connected to an agent that answers and whose monitor is ready.  Lock-free; any thread."""
        return self._connected and self._agent_ready and not self._hung and not self._stopping.is_set()

    # --- picking: in this process, from the shared memory ------------------------------

    def reserve(self, *, strategy: Optional[str] = None, exclude: Collection[int] = (), blocks: Optional[int] = None,
                model: Optional[str] = None, worker_type: Optional[str] = None) -> Optional[Reservation]:
        """As :meth:`WorkerMonitor.reserve`, host-wide; never waits on the agent.  Any thread."""
        if self._forked_from is not None:
            self._check_fork()
        chosen = self._picker.pick(self._snapshot.free_order, book=True, strategy=strategy,
                                   exclude=self._excluded(exclude), blocks=blocks, model=model,
                                   worker_type=worker_type)
        return None if chosen is None else chosen.reservation

    def select(self, *, strategy: Optional[str] = None, exclude: Collection[int] = (), blocks: Optional[int] = None,
               model: Optional[str] = None, worker_type: Optional[str] = None) -> Optional[int]:
        """As :meth:`WorkerMonitor.select`; never waits on the agent.  Any thread."""
        if self._forked_from is not None:
            self._check_fork()
        chosen = self._picker.pick(self._snapshot.free_order, book=False, strategy=strategy,
                                   exclude=self._excluded(exclude), blocks=blocks, model=model,
                                   worker_type=worker_type)
        return None if chosen is None else chosen.worker_id

    def _excluded(self, exclude: Collection[int]) -> Collection[int]:
        if not self._local_holds:
            return exclude
        now = time.monotonic()
        for wid, until in list(self._local_holds.items()):
            if until <= now:
                self._local_holds.pop(wid, None)
        return set(exclude) | set(self._local_holds)

    def in_flight(self, worker_id: int) -> int:
        """Reservations this process holds on ``worker_id`` (every process's bookings: ``why()``).  Any thread."""
        return self._picker.in_flight(normalize_worker_id(check_worker_id(worker_id)))

    def overloaded(self, worker_id: int) -> None:
        """The frontend answered 529 for a request on ``worker_id``: as :meth:`WorkerMonitor.overloaded`.

        The agent holds it busy host-wide; this process leaves it out of its
        picks at once, for ``overload_hold`` seconds.  Never blocks; any thread.
        """
        worker_id = normalize_worker_id(check_worker_id(worker_id))
        if self.overload_hold > 0:
            self._local_holds[worker_id] = time.monotonic() + self.overload_hold
        self._link.send({"t": "overloaded", "worker_id": worker_id})

    # --- requests answered by the agent ---------------------------------------------------

    def why(self, worker_id: int, *, blocks: Optional[int] = None) -> Explanation:
        """As :meth:`WorkerMonitor.why`, as the agent sees it.  Any thread."""
        worker_id = check_worker_id(worker_id)
        if blocks is not None:
            check_blocks(blocks)
        value = self._require({"t": "why", "worker_id": worker_id, "blocks": blocks})
        value["ranks"] = tuple(RankExplanation(**r) for r in value["ranks"])
        value["thresholds"] = Thresholds(**value["thresholds"])
        return Explanation(**value)

    def load_states(self) -> Dict[int, WorkerLoadState]:
        """Every member's state from the agent (a few MB at 10,000 workers), within ``request_timeout``
        (else ``AgentUnavailable``).  Any thread but a callback."""
        value = self._require({"t": "load_states"})
        return {int(wid): _load_state(st) for wid, st in value.items()}

    def load_state(self, worker_id: int) -> Optional[WorkerLoadState]:
        """One worker's state from the agent, or None.  Any thread."""
        value = self._require({"t": "load_state", "worker_id": check_worker_id(worker_id)})
        return None if value is None else _load_state(value)

    def set_thresholds(self, **changes: Any) -> Thresholds:
        """Change the agent's rule for every process of the host.  Any thread."""
        return Thresholds(**self._require({"t": "set_thresholds", "changes": changes}))

    @property
    def thresholds(self) -> Thresholds:
        """The agent's monitor's rule (a request to the agent, bounded by ``request_timeout``).  Any thread."""
        return Thresholds(**self._require({"t": "thresholds"}))

    def health(self) -> Health:
        """The agent's monitor's health, with this process's picker and connection counters.

        When the agent is gone or hung: ``alive``/``ready`` False, answered
        locally within ``request_timeout``.  Any thread.
        """
        picker = {**dict(self._picker.counters), "in_flight": self._picker.in_flight()}
        reply = self._ask({"t": "health"}, self.request_timeout) if self._connected else None
        if reply is None or "value" not in reply:
            idle = SourceHealth("agent", "reconnecting", None, dict(self.counters),
                                self.last_error or "the workermon agent is not connected")
            return Health(etcd=idle, nats=idle, reducer={}, members=len(self._snapshot.members),
                          busy=len(self._snapshot.busy), ready=False, alive=False, zmq=idle,
                          required=("etcd",), picker=picker)
        v = reply["value"]
        for name in ("etcd", "nats", "zmq"):
            v[name] = SourceHealth(**v[name])
        v["required"] = tuple(v["required"])
        v["ready"] = v["ready"] and self.ready
        v["alive"] = v["alive"] and self._connected and not self._hung
        v["picker"] = picker
        h = Health(**v)
        return attrs.evolve(h, reducer={**h.reducer, **{f"shared_{k}": n for k, n in self.counters.items()}})

    def on_busy_change(self, callback: Callable[[BusyChange], Any]) -> CallbackHandle:
        """As :meth:`WorkerMonitor.on_busy_change` (any thread); callbacks run on ``workermon-shared``, one
        at a time.

        Registered after :meth:`start`, it is first called with the current
        state at once (when this process has one: else as soon as the agent's
        first state arrives).
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._check_fork()
        handle = CallbackHandle(callback, self)
        with self._changed:
            self._callbacks = self._callbacks + (handle,)
            if self._started and not self._stopped:
                self._pending_initial.append(handle)
        self._waker.poke()
        return handle

    # --- the connection thread --------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self._stopping, self.reconnect.initial, self.reconnect.cap)
        try:
            while not self._stopping.is_set():
                sock = self._connect()
                if sock is not None:
                    backoff.reset()
                    try:
                        self._read_loop(sock)
                    except Exception as exc:  # noqa: BLE001 - reconnect after anything
                        if not self._stopping.is_set():
                            self._note_error(f"connection to the agent failed: {exc}")
                    finally:
                        self._disconnected(sock)
                    if self._stopping.is_set():
                        break
                    self.counters.inc("disconnects")
                # Callbacks registered while the agent is away still get the last state.
                self._deliver_initial()
                backoff.wait()
        finally:
            self._picker.close()
            self._waker.close()

    def _connect(self) -> Optional[sockets.socket]:
        sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        try:
            check_socket_file(self.socket_path)
            sock.settimeout(1.0)
            sock.connect(self.socket_path)
            uid = peer_uid(sock)
            if uid is not None and uid != os.getuid():
                raise PermissionError(f"the process serving {self.socket_path} runs as uid {uid}, not as this "
                                      f"user ({os.getuid()}): refusing it")
        except (OSError, ValueError) as exc:
            sock.close()
            self._note_error(f"cannot connect to {self.socket_path}: {exc}")
            return None
        sock.setblocking(False)
        self._link.attach(sock)
        self._connected = True
        self._hung = False
        self.counters.inc("connects")
        return sock

    def _disconnected(self, sock: sockets.socket) -> None:
        self._picker.detach()
        self._link.detach()
        self._connected = False
        self._agent_ready = False
        sock.close()
        with self._changed:
            self._changed.notify_all()

    def _read_loop(self, sock: sockets.socket) -> None:
        reader = FrameReader(MAX_REPLY)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, "sock")
        sel.register(self._waker.fd, selectors.EVENT_READ, "wake")
        last_rx = last_ping = time.monotonic()
        writing = False
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(0.25):
                    if key.data == "wake":
                        self._waker.drain()
                        continue
                    try:
                        data = sock.recv(1 << 16)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not data:
                        raise ConnectionError("the agent closed the connection")
                    last_rx = time.monotonic()
                    if self._hung:
                        self._hung = False
                        with self._changed:
                            self._changed.notify_all()
                    try:
                        msgs = reader.feed(data)
                    except FrameError as exc:
                        self.counters.inc("malformed")
                        raise ConnectionError(f"malformed bytes from the agent: {exc}") from None
                    for msg in msgs:
                        self._on_frame(msg)
                now = time.monotonic()
                if now - last_ping >= 1.0:
                    last_ping = now
                    self._link.send({"t": "ping"})
                if now - last_rx > self.hung_after and not self._hung:
                    self._hung = True  # it does not answer our pings: not ready, picking goes on
                    self.counters.inc("hung")
                    self._note_error(f"the agent at {self.socket_path} has not answered for {self.hung_after:g} s")
                    with self._changed:
                        self._changed.notify_all()
                writing = self._link.flush(sock, sel, writing)
                self._deliver_initial()
        finally:
            sel.close()

    def _on_frame(self, msg: Dict[str, Any]) -> None:
        t = msg.get("t")
        if t == "state":
            self._apply_state(msg)
        elif t == "reply":
            self._link.reply(msg)
        elif t == "hello":
            self._hello(msg)
        elif t == "pong":
            pass
        elif t == "refused":
            raise PermissionError(str(msg.get("error"))[:300])
        else:
            self.counters.inc("malformed")
            raise ConnectionError(f"unknown frame {str(t)[:40]!r} from the agent")

    def _hello(self, msg: Dict[str, Any]) -> None:
        try:
            path, epoch, row = str(msg["shm"]), int(msg["epoch"]), int(msg["row"])
        except (KeyError, TypeError, ValueError):
            raise ConnectionError("malformed hello from the agent") from None
        if epoch != self._epoch:
            self._fleet = SharedFleet.open(path, expect_epoch=epoch)  # checks owner and mode
            if self._epoch is not None:
                # A new agent lifetime: its versions start again at 0; ours never go backwards.
                self._version_base = self._snapshot.version
                self.counters.inc("agent_restarts")
            self._epoch = epoch
        assert self._fleet is not None
        self._picker.attach(self._fleet, row)
        strategy, overflow = self._own_defaults
        # The agent's defaults, where this process set none (an older agent sends none).
        if strategy is None and msg.get("strategy") in STRATEGIES:
            self._picker.strategy = str(msg["strategy"])
        if overflow is None and msg.get("overflow") in OVERFLOW:
            self._picker.overflow = str(msg["overflow"])

    def _apply_state(self, msg: Dict[str, Any]) -> None:
        try:
            busy = frozenset(msg["busy"])
            # Members come only when they changed: else the last ones stand.
            members = frozenset(msg["members"]) if "members" in msg else self._snapshot.members
            if not all(type(w) is int for w in busy) or ("members" in msg and not all(type(w) is int for w in members)):
                raise TypeError("worker ids must be integers")
            version = self._version_base + int(msg["version"])
        except (KeyError, TypeError, ValueError):
            self.counters.inc("malformed")
            raise ConnectionError("malformed state from the agent") from None
        if not msg.get("ready") and self._had_ready_state:
            # A restarted agent that has not listed the fleet yet: its view is incomplete;
            # keep serving the last complete state until it is ready.
            self._agent_ready = False
            with self._changed:
                self._changed.notify_all()
            return
        self._had_ready_state = self._had_ready_state or bool(msg.get("ready"))
        # A callback registered since the last state first gets that state, then this change.
        self._deliver_initial()
        old = self._snapshot
        version = max(version, old.version)
        self._snapshot = Snapshot(busy, members, version)
        self._had_state = True
        self._last_state_at = time.monotonic()
        self._agent_ready = bool(msg.get("ready"))
        self.last_error = None
        with self._changed:
            self._changed.notify_all()
            targets = self._callbacks
        if busy != old.busy:
            became_busy = busy - old.busy
            left = old.busy - busy
            change = BusyChange(busy, became_busy, left & members, left - members, version)
            for handle in targets:
                if not handle.cancelled and not self._stopping.is_set():
                    try:
                        handle.callback(change)
                    except Exception:  # noqa: BLE001
                        self.counters.inc("callback_errors")
                        log.exception("workermon callback %r raised; the others still run", handle)

    def _deliver_initial(self) -> None:
        if not self._had_state:
            return
        with self._changed:
            pending, self._pending_initial = self._pending_initial, []
        snap = self._snapshot
        for handle in pending:
            if not handle.cancelled and not self._stopping.is_set():
                try:
                    handle.callback(BusyChange(snap.busy, snap.busy, frozenset(), frozenset(), snap.version))
                except Exception:  # noqa: BLE001
                    self.counters.inc("callback_errors")
                    log.exception("workermon callback %r raised", handle)

    # --- requests: never blocking a request thread beyond request_timeout ---------------------

    def _ask(self, msg: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        if not self._connected or self._hung:
            return None
        return self._link.ask(msg, timeout)

    def _require(self, msg: Dict[str, Any], key: str = "value") -> Any:
        reply = self._ask(msg, self.request_timeout)
        if reply is None:
            raise AgentUnavailable(f"the workermon agent at {self.socket_path} did not answer within "
                                   f"{self.request_timeout:g} s ({self.last_error or 'not connected'})")
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply[key]

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("workermon shared monitor: %s; retrying", text)
        self.last_error = text

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return (f"<SharedMonitor {state} {self.socket_path} members={len(self._snapshot.members)} "
                f"busy={len(self._snapshot.busy)} version={self._snapshot.version}>")


def _load_state(st: Dict[str, Any]) -> WorkerLoadState:
    import types

    for k in ("kv_active_blocks", "active_prefill_tokens", "kv_used_blocks", "active_decode_blocks"):
        if k in st:
            st[k] = types.MappingProxyType({int(r): v for r, v in st[k].items()})
    for k in ("busy_ranks", "stale_ranks"):
        if k in st:
            st[k] = frozenset(st[k])
    if "card_keys" in st:
        st["card_keys"] = tuple(st["card_keys"])
    return WorkerLoadState(**st)
