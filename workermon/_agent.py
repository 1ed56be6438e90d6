"""The host agent: one monitor per host, served to the local processes of its user.

``workermon agent`` runs a :class:`~workermon.WorkerMonitor` and this server;
each gunicorn/uWSGI worker process uses :class:`~workermon.SharedMonitor`.  The
agent does all the per-report work (one etcd watch, one event-plane
subscription, one decode of each report) and publishes what picking needs in
shared memory (:mod:`workermon._shm`): every client picks and books there,
with no round trip.  Over the Unix socket it pushes the busy set, membership,
version and readiness as they change, and answers what is rare (``why()``,
``load_states()``, ``health()``, ``set_thresholds()``, a 529's
``overloaded()``).  When a client's connection closes its booking row is
cleared: the bookings of a process that died are gone with it.

Whom it serves and where: see :mod:`workermon._protocol` (both ends check).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import attrs

from ._protocol import (
    MAX_REPLY,
    REQUESTS,
    SHM_NAME,
    FrameError,
    FrameReader,
    default_socket_path,
    encode_frame,
    peer_uid,
    prepare_private_dir,
)
from ._model import check_worker_id
from ._reduce import Counters
from ._shm import SharedFleet, ShmLayout
from ._waker import Waker

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentLimits", "default_socket_path"]

MAX_OUTBUF = MAX_REPLY + (1 << 20)  # a client this far behind is dropped (it reconnects and gets the state afresh)


@attrs.frozen
class AgentLimits:
    """How large the agent's shared memory is: workers, data-parallel rank slots, client processes."""

    max_workers: int = 16384
    max_ranks: int = 65536
    max_clients: int = 128

    def layout(self) -> ShmLayout:
        return ShmLayout(self.max_workers, self.max_ranks, self.max_clients)


class _Conn:
    __slots__ = ("sock", "reader", "out", "peer", "row")

    def __init__(self, sock: socket.socket, peer: Optional[int], row: int) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.out = bytearray()
        self.peer = peer
        self.row = row


class _ShmWriter(threading.Thread):
    """``workermon-agent-shm``: copies each changed worker's picking state into shared memory."""

    def __init__(self, monitor: Any, fleet: SharedFleet, counters: Counters, on_written: Any) -> None:
        super().__init__(name="workermon-agent-shm", daemon=True)
        self.monitor = monitor
        self.fleet = fleet
        self.counters = counters
        self.stopping = threading.Event()
        # Set once a write pass that began with the monitor ready is done: from then on the
        # shared memory holds the fleet the clients are told about (the agent says ready).
        self.primed = threading.Event()
        # The newest snapshot whose changes are in the shared memory: what clients may be told.
        self.synced: Any = None
        self._on_written = on_written
        self._slots: Dict[int, int] = {}  # worker id -> slot
        self._runs: Dict[int, Tuple[int, int]] = {}  # worker id -> (first rank slot, rank count)
        self._free_slots: List[int] = []
        self._free_runs: Dict[int, List[int]] = {}  # rank count -> free first rank slots
        self._next_slot = 0
        self._next_rank = 0
        self._layout_seq = 0
        self._threshold: Optional[float] = None

    @property
    def ranks_used(self) -> int:
        return self._next_rank

    def booked(self, wid: int, rank: int, procs_used: int) -> int:
        """Blocks the clients booked on a worker's rank since its last report (any thread)."""
        run = self._runs.get(wid)
        slot = self._slots.get(wid)
        if run is None or slot is None:
            return 0
        row = self.fleet.read_slot(slot)
        if row is None or row.worker_id != wid:
            return 0
        i = rank - row.dp_start
        if not 0 <= i < run[1]:
            return 0
        return self.fleet.booked(run[0] + i, self.fleet.rank_seq(run[0] + i), procs_used)

    def run(self) -> None:
        mon = self.monitor
        try:
            while not self.stopping.is_set():
                ready_before = mon.ready
                snap, changes = mon.wait_pick_changes(
                    timeout=0.0 if ready_before and not self.primed.is_set() else 0.5)
                threshold = mon.thresholds.busy_threshold
                moved = threshold != self._threshold
                self._threshold = threshold
                for wid, st in changes.items():
                    moved |= self._write(wid, st)
                if moved:
                    self._layout_seq += 1
                    self.fleet.set_layout(self._layout_seq, self._next_slot, threshold)
                if changes:
                    self.counters.inc("shm_writes", len(changes))
                wake = snap is not self.synced
                self.synced = snap
                if ready_before and not self.primed.is_set():
                    self.primed.set()
                    wake = True
                if wake:
                    self._on_written()  # the agent pushes what is now in the shared memory
        except Exception:  # noqa: BLE001 - logged; clients then see a frozen state and say so via ready
            self.counters.inc("errors")
            log.exception("workermon agent: the shared-memory writer failed")

    def _write(self, wid: int, st: Any) -> bool:
        """Write one worker; True when a slot changed hands (clients rescan)."""
        fleet = self.fleet
        lay = fleet.layout
        if st is None:
            slot = self._slots.pop(wid, None)
            if slot is None:
                return False
            fleet.clear_slot(slot)
            self._free_slots.append(slot)
            first, n = self._runs.pop(wid)
            self._free_runs.setdefault(n, []).append(first)
            return True
        moved = False
        n = len(st.ranks)
        run = self._runs.get(wid)
        if run is not None and run[1] != n:
            self._free_runs.setdefault(run[1], []).append(run[0])
            del self._runs[wid]
            run = None
            moved = True
        if run is None:
            free = self._free_runs.get(n)
            if free:
                first = free.pop()
            elif self._next_rank + n <= lay.rank_cap:
                first = self._next_rank
                self._next_rank += n
            else:
                self.counters.inc("shm_full_ranks")
                return moved
            run = self._runs[wid] = (first, n)
            moved = True
        slot = self._slots.get(wid)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
            elif self._next_slot < lay.slot_cap:
                slot = self._next_slot
                self._next_slot += 1
            else:
                self.counters.inc("shm_full_workers")
                self._free_runs.setdefault(n, []).append(run[0])
                del self._runs[wid]
                return moved
            self._slots[wid] = slot
            moved = True
        fleet.write_slot(slot, st, run[0], n)
        return moved


