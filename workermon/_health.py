"""Health of the sources: mutable status written by one thread, frozen views read by any."""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Dict, Literal, Mapping, Optional, Tuple

import attrs

__all__ = ["Backoff", "Health", "SourceHealth", "SourceStatus"]

SourceState = Literal["idle", "connecting", "connected", "reconnecting", "resyncing", "stopped", "static"]


@attrs.frozen
class SourceHealth:
    """One source at one instant (see :meth:`WorkerMonitor.health`)."""

    name: str
    state: SourceState
    last_event_age: Optional[float]
    counters: Mapping[str, int]
    last_error: Optional[str] = None
    endpoint: Optional[str] = None


def _idle_zmq() -> SourceHealth:
    return SourceHealth("zmq", "idle", None, {}, "ZMQ disabled")


@attrs.frozen
class Health:
    """The monitor's health: each source, the reducer's counters, fleet size.

    ``required`` names the sources readiness and :attr:`ok` depend on
    (etcd always; NATS when asked for; ZMQ unless ``event_plane="nats"``).
    """

    etcd: SourceHealth
    nats: SourceHealth
    reducer: Mapping[str, int]
    members: int
    busy: int
    ready: bool
    alive: bool
    zmq: SourceHealth = attrs.field(factory=_idle_zmq)
    required: Tuple[str, ...] = ("etcd", "nats")
    # select()/reserve(): reserved, released, expired, rejected (None returned),
    # selected; in_flight and booked_blocks are gauges.
    picker: Mapping[str, int] = attrs.field(factory=dict)
    # kv_index=True: the kv-events source, with the index's counters (index_*).
    kv: Optional[SourceHealth] = None

    @property
    def ok(self) -> bool:
        """True when every required source is connected and every thread is alive."""
        return self.alive and all(getattr(self, name).state == "connected" for name in self.required)


class SourceStatus:
    """A source's state and counters.

    Written by its source thread only (single writer, so no lock is needed for
    the counters); read by any thread through :meth:`view`.
    """

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.state: SourceState = "idle"
        self.last_event: Optional[float] = None
        self.last_error: Optional[str] = None
        self.endpoint: Optional[str] = None
        self.counters: Dict[str, int] = {}
        self.clock = clock

    def inc(self, counter: str, n: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + n

    def event(self) -> None:
        self.last_event = self.clock()

    def view(self) -> SourceHealth:
        last = self.last_event
        return SourceHealth(
            name=self.name,
            state=self.state,
            last_event_age=None if last is None else max(0.0, self.clock() - last),
            counters=dict(self.counters),
            last_error=self.last_error,
            endpoint=self.endpoint,
        )


class Backoff:
    """Capped exponential back-off with jitter, waited on a stop event."""

    def __init__(self, stopping: threading.Event, initial: float = 0.1, cap: float = 2.0) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError("back-off needs 0 < initial <= cap")
        self._stopping = stopping
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        # Jitter in [ceiling/2, ceiling] spreads reconnecting routers apart.
        return random.uniform(ceiling / 2, ceiling)

    def wait(self) -> bool:
        """Sleep the next delay; True when stop was asked meanwhile."""
        return self._stopping.wait(self.next_delay())

    def reset(self) -> None:
        self.attempt = 0
