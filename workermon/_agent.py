"""The host agent: one monitor per host, served to local processes over a Unix socket.

``workermon agent`` runs a :class:`~workermon.WorkerMonitor` and this server;
each gunicorn/uWSGI worker process uses :class:`~workermon.SharedMonitor`.  The
agent does all the per-report work (one etcd watch, one NATS/ZMQ subscription,
one decode of each report); what reaches a client is the state as it changes:
the busy set, membership, version and readiness, pushed on every change.
``reserve()`` / ``select()`` / ``why()`` and the rest are requests answered
here, so reservations are host-wide: bookings made by any process count for
every process.  A connection's reservations are released when it closes.

Wire: each frame is a 4-byte big-endian length and that many bytes of msgpack
(a map with a ``t`` type).  A frame over ``MAX_FRAME`` bytes, bytes that are not
msgpack, or an unknown request are counted and the connection is dropped.

Only processes of the same user may connect: the socket is created ``0600`` in
a directory of the user's own, and each peer's uid is checked (``SO_PEERCRED``);
a refused peer gets one error frame, then the connection closes.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import struct
import threading
from typing import Any, Dict, List, Optional

import attrs
import msgspec

from ._reduce import Counters

log = logging.getLogger(__name__)

__all__ = ["Agent", "MAX_FRAME", "default_socket_path", "encode_frame", "FrameReader"]

MAX_FRAME = 1 << 20  # requests are small; a larger frame is hostile
MAX_OUTBUF = 8 << 20  # a client this far behind is dropped (it reconnects and gets the state afresh)
_LEN = struct.Struct(">I")


def default_socket_path() -> str:
    """``$WORKERMON_AGENT_SOCKET``, else ``$XDG_RUNTIME_DIR/workermon/agent.sock``, else
    ``/tmp/workermon-<uid>/agent.sock``."""
    explicit = os.environ.get("WORKERMON_AGENT_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "workermon", "agent.sock")
    return os.path.join("/tmp", f"workermon-{os.getuid()}", "agent.sock")


def encode_frame(msg: Dict[str, Any]) -> bytes:
    body = msgspec.msgpack.encode(msg)
    return _LEN.pack(len(body)) + body


class FrameError(ValueError):
    """Bytes on the socket that are not a valid frame."""


class FrameReader:
    """Splits a byte stream into decoded frames; raises :class:`FrameError` on hostile input."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        self._buf += data
        out: List[Dict[str, Any]] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise FrameError(f"frame of {n} bytes > {self._max}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            try:
                msg = msgspec.msgpack.decode(body)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise FrameError(f"not msgpack: {exc}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
                raise FrameError("a frame must be a map with a string 't'")
            out.append(msg)
        return out


def peer_uid(sock: socket.socket) -> Optional[int]:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def prepare_socket_dir(path: str) -> None:
    """Create the socket's directory (0700) and refuse one that others can write to."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise PermissionError(f"{directory} is writable by others: choose a private directory for the socket")


class _Conn:
    __slots__ = ("sock", "reader", "out", "reservations", "peer")

    def __init__(self, sock: socket.socket, peer: Optional[int]) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.out = bytearray()
        self.reservations: Dict[int, Any] = {}
        self.peer = peer


class Agent(threading.Thread):
    """``workermon-agent``: serves one started monitor on a Unix socket."""

    def __init__(self, monitor: Any, path: Optional[str] = None) -> None:
        super().__init__(name="workermon-agent", daemon=True)
        self.monitor = monitor
        self.path = path or default_socket_path()
        self.counters = Counters()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: Dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._listener: Optional[socket.socket] = None
        self._sent_version: Optional[object] = None
        self._tokens = 0
        self._uid = os.getuid()

    # --- lifecycle ----------------------------------------------------------------

    def bind(self) -> "Agent":
        """Create the socket (0600, in a private directory); raises OSError/PermissionError."""
        prepare_socket_dir(self.path)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise OSError(f"another agent is serving {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)  # a stale socket of an agent that died
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        self._stopping.set()
        self._poke()
        if self.is_alive():
            self.join(timeout)
        return not self.is_alive()

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        sel = self._sel
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.monitor._snapshot_listeners.append(self._poke)
        try:
            while not self._stopping.is_set():
                for key, events in sel.select():
                    try:
                        self._handle(key, events)
                    except Exception:  # noqa: BLE001 - one connection's trouble never stops the agent
                        self.counters.inc("errors")
                        log.exception("workermon agent: unexpected error; continuing")
                        if isinstance(key.data, _Conn):
                            self._drop(key.data, "error")
                self._broadcast_if_changed()
        finally:
            try:
                self.monitor._snapshot_listeners.remove(self._poke)
            except ValueError:
                pass
            for conn in list(self._conns.values()):
                self._drop(conn, "agent stopping")
            sel.close()
            self._listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._wake_r.close()
            self._wake_w.close()

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "wake":
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
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
                self.counters.inc("malformed")
                log.warning("workermon agent: dropping a connection that sent %s", exc)
                self._drop(conn, "malformed")
                return
            for msg in msgs:
                if not self._request(conn, msg):
                    self.counters.inc("malformed")
                    self._drop(conn, "unknown request")
                    return

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            uid = peer_uid(sock)
            if uid is not None and uid not in (self._uid,):
                self.counters.inc("refused")
                try:
                    sock.sendall(encode_frame({"t": "refused", "error": (
                        f"workermon agent: uid {uid} may not connect; only uid {self._uid} (the agent's user) may")}))
                except OSError:
                    pass
                sock.close()
                log.warning("workermon agent: refused a connection from uid %s", uid)
                continue
            sock.setblocking(False)
            conn = _Conn(sock, uid)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self.counters.inc("connections")
            self._send(conn, self._state_msg())

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
        for res in conn.reservations.values():
            res.release()  # a client that went away holds nothing
        conn.reservations.clear()
        log.debug("workermon agent: connection closed (%s)", why)

    # --- sending ------------------------------------------------------------------

    def _state_msg(self) -> Dict[str, Any]:
        mon = self.monitor
        snap = mon._snapshot
        return {"t": "state", "version": snap.version, "busy": sorted(snap.busy), "members": sorted(snap.members),
                "ready": mon.ready}

    def _broadcast_if_changed(self) -> None:
        mon = self.monitor
        key = (mon._snapshot, mon.ready)
        if key == self._sent_version:
            return
        self._sent_version = key
        if not self._conns:
            return
        frame = encode_frame(self._state_msg())
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

    def _request(self, conn: _Conn, msg: Dict[str, Any]) -> bool:
        """Answer one request; False for a request that is not one (the connection is dropped)."""
        mon = self.monitor
        t = msg["t"]
        rid = msg.get("id")
        self.counters.inc(f"requests_{t}" if t in _KNOWN else "requests_unknown")
        try:
            if t == "release":
                token = msg.get("token")
                res = conn.reservations.pop(token, None) if isinstance(token, int) else None
                if res is not None:
                    res.release()
                return True
            if t == "overloaded":
                wid = msg.get("worker_id")
                if isinstance(wid, int) and not isinstance(wid, bool):
                    mon.overloaded(wid)
                return True
            if t in ("reserve", "select"):
                kw = _pick_args(msg)
                if t == "select":
                    self._send(conn, {"t": "reply", "id": rid, "worker_id": mon.select(**kw)})
                    return True
                res = mon.reserve(**kw)
                if res is None:
                    self._send(conn, {"t": "reply", "id": rid, "worker_id": None})
                    return True
                self._tokens += 1
                conn.reservations[self._tokens] = res
                self._send(conn, {"t": "reply", "id": rid, "worker_id": res.worker_id, "dp_rank": res.dp_rank,
                                  "reason": res.reason, "token": self._tokens})
                return True
            if t == "why":
                self._send(conn, {"t": "reply", "id": rid,
                                  "value": attrs.asdict(mon.why(int(msg["worker_id"])), recurse=True)})
                return True
            if t == "load_states":
                states = {wid: attrs.asdict(st) for wid, st in mon.load_states().items()}
                for st in states.values():
                    for k, v in list(st.items()):
                        if hasattr(v, "items"):
                            st[k] = dict(v)
                        elif isinstance(v, frozenset):
                            st[k] = sorted(v)
                self._send(conn, {"t": "reply", "id": rid, "value": states})
                return True
            if t == "health":
                h = mon.health()
                self._send(conn, {"t": "reply", "id": rid, "value": attrs.asdict(h, recurse=True),
                                  "agent": dict(self.counters)})
                return True
            if t == "thresholds":
                self._send(conn, {"t": "reply", "id": rid, "value": attrs.asdict(mon.thresholds)})
                return True
            if t == "set_thresholds":
                changes = msg.get("changes")
                if not isinstance(changes, dict):
                    return False
                th = mon.set_thresholds(**changes)
                self._send(conn, {"t": "reply", "id": rid, "value": attrs.asdict(th)})
                return True
        except (ValueError, TypeError, KeyError) as exc:
            self._send(conn, {"t": "reply", "id": rid, "error": f"{type(exc).__name__}: {exc}"})
            return True
        return False


_KNOWN = frozenset({"reserve", "select", "release", "overloaded", "why", "load_states", "health", "thresholds", "set_thresholds"})


def _pick_args(msg: Dict[str, Any]) -> Dict[str, Any]:
    exclude = msg.get("exclude") or ()
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(x, int) for x in exclude):
        raise ValueError("exclude must be a list of worker ids")
    return {
        "strategy": msg.get("strategy"),
        "exclude": tuple(exclude),
        "blocks": msg.get("blocks"),
        "model": msg.get("model"),
        "worker_type": msg.get("worker_type"),
    }
