"""SharedMonitor: a WorkerMonitor's router-facing API, served by the host agent.

One thread per process (``workermon-shared``) holds the connection to
``workermon agent``: it applies the state the agent pushes (busy set,
membership, version, readiness) to an immutable local snapshot that every read
uses without a lock, and fires ``on_busy_change`` callbacks from the
differences.  No load report ever reaches this process.

Requests (``reserve()``, ``select()``, ``why()``, ``health()``…) go to the agent
and wait at most ``timeout`` seconds (``reserve``/``select``: 50 ms by default)
on the calling thread.  When the agent is gone, or does not answer in time:

- reads keep serving the last state (``health()`` and ``wait_ready()`` say the
  agent is gone);
- ``reserve()`` / ``select()`` pick locally: p2c over the last known free set,
  by reservations this process holds (local credit), so picking goes on;
- ``why()``, ``load_states()``, ``set_thresholds()`` raise ``AgentUnavailable``.

The connection is re-established with capped, jittered back-off; callbacks then
resume with the current state.
"""

from __future__ import annotations

import logging
import os
import random
import socket as sockets
import threading
import time
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import attrs

from ._agent import FrameError, FrameReader, default_socket_path, encode_frame
from ._health import Backoff, Health, SourceHealth
from ._model import BusyChange, Explanation, RankExplanation, Thresholds, WorkerLoadState
from ._monitor import CallbackHandle, SnapshotReads, _live_monitors, _Snapshot, wait_on
from ._picker import Reservation, check_strategy

log = logging.getLogger(__name__)

__all__ = ["AgentUnavailable", "SharedMonitor"]

class AgentUnavailable(RuntimeError):
    """The host agent is not connected, or did not answer within the bound."""


class _RemoteBooking:
    __slots__ = ("token", "live", "wid")

    def __init__(self, token: Optional[int], wid: int) -> None:
        self.token = token
        self.live = True
        self.wid = wid


