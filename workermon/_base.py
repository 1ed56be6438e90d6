"""What WorkerMonitor and SharedMonitor share: one reader.

The immutable snapshot every read uses without a lock, the lock-free reads,
the waits (``wait_ready()``, ``wait_for()``, woken by one condition each
monitor notifies after every change), callback handles, the fork guard and
the context manager.  Each monitor supplies how it gets its snapshot (a
reducer thread, or the host agent) and its lifecycle.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Callable, Optional, Protocol, Tuple

from ._model import BusyChange

__all__ = ["BaseMonitor", "CallbackHandle", "Snapshot", "wait_on"]

Callback = Callable[[BusyChange], Any]

# Started WorkerMonitors and SharedMonitors: a forked child marks its copies unusable.
live_monitors: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _mark_forked() -> None:
    for mon in list(live_monitors):
        mon._forked_from = mon._owner_pid


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


class Snapshot:
    """What readers see: swapped in whole by the reducer, never mutated after.

    ``free`` is derived on first use and cached, so a busy-set change costs
    O(busy) rather than O(fleet); racing first readers compute the same value.
    """

    __slots__ = ("busy", "members", "version", "_free", "_free_order")

    def __init__(self, busy: frozenset[int], members: frozenset[int], version: int) -> None:
        self.busy = busy
        self.members = members
        self.version = version
        self._free: Optional[frozenset[int]] = None
        self._free_order: Optional[Tuple[int, ...]] = None

    @property
    def free(self) -> frozenset[int]:
        free = self._free
        if free is None:
            free = self._free = self.members - self.busy
        return free

    @property
    def free_order(self) -> Tuple[int, ...]:
        """The free set as a sorted tuple, for the picker (random draws and round robin)."""
        order = self._free_order
        if order is None:
            order = self._free_order = tuple(sorted(self.free))
        return order


EMPTY = Snapshot(frozenset(), frozenset(), 0)


class CallbackHandle:
    """Returned by :meth:`WorkerMonitor.on_busy_change`.

    Calling the handle calls the callback, so ``@mon.on_busy_change`` leaves a
    usable function behind; :meth:`cancel` unregisters it (idempotent; the
    callback is not called again once ``cancel`` returns, unless it is running
    right now on the reducer thread).
    """

    __slots__ = ("callback", "_monitor", "cancelled", "__weakref__")

    def __init__(self, callback: Callback, monitor: "BaseMonitor") -> None:
        self.callback = callback
        self._monitor = monitor
        self.cancelled = False

    def __call__(self, change: BusyChange) -> Any:
        return self.callback(change)

    def cancel(self) -> None:
        self.cancelled = True
        self._monitor._unregister(self)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "active"
        return f"<CallbackHandle {getattr(self.callback, '__qualname__', self.callback)!r} {state}>"


class _PickerDefaults(Protocol):
    strategy: str
    overflow: str


class BaseMonitor:
    """The lock-free, O(1) reads of an immutable :class:`Snapshot`, the waits, the fork guard and the
    context manager, shared by :class:`~workermon.WorkerMonitor` and :class:`~workermon.SharedMonitor`.

    A subclass swaps ``_snapshot`` in whole, notifies ``_changed`` after
    every change it applies, sets ``_stopping`` on stop, guards
    ``_callbacks`` with ``_callbacks_lock``, and provides ``ready``,
    ``start()`` and ``stop()``.
    """

    _snapshot: Snapshot
    _forked_from: Optional[int]
    _owner_pid: int
    _changed: threading.Condition
    _stopping: threading.Event
    _callbacks: Tuple["CallbackHandle", ...]
    _callbacks_lock: Any
    _picker: "_PickerDefaults"  # a Picker or a SharedPicker

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def strategy(self) -> str:
        """The strategy ``reserve()``/``select()`` use when not given one.  Any thread."""
        return self._picker.strategy

    @property
    def overflow(self) -> str:
        """What ``reserve(blocks=…)`` does when no free worker has room: ``"steer"`` or ``"refuse"``.
        Any thread."""
        return self._picker.overflow

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> bool:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: Optional[float] = 5.0) -> bool:
        """True once ready; False when ``timeout`` passes first, and at once once :meth:`stop` has been
        called (a waiter blocked here when ``stop()`` runs wakes up with False).  Any thread."""
        return wait_on(self._changed, lambda: self.ready, timeout, self._stopping, stop_value=False)

    def wait_for(self, predicate: Callable[[], bool], timeout: Optional[float] = 5.0) -> bool:
        """Wait until ``predicate()`` is true, re-checking after every change; its last value.

        False when ``timeout`` passed.  Once :meth:`stop` has been called it
        returns the predicate's value at once (nothing will change any more);
        a waiter blocked here when ``stop()`` runs wakes up and does the same.
        For scripts and tests, e.g. ``mon.wait_for(lambda: len(mon.members()) == 3)``.
        Not from a callback: the thread that runs them would wait on itself.
        """
        return wait_on(self._changed, predicate, timeout, self._stopping)

    def _unregister(self, handle: "CallbackHandle") -> None:
        with self._callbacks_lock:
            self._callbacks = tuple(h for h in self._callbacks if h is not handle)

    def _check_fork(self) -> None:
        if self._forked_from is not None:
            kind = type(self).__name__
            raise RuntimeError(
                f"this {kind} was started in process {self._forked_from} and its threads do not exist "
                f"after fork() (in process {os.getpid()}); create and start a new {kind} in the child, e.g. "
                "in gunicorn's post_fork hook (see examples/gunicorn.conf.py)"
            )

    def busy_workers(self) -> frozenset[int]:
        """The busy set: lock-free, O(1), any thread."""
        if self._forked_from is not None:
            self._check_fork()
        return self._snapshot.busy

    def free_workers(self) -> frozenset[int]:
        """Members that are not busy: lock-free, O(1), any thread."""
        if self._forked_from is not None:
            self._check_fork()
        return self._snapshot.free

    def members(self) -> frozenset[int]:
        """Every worker with at least one card: lock-free, O(1), any thread."""
        if self._forked_from is not None:
            self._check_fork()
        return self._snapshot.members

    def is_busy(self, worker_id: int) -> bool:
        """Whether ``worker_id`` is busy (False for unknown ids): lock-free, O(1)."""
        if self._forked_from is not None:
            self._check_fork()
        if worker_id < 0:
            worker_id += 1 << 64
        return worker_id in self._snapshot.busy

    @property
    def version(self) -> int:
        """The number of busy-set changes so far: lock-free, any thread."""
        return self._snapshot.version


def wait_on(cond: threading.Condition, predicate: Callable[[], bool], timeout: Optional[float],
            stopping: threading.Event, stop_value: Optional[bool] = None) -> bool:
    """Wait on ``cond`` (notified after every change) until ``predicate()``; its last value.

    Returns at once once ``stopping`` is set (``predicate()``, or ``stop_value`` when given):
    nothing will change any more.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with cond:
        while True:
            value = predicate()
            if value:
                return value
            if stopping.is_set():
                return value if stop_value is None else stop_value
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return value
            cond.wait(remaining)
