"""A loopback TCP proxy whose connections the test can cut and restore."""

from __future__ import annotations

import selectors
import socket
import threading
from typing import List, Optional, Set, Tuple


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection
    and refuses new ones until ``restore()`` — a network partition on loopback."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._pairs: List[Tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._waker_r, self._waker_w = socket.socketpair()
        # stall_after(): once a client sends this, nothing more reaches clients.
        self._stall_marker: Optional[bytes] = None
        self.stalled = threading.Event()
        self._clients: Set[socket.socket] = set()
        self.thread = threading.Thread(target=self._run, name="test-proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall_after(self, marker: bytes) -> None:
        """A hung server, at a chosen moment: once a client sends ``marker``,
        the server's answers are swallowed (connections stay open)."""
        self._stall_marker = marker

    def cut(self) -> None:
        self._cut.set()
        self._wake()

    def restore(self) -> None:
        self._cut.clear()
        self._wake()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self.thread.join(5)
        self.listener.close()
        self._waker_r.close()
        self._waker_w.close()

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"x")
        except OSError:
            pass

    def _drop_all(self, sel: selectors.BaseSelector) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._waker_r, selectors.EVENT_READ, "wake")
        peers = {}
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=1.0):
                if key.data == "wake":
                    self._waker_r.recv(64)
                    if self._cut.is_set():
                        self._drop_all(sel)
                        peers.clear()
                    continue
                if key.data == "accept":
                    client, _ = self.listener.accept()
                    if self._cut.is_set():
                        client.close()
                        continue
                    try:
                        upstream = socket.create_connection(self.target, timeout=2)
                    except OSError:
                        client.close()
                        continue
                    with self._lock:
                        self._pairs.append((client, upstream))
                    peers[client] = upstream
                    peers[upstream] = client
                    self._clients.add(client)
                    sel.register(client, selectors.EVENT_READ, "data")
                    sel.register(upstream, selectors.EVENT_READ, "data")
                    continue
                src = key.fileobj
                dst = peers.get(src)  # type: ignore[call-overload]
                try:
                    data = src.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data or dst is None:
                    for s in (src, dst):
                        if s is not None:
                            try:
                                sel.unregister(s)
                            except (KeyError, ValueError):
                                pass
                            s.close()  # type: ignore[union-attr]
                            peers.pop(s, None)
                    continue
                marker = self._stall_marker
                if src in self._clients and marker is not None and marker in data:
                    self.stalled.set()
                if self.stalled.is_set() and src not in self._clients:
                    continue
                try:
                    dst.sendall(data)
                except OSError:
                    pass
        self._drop_all(sel)
        sel.close()
