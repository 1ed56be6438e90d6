"""A waker for a thread that sleeps in select(): any thread pokes it; the thread drains it when it wakes."""

from __future__ import annotations

import socket

__all__ = ["Waker"]


class Waker:
    """A non-blocking socket pair: register :attr:`fd` for reading beside your sockets.

    :meth:`poke` never blocks (a full pair is already awake) and is a no-op
    once closed; :meth:`drain` empties it after a wake-up.
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    @property
    def fd(self) -> socket.socket:
        return self._r

    def poke(self) -> None:
        try:
            self._w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (the pair is full), or closed after the thread ended

    def drain(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()
