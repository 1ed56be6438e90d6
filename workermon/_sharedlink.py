"""The client end of a SharedMonitor's connection to the agent: sends that never wait, replies by id.

Request threads hand frames to :meth:`AgentLink.send`, which writes what the
socket takes at once and leaves the rest in a bounded outbox for the
connection thread (:meth:`AgentLink.flush`); nothing a router thread calls
blocks on the agent.  :meth:`AgentLink.ask` adds a request id and waits, at
most ``timeout``, for the reply the connection thread hands back through
:meth:`AgentLink.reply`.  A connection ends with :meth:`AgentLink.detach`:
its outbox goes and every waiter wakes empty-handed.
"""

from __future__ import annotations

import selectors
import socket as sockets
import threading
from typing import Any, Callable, Dict, List, Optional

from ._fleet import Counters
from ._protocol import encode_frame

__all__ = ["AgentLink", "MAX_OUTBOX"]

MAX_OUTBOX = 1 << 20  # bytes waiting for the agent; past it a message is dropped (counted), never waited for


class AgentLink:
    """One connection at a time (see the module docstring).  Thread-safe."""

    def __init__(self, counters: Counters, poke: Callable[[], None]) -> None:
        self._counters = counters
        self._poke = poke  # wakes the connection thread, which flushes the outbox
        self._lock = threading.Lock()
        self._sock: Optional[sockets.socket] = None
        self._outbox = bytearray()
        self._waiting: Dict[int, List[Any]] = {}  # request id -> [event, reply]
        self._ids = 0

    def attach(self, sock: sockets.socket) -> None:
        """A new connection (non-blocking socket): frames go to it from now on."""
        with self._lock:
            self._sock = sock
            self._outbox.clear()

    def detach(self) -> None:
        """The connection ended: what waited to be sent goes, and every waiter wakes with no reply."""
        with self._lock:
            self._sock = None
            self._outbox.clear()
        for slot in list(self._waiting.values()):
            slot[0].set()
        self._waiting.clear()

    def send(self, msg: Dict[str, Any]) -> bool:
        """Queue one frame (any thread; never blocks); False when not connected or the outbox is full."""
        frame = encode_frame(msg)
        with self._lock:
            sock = self._sock
            if sock is None:
                return False
            if len(self._outbox) + len(frame) > MAX_OUTBOX:
                self._counters.inc("send_dropped")
                return False
            self._outbox += frame
            try:
                n = sock.send(self._outbox)
                del self._outbox[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return False
            pending = bool(self._outbox)
        if pending:
            self._poke()  # the connection thread flushes the rest when the socket has room
        return True

    def flush(self, sock: sockets.socket, sel: selectors.BaseSelector, writing: bool) -> bool:
        """Send what the socket takes (the connection thread); whether more waits (then ``sel`` also
        watches for room to write)."""
        with self._lock:
            if self._outbox:
                try:
                    n = sock.send(self._outbox)
                    del self._outbox[:n]
                except (BlockingIOError, InterruptedError):
                    pass
            want = bool(self._outbox)
        if want != writing:
            sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), "sock")
        return want

    def ask(self, msg: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        """Send ``msg`` with a request id and wait at most ``timeout`` for its reply; None without one."""
        with self._lock:
            self._ids += 1
            rid = self._ids
        slot: List[Any] = [threading.Event(), None]
        self._waiting[rid] = slot
        msg["id"] = rid
        if not self.send(msg):
            self._waiting.pop(rid, None)
            return None
        if not slot[0].wait(timeout):
            self._waiting.pop(rid, None)
            self._counters.inc("timeouts")
            return None
        return slot[1]  # type: ignore[no-any-return]

    def reply(self, msg: Dict[str, Any]) -> None:
        """A reply frame from the agent (the connection thread): wakes the request that waits for it."""
        slot = self._waiting.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if slot is not None:
            slot[1] = msg
            slot[0].set()