class SharedMonitor(SnapshotReads):
    """The same API as :class:`WorkerMonitor` for everything a router uses, over the host agent.

    Create it after fork (gunicorn ``post_fork``), like ``WorkerMonitor``.
    ``socket``: the agent's socket (default ``$WORKERMON_AGENT_SOCKET``, else
    a per-user runtime path: see ``workermon agent --help``).
    """

    def __init__(self, socket: Optional[str] = None, *, timeout: float = 0.05, request_timeout: float = 1.0,
                 backoff_initial: float = 0.05, backoff_cap: float = 1.0) -> None:
        self.socket_path = socket or default_socket_path()
        self.timeout = timeout
        self.request_timeout = request_timeout
        self._backoff = (backoff_initial, backoff_cap)
        self._snapshot = _Snapshot(frozenset(), frozenset(), 0)
        self._agent_ready = False
        self._had_ready_state = False
        self._connected = False
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._lifecycle = threading.Lock()
        self._started = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[sockets.socket] = None
        self._send_lock = threading.Lock()
        self._waiting: Dict[int, List[Any]] = {}  # request id -> [event, reply]
        self._ids = 0
        self._callbacks: Tuple[CallbackHandle, ...] = ()
        self._pending_initial: List[CallbackHandle] = []
        self._local_inflight: Dict[int, int] = {}
        # Workers this process saw answer 529, for its fallback picks: worker -> until.
        self._local_holds: Dict[int, float] = {}
        self.overload_hold = 1.0
        self._rng = random.Random()
        self.counters: Dict[str, int] = {}
        self.last_error: Optional[str] = None
        self._last_state_at: Optional[float] = None
        self._owner_pid = os.getpid()
        self._forked_from: Optional[int] = None
        self.static = False

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> "SharedMonitor":
        with self._lifecycle:
            self._check_fork()
            if self._started or self._stopped:
                raise RuntimeError("SharedMonitor.start() was already called; create a new one")
            self._started = True
            self._owner_pid = os.getpid()
            _live_monitors.add(self)  # marked unusable in a forked child, as WorkerMonitor
            self._thread = threading.Thread(target=self._run, name="workermon-shared", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        with self._lifecycle:
            self._stopped = True
            self._stopping.set()
        if self._forked_from is not None:
            return True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(sockets.SHUT_RDWR)
            except OSError:
                pass
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def __enter__(self) -> "SharedMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        return self._connected and self._agent_ready and not self._stopping.is_set()

    def wait_ready(self, timeout: Optional[float] = 5.0) -> bool:
        """True once connected to an agent whose monitor is ready; False at timeout, or once stopped."""
        return self._wait(lambda: self.ready, timeout, stop_value=False)

    def wait_for(self, predicate: Callable[[], bool], timeout: Optional[float] = 5.0) -> bool:
        """Re-check ``predicate()`` after every state the agent pushes; its last value."""
        return self._wait(predicate, timeout)

    def _wait(self, predicate: Callable[[], bool], timeout: Optional[float], stop_value: Optional[bool] = None) -> bool:
        return wait_on(self._cond, predicate, timeout, self._stopping, stop_value)

    # --- picking ------------------------------------------------------------------------

    def reserve(self, *, strategy: Optional[str] = None, exclude: Collection[int] = (), blocks: Optional[int] = None,
                model: Optional[str] = None, worker_type: Optional[str] = None) -> Optional[Reservation]:
        """As :meth:`WorkerMonitor.reserve`, host-wide (the agent books); local fallback when it is gone."""
        if self._forked_from is not None:
            self._check_fork()
        if strategy is not None:
            check_strategy(strategy)
        reply = self._ask({"t": "reserve", "strategy": strategy, "exclude": list(exclude), "blocks": blocks,
                           "model": model, "worker_type": worker_type}, self.timeout)
        if reply is None:
            reservation: Optional[Reservation] = self._local_pick(exclude, book=True)
            return reservation
        if "error" in reply:
            raise ValueError(reply["error"])
        if reply["worker_id"] is None:
            self._count("rejected")
            return None
        booking = _RemoteBooking(reply["token"], reply["worker_id"])
        reason = str(reply.get("reason", ""))
        return Reservation(reply["worker_id"], reply.get("dp_rank", 0), lambda: reason, blocks or 1,
                           self._release, booking, self.overloaded)

    def select(self, *, strategy: Optional[str] = None, exclude: Collection[int] = (), blocks: Optional[int] = None,
               model: Optional[str] = None, worker_type: Optional[str] = None) -> Optional[int]:
        if self._forked_from is not None:
            self._check_fork()
        if strategy is not None:
            check_strategy(strategy)
        reply = self._ask({"t": "select", "strategy": strategy, "exclude": list(exclude), "blocks": blocks,
                           "model": model, "worker_type": worker_type}, self.timeout)
        if reply is None:
            wid: Optional[int] = self._local_pick(exclude, book=False)
            return wid
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["worker_id"]  # type: ignore[no-any-return]

    def _local_pick(self, exclude: Collection[int], book: bool) -> Any:
        # The agent is gone or slow: p2c over the last known free set by the
        # reservations this process holds (local credit), so routing goes on.
        self._count("local_picks")
        excluded = set(exclude)
        if self._local_holds:
            now = time.monotonic()
            for wid, until in list(self._local_holds.items()):
                if until <= now:
                    self._local_holds.pop(wid, None)
            excluded.update(self._local_holds)
        free = [w for w in self._snapshot.free_order if w not in excluded]
        if not free:
            self._count("rejected")
            return None
        a, b = (self._rng.choice(free), self._rng.choice(free))
        wid = a if self._local_inflight.get(a, 0) <= self._local_inflight.get(b, 0) else b
        if not book:
            return wid
        self._local_inflight[wid] = self._local_inflight.get(wid, 0) + 1
        booking = _RemoteBooking(None, wid)
        return Reservation(wid, 0, lambda: f"local p2c (agent unavailable): {wid:x} by in-flight count", 1,
                           self._release, booking, self.overloaded)

    def overloaded(self, worker_id: int) -> None:
        """The frontend answered 529 for a request on ``worker_id``: as :meth:`WorkerMonitor.overloaded`.

        The agent holds it busy host-wide; this process also leaves it out of
        its own fallback picks for ``overload_hold`` (1 s).  Never blocks; any thread.
        """
        if worker_id < 0:
            worker_id += 1 << 64
        self._local_holds[worker_id] = time.monotonic() + self.overload_hold
        self._send({"t": "overloaded", "worker_id": worker_id})

    def _release(self, booking: _RemoteBooking) -> None:
        if not booking.live:
            return
        booking.live = False
        if booking.token is None:
            n = self._local_inflight.get(booking.wid, 0) - 1
            if n > 0:
                self._local_inflight[booking.wid] = n
            else:
                self._local_inflight.pop(booking.wid, None)
            return
        self._send({"t": "release", "token": booking.token})  # the agent also releases on disconnect

    # --- requests answered by the agent ---------------------------------------------------

    def why(self, worker_id: int) -> Explanation:
        value = self._require({"t": "why", "worker_id": worker_id})
        value["ranks"] = tuple(RankExplanation(**r) for r in value["ranks"])
        value["thresholds"] = Thresholds(**value["thresholds"])
        return Explanation(**value)

    def load_states(self) -> Dict[int, WorkerLoadState]:
        value = self._require({"t": "load_states"})
        return {int(wid): _load_state(st) for wid, st in value.items()}

    def load_state(self, worker_id: int) -> Optional[WorkerLoadState]:
        if worker_id < 0:
            worker_id += 1 << 64
        return self.load_states().get(worker_id)

    def set_thresholds(self, **changes: Any) -> Thresholds:
        reply = self._ask({"t": "set_thresholds", "changes": changes}, self.request_timeout)
        if reply is None:
            raise AgentUnavailable(f"the workermon agent at {self.socket_path} is not available")
        if "error" in reply:
            raise ValueError(reply["error"])
        return Thresholds(**reply["value"])

    @property
    def thresholds(self) -> Thresholds:
        """The agent's monitor's rule (a request to the agent)."""
        return Thresholds(**self._require({"t": "thresholds"}))

    def health(self) -> Health:
        """The agent's monitor's health, with a ``shared`` source for this connection.

        When the agent is gone: ``alive``/``ready`` False and the ``shared``
        source ``reconnecting`` (answered locally, at once).
        """
        shared = SourceHealth("shared", "connected" if self._connected else "reconnecting",
                              None if self._last_state_at is None else max(0.0, time.monotonic() - self._last_state_at),
                              dict(self.counters), self.last_error, self.socket_path)
        reply = self._ask({"t": "health"}, self.request_timeout) if self._connected else None
        if reply is None or "value" not in reply:
            idle = SourceHealth("agent", "reconnecting", None, {}, "the workermon agent is not connected")
            return Health(etcd=idle, nats=idle, reducer={}, members=len(self._snapshot.members),
                          busy=len(self._snapshot.busy), ready=False, alive=False, zmq=idle,
                          required=("etcd",), picker={"local_picks": self.counters.get("local_picks", 0)})
        v = reply["value"]
        for name in ("etcd", "nats", "zmq"):
            v[name] = SourceHealth(**v[name])
        v["required"] = tuple(v["required"])
        v["ready"] = v["ready"] and self.ready
        v["alive"] = v["alive"] and self._connected
        v["picker"] = {**v["picker"], "local_picks": self.counters.get("local_picks", 0)}
        h = Health(**v)
        return attrs.evolve(h, reducer={**h.reducer, **{f"shared_{k}": n for k, n in shared.counters.items()}})

    def on_busy_change(self, callback: Callable[[BusyChange], Any]) -> CallbackHandle:
        """As :meth:`WorkerMonitor.on_busy_change`; callbacks run on ``workermon-shared``, one at a time."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._check_fork()
        handle = CallbackHandle(callback, self)  # type: ignore[arg-type]
        with self._cond:
            self._callbacks = self._callbacks + (handle,)
            if self._started and not self._stopped and self._connected:
                self._pending_initial.append(handle)
                self._poke_self()
        return handle

    def _unregister(self, handle: CallbackHandle) -> None:
        with self._cond:
            self._callbacks = tuple(h for h in self._callbacks if h is not handle)

    # --- the connection thread --------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self._stopping, *self._backoff)
        while not self._stopping.is_set():
            try:
                sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
                sock.connect(self.socket_path)
            except OSError as exc:
                self._note_error(f"cannot connect to {self.socket_path}: {exc}")
                sock.close()
                if backoff.wait():
                    break
                continue
            self._sock = sock
            self._connected = True
            self._count("connects")
            backoff.reset()
            try:
                self._read_loop(sock)
            except Exception as exc:  # noqa: BLE001 - reconnect after anything
                if not self._stopping.is_set():
                    self._note_error(f"connection to the agent failed: {exc}")
            finally:
                self._connected = False
                self._agent_ready = False
                self._sock = None
                sock.close()
                self._fail_waiters()
                with self._cond:
                    self._cond.notify_all()
            if not self._stopping.is_set():
                self._count("disconnects")
                if backoff.wait():
                    break

    def _read_loop(self, sock: sockets.socket) -> None:
        reader = FrameReader()
        while not self._stopping.is_set():
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the agent closed the connection")
            try:
                msgs = reader.feed(data)
            except FrameError as exc:
                self._count("malformed")
                raise ConnectionError(f"malformed bytes from the agent: {exc}") from None
            for msg in msgs:
                t = msg.get("t")
                if t == "state":
                    self._apply_state(msg)
                elif t == "reply":
                    slot = self._waiting.pop(msg.get("id"), None)  # type: ignore[arg-type]
                    if slot is not None:
                        slot[1] = msg
                        slot[0].set()
                elif t == "refused":
                    self._note_error(str(msg.get("error")))
                    raise ConnectionError(str(msg.get("error")))
                elif t == "poke":
                    pass
                else:
                    self._count("malformed")
                    raise ConnectionError(f"unknown frame {t!r} from the agent")
            self._deliver_initial()

    def _apply_state(self, msg: Dict[str, Any]) -> None:
        try:
            busy = frozenset(int(w) for w in msg["busy"])
            members = frozenset(int(w) for w in msg["members"])
            version = int(msg["version"])
        except (KeyError, TypeError, ValueError):
            self._count("malformed")
            raise ConnectionError("malformed state from the agent") from None
        if not msg.get("ready") and self._had_ready_state:
            # A restarted agent that has not listed the fleet yet: its view is incomplete;
            # keep serving the last complete state until it is ready.
            self._agent_ready = False
            with self._cond:
                self._cond.notify_all()
            return
        self._had_ready_state = self._had_ready_state or bool(msg.get("ready"))
        # A callback registered since the last state first gets that state, then this change.
        self._deliver_initial()
        old = self._snapshot
        self._snapshot = _Snapshot(busy, members, version)
        self._last_state_at = time.monotonic()
        self._agent_ready = bool(msg.get("ready"))
        self.last_error = None
        with self._cond:
            self._cond.notify_all()
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
                        self._count("callback_errors")
                        log.exception("workermon callback %r raised; the others still run", handle)

    def _deliver_initial(self) -> None:
        with self._cond:
            pending, self._pending_initial = self._pending_initial, []
        snap = self._snapshot
        for handle in pending:
            if not handle.cancelled and not self._stopping.is_set():
                try:
                    handle.callback(BusyChange(snap.busy, snap.busy, frozenset(), frozenset(), snap.version))
                except Exception:  # noqa: BLE001
                    self._count("callback_errors")
                    log.exception("workermon callback %r raised", handle)

    def _poke_self(self) -> None:
        # Initial callbacks run on the connection thread: ask the agent for
        # something cheap so the read loop wakes (a release of no token).
        self._send({"t": "release", "token": None})

    # --- sending --------------------------------------------------------------------------

    def _send(self, msg: Dict[str, Any]) -> bool:
        sock = self._sock
        if sock is None:
            return False
        frame = encode_frame(msg)
        try:
            with self._send_lock:
                sock.sendall(frame)
            return True
        except OSError:
            return False

    def _ask(self, msg: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        if not self._connected:
            return None
        with self._send_lock:
            self._ids += 1
            rid = self._ids
        slot: List[Any] = [threading.Event(), None]
        self._waiting[rid] = slot
        msg["id"] = rid
        if not self._send(msg):
            self._waiting.pop(rid, None)
            return None
        if not slot[0].wait(timeout):
            self._waiting.pop(rid, None)
            self._count("timeouts")
            return None
        return slot[1]  # type: ignore[no-any-return]

    def _require(self, msg: Dict[str, Any], key: str = "value") -> Any:
        reply = self._ask(msg, self.request_timeout)
        if reply is None:
            raise AgentUnavailable(f"the workermon agent at {self.socket_path} did not answer within "
                                   f"{self.request_timeout:g} s")
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply[key]

    def _fail_waiters(self) -> None:
        for slot in list(self._waiting.values()):
            slot[0].set()
        self._waiting.clear()

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("workermon shared monitor: %s; retrying", text)
        self.last_error = text

    def _check_fork(self) -> None:
        if self._forked_from is not None:
            raise RuntimeError(
                f"this SharedMonitor was started in process {self._forked_from} and its thread does not exist "
                f"after fork() (in process {os.getpid()}); create and start a new one in the child, e.g. in "
                "gunicorn's post_fork hook (see examples/gunicorn.conf.py)"
            )

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
