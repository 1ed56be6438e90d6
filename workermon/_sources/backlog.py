"""What crosses from a source thread to the reducer, and how much of it may wait.

Each source owns one :class:`Backlog`: the source thread counts what it hands
over, the reducer counts what it applied, and the difference is what waits in
the queue.  A source asks :meth:`Backlog.admit` before it queues anything, so a
slow reducer (a blocked callback, a burst) can never grow memory without bound:
past the bound, load reports are dropped and counted, and the etcd source falls
back to a fresh listing once the reducer has caught up.

Each counter has one writer (the source thread or the reducer thread), so no
lock is needed; readers may see a value one update old, which only shifts the
bound by a message.
"""

from __future__ import annotations

import threading
from typing import List, NamedTuple, Optional

__all__ = ["Backlog", "PayloadBatch"]


class PayloadBatch(List[bytes]):
    """Raw load payloads handed over together, as one queue item.

    ``bare`` says the payloads are ActiveLoad bodies already taken out of
    their envelope (the ZMQ source validates the envelope against its
    frames); otherwise each is a whole NATS message.
    """

    __slots__ = ("backlog", "nbytes", "bare")

    def __init__(self, backlog: "Backlog", items: List[bytes], nbytes: int, bare: bool = False) -> None:
        super().__init__(items)
        self.backlog = backlog
        self.nbytes = nbytes
        self.bare = bare


class Admitted(NamedTuple):
    """What a backlog took of a batch: the payloads kept, their bytes, and how many were dropped."""

    kept: List[bytes]
    kept_bytes: int
    dropped: int


class Backlog:
    """Items (and payload bytes) a source has queued that the reducer has not applied."""

    def __init__(self, max_items: int, max_bytes: Optional[int] = None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.enqueued = 0  # source thread
        self.enqueued_bytes = 0
        self.applied = 0  # reducer thread
        self.applied_bytes = 0
        # Set by the reducer when everything queued has been applied (and by
        # stop(), to wake a source waiting in wait_drained()).
        self.drained = threading.Event()

    @property
    def items(self) -> int:
        return max(0, self.enqueued - self.applied)

    @property
    def nbytes(self) -> int:
        return max(0, self.enqueued_bytes - self.applied_bytes)

    def full(self) -> bool:
        return self.items >= self.max_items or (self.max_bytes is not None and self.nbytes >= self.max_bytes)

    def admit(self, items: List[bytes], nbytes: int) -> "Admitted":
        """Keep what fits (see :class:`Admitted`); counts the kept as enqueued."""
        room = self.max_items - self.items
        byte_room = None if self.max_bytes is None else self.max_bytes - self.nbytes
        if len(items) <= room and (byte_room is None or nbytes <= byte_room):
            kept, kept_bytes = items, nbytes
        else:
            n = max(0, min(room, len(items)))
            kept_bytes = 0
            if byte_room is not None:
                for i in range(n):
                    size = len(items[i])
                    if kept_bytes + size > byte_room:
                        n = i
                        break
                    kept_bytes += size
            else:
                kept_bytes = sum(len(x) for x in items[:n])
            kept = items[:n]
        self.note_enqueued(len(kept), kept_bytes)
        return Admitted(kept, kept_bytes, len(items) - len(kept))

    def note_enqueued(self, n: int, nbytes: int = 0) -> None:
        self.enqueued += n
        self.enqueued_bytes += nbytes

    def note_applied(self, n: int, nbytes: int = 0) -> None:
        self.applied += n
        self.applied_bytes += nbytes
        if self.applied >= self.enqueued:
            self.drained.set()

    def wait_drained(self, stopping: threading.Event) -> bool:
        """Block until the reducer applied everything queued; False when stopping."""
        while not stopping.is_set():
            # Clear before checking: a reducer that drains in between sets it again.
            self.drained.clear()
            if self.items == 0:
                return True
            self.drained.wait()
        return False