class Agent(threading.Thread):
    """``workermon-agent``: serves one started monitor on a Unix socket and in shared memory."""

    def __init__(self, monitor: Any, path: Optional[str] = None, limits: AgentLimits = AgentLimits()) -> None:
        super().__init__(name="workermon-agent", daemon=True)
        self.monitor = monitor
        self.path = path or default_socket_path()
        self.limits = limits
        self.counters = Counters()
        self._stopping = threading.Event()
        self._waker = Waker()
        self._conns: Dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._listener: Optional[socket.socket] = None
        self._sent: Optional[Tuple[Any, bool]] = None
        self._uid = os.getuid()
        self.shm_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), SHM_NAME)
        self._fleet: Optional[SharedFleet] = None
        self._writer: Optional[_ShmWriter] = None
        self._free_rows: List[int] = []
        self._next_row = 0
        self._accept_paused_until = 0.0
        self._emfile_logged = False

    # --- lifecycle ----------------------------------------------------------------

    def bind(self) -> "Agent":
        """Create the socket (``0600``) and the shared memory (``0600``) in a private directory.

        Raises ``PermissionError`` (the directory is not private: says why) or
        ``OSError`` (another agent serves the path; the path is not a socket).
        Only a stale socket of this user's is ever removed.
        """
        prepare_private_dir(self.path)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{self.path} exists and is not a socket: not removing it")
            if st.st_uid != self._uid:
                raise PermissionError(f"{self.path} belongs to uid {st.st_uid}: not removing it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(self.path)
                raise OSError(f"another agent is serving {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)  # a stale socket of an agent that died
            except socket.timeout:
                raise OSError(f"another agent is serving {self.path} (it does not answer)") from None
            finally:
                probe.close()
        self._fleet = SharedFleet.create(self.shm_path, self.limits.layout())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        except BaseException:
            listener.close()
            self._remove_files()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        return self

    def close(self) -> None:
        """Undo :meth:`bind` for an agent that will not run (its files go)."""
        if self._listener is not None and not self.is_alive():
            self._listener.close()
            self._listener = None
            self._remove_files()
            self._waker.close()

    def _remove_files(self) -> None:
        for path in (self.path, self.shm_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self._fleet is not None:
            self._fleet.close()
            self._fleet = None

    def booked_blocks(self) -> int:
        """Blocks booked by every client process that still count (host-wide; O(clients × ranks))."""
        fleet, writer = self._fleet, self._writer
        if fleet is None or writer is None:
            return 0
        return fleet.booked_total(self._next_row, writer.ranks_used)

    def stop(self, timeout: float = 5.0) -> bool:
        self._stopping.set()
        self._poke()
        if self.is_alive():
            self.join(timeout)
        return not self.is_alive()

    def _on_monitor_change(self) -> None:
        # Snapshot changes reach clients through the writer (once written); here only readiness.
        if self._ready() != (self._sent is not None and self._sent[1]):
            self._poke()

    def _poke(self) -> None:
        self._waker.poke()

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None and self._fleet is not None
        sel = self._sel
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._waker.fd, selectors.EVENT_READ, "wake")
        self._writer = writer = _ShmWriter(self.monitor, self._fleet, self.counters, self._poke)
        writer.start()
        self.monitor.add_listener(self._on_monitor_change)
        # why() (and the agent monitor's own picks) count every client's bookings.
        self.monitor.count_bookings_from(lambda wid, rank: writer.booked(wid, rank, self._next_row))
        try:
            while not self._stopping.is_set():
                timeout = None
                if self._accept_paused_until:
                    timeout = max(0.0, self._accept_paused_until - time.monotonic())
                    if timeout == 0.0:
                        self._accept_paused_until = 0.0
                        sel.register(self._listener, selectors.EVENT_READ, "accept")
                        timeout = None
                for key, events in sel.select(timeout):
                    try:
                        self._handle(key, events)
                    except Exception:  # noqa: BLE001 - one connection's trouble never stops the agent
                        self.counters.inc("errors")
                        log.exception("workermon agent: unexpected error; continuing")
                        if isinstance(key.data, _Conn):
                            self._drop(key.data, "error")
                self._broadcast_if_changed()
        finally:
            self.monitor.remove_listener(self._on_monitor_change)
            self.monitor.count_bookings_from(None)
            self._writer.stopping.set()
            self._writer.join(5)
            for conn in list(self._conns.values()):
                self._drop(conn, "agent stopping")
            sel.close()
            self._listener.close()
            self._remove_files()
            self._waker.close()

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "wake":
            self._waker.drain()
            return
        if key.data == "accept":
            self._accept()
            return
        conn: _Conn = key.data
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if events & selectors.EVENT_READ and conn.sock.fileno() in self._conns:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(conn, "closed by the client")
                return
            try:
                msgs = conn.reader.feed(data)
            except FrameError as exc:
                # Bytes that are not frames: the stream cannot be resynchronised.
                self.counters.inc("malformed")
                log.warning("workermon agent: dropping a connection that sent %s", exc)
                self._drop(conn, "malformed")
                return
            for msg in msgs:
                self._request(conn, msg)

    def _accept(self) -> None:
        assert self._listener is not None and self._fleet is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin; said once.
                    self.counters.inc("accept_paused")
                    if not self._emfile_logged:
                        self._emfile_logged = True
                        log.error("workermon agent: cannot accept connections (%s); pausing accepts for 0.5 s "
                                  "at a time until descriptors are free", exc)
                    self._sel.unregister(self._listener)
                    self._accept_paused_until = time.monotonic() + 0.5
                    return
                raise
            self._emfile_logged = False
            uid = peer_uid(sock)
            if uid is not None and uid != self._uid:
                self._refuse(sock, f"workermon agent: uid {uid} may not connect; only uid {self._uid} "
                                   "(the agent's user) may")
                continue
            if self._free_rows:
                row = self._free_rows.pop()
            elif self._next_row < self.limits.max_clients:
                row = self._next_row
                self._next_row += 1
                self._fleet.set_procs_used(self._next_row)
            else:
                self._refuse(sock, f"workermon agent: already serving {self.limits.max_clients} client processes "
                                   "(agent --max-clients)")
                continue
            sock.setblocking(False)
            conn = _Conn(sock, uid, row)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self.counters.inc("connections")
            self._send(conn, {"t": "hello", "shm": self.shm_path, "epoch": self._fleet.epoch,
                              "row": row, "pid": os.getpid(), "strategy": self.monitor.strategy,
                              "overflow": self.monitor.overflow})
            self._send(conn, self._state_msg())

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.counters.inc("refused")
        try:
            sock.settimeout(0.2)  # bounded: a peer that reads nothing cannot hold the agent
            sock.sendall(encode_frame({"t": "refused", "error": why}))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()
        log.warning("%s", why)

    def _drop(self, conn: _Conn, why: str) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or fd not in self._conns:
            return
        del self._conns[fd]
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if self._fleet is not None:
            self._fleet.clear_bookings(conn.row)  # a client that went away holds nothing
        self._free_rows.append(conn.row)
        log.debug("workermon agent: connection closed (%s)", why)

    # --- sending ------------------------------------------------------------------

    def _synced(self) -> Any:
        # Clients are told only a state the shared memory already holds, so a worker told free
        # is free in the rows they pick from.
        writer = self._writer
        snap = writer.synced if writer is not None else None
        return snap if snap is not None else self.monitor.snapshot()

    def _state_msg(self, members: bool = True) -> Dict[str, Any]:
        """The state for clients; ``members`` only when it changed (a client keeps the last it got)."""
        snap = self._synced()
        msg = {"t": "state", "version": snap.version, "busy": list(snap.busy), "ready": self._ready()}
        if members:
            msg["members"] = list(snap.members)
        return msg

    def _ready(self) -> bool:
        writer = self._writer
        return bool(self.monitor.ready) and writer is not None and writer.primed.is_set()

    def _broadcast_if_changed(self) -> None:
        snap = self._synced()
        key = (snap, self._ready())
        if key == self._sent:
            return
        members_changed = self._sent is None or self._sent[0].members is not snap.members
        self._sent = key
        if not self._conns:
            return
        frame = encode_frame(self._state_msg(members_changed))
        for conn in list(self._conns.values()):
            self._send_raw(conn, frame)
        self.counters.inc("pushes")

    def _send(self, conn: _Conn, msg: Dict[str, Any]) -> None:
        self._send_raw(conn, encode_frame(msg))

    def _send_raw(self, conn: _Conn, frame: bytes) -> None:
        if len(conn.out) + len(frame) > MAX_OUTBUF:
            self.counters.inc("dropped_slow_client")
            self._drop(conn, "too far behind")
            return
        conn.out += frame
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        try:
            while conn.out:
                n = conn.sock.send(conn.out)
                del conn.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(conn, "send failed")
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        try:
            self._sel.modify(conn.sock, want, conn)
        except (KeyError, ValueError):
            pass

    # --- requests -----------------------------------------------------------------

    def _request(self, conn: _Conn, msg: Dict[str, Any]) -> None:
        """Answer one request; a bad one gets an error reply, the connection stays."""
        mon = self.monitor
        t = msg["t"]
        rid = msg.get("id")
        self.counters.inc(f"requests_{t}" if t in REQUESTS else "requests_unknown")
        try:
            if t == "ping":
                self._send(conn, {"t": "pong", "id": rid})
            elif t == "overloaded":
                mon.overloaded(check_worker_id(msg.get("worker_id")))
            elif t == "why":
                blocks = msg.get("blocks")
                value = mon.why(check_worker_id(msg.get("worker_id")), blocks=blocks)
                self._reply(conn, rid, attrs.asdict(value, recurse=True))
            elif t == "load_states":
                self._reply(conn, rid, {wid: _plain(attrs.asdict(st)) for wid, st in mon.load_states().items()})
            elif t == "load_state":
                st = mon.load_state(check_worker_id(msg.get("worker_id")))
                self._reply(conn, rid, None if st is None else _plain(attrs.asdict(st)))
            elif t == "health":
                h = mon.health()
                self._send(conn, {"t": "reply", "id": rid, "value": attrs.asdict(h, recurse=True),
                                  "agent": {**self.counters, "host_booked_blocks": self.booked_blocks()}})
            elif t == "thresholds":
                self._reply(conn, rid, attrs.asdict(mon.thresholds))
            elif t == "set_thresholds":
                changes = msg.get("changes")
                if not isinstance(changes, dict) or not all(isinstance(k, str) for k in changes):
                    raise ValueError("set_thresholds needs a map of option names to values")
                self._reply(conn, rid, attrs.asdict(mon.set_thresholds(**changes)))
            else:
                raise ValueError(f"unknown request {t[:40]!r}")
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            self.counters.inc("request_errors")
            self._send(conn, {"t": "reply", "id": rid, "error": f"{type(exc).__name__}: {exc}"})

    def _reply(self, conn: _Conn, rid: Any, value: Any) -> None:
        self._send(conn, {"t": "reply", "id": rid, "value": value})


def _plain(st: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in list(st.items()):
        if hasattr(v, "items"):
            st[k] = dict(v)
        elif isinstance(v, frozenset):
            st[k] = sorted(v)
    return st
