"""Picking from the host agent's shared memory: :class:`SharedPicker`, for ``SharedMonitor``.

The same rule as the in-process :class:`~workermon._picker.Picker` (its
:func:`~workermon._picker.best_rank`, the same strategies and steering), over
the agent's rows in shared memory (:mod:`workermon._shm`); the bookings go to
this process's own row, so they count in every process at once.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

from ._fleet import Counters
from ._picker import (
    Assessment,
    Ledger,
    Pick,
    Reservation,
    best_rank,
    check_blocks,
    check_overflow,
    check_strategy,
    choose,
    settle,
    take_credit,
    take_live,
    unsigned_ids,
)

__all__ = ["SharedPicker"]


class _SharedBooking:
    __slots__ = ("wid", "rank", "rank_slot", "seq", "blocks", "deadline", "live", "token", "generation")

    def __init__(self, wid: int, rank: int, rank_slot: int, seq: int, blocks: int, deadline: float, token: int,
                 generation: int) -> None:
        self.wid = wid
        self.rank = rank
        self.rank_slot = rank_slot
        self.seq = seq
        self.blocks = blocks
        self.deadline = deadline
        self.live = True
        self.token = token
        self.generation = generation  # the booking row it was written to (-1: this process only)


class SharedPicker(Ledger):
    """Picks from the host agent's shared memory and books in this process's own row.

    The same rule as :class:`Picker` (:func:`best_rank`, the same strategies):
    each rank's reported load and the busy rule's verdict come from the
    agent's rows, the bookings from every process's row, so a booking made
    here counts in every process at once.  Without a booking row (the agent is
    gone) bookings count in this process only, and picking goes on over the
    last state the agent published.  Thread-safe: one lock per process.
    """

    def __init__(self, strategy: str = "p2c", reservation_ttl: float = 300.0, default_blocks: int = 1,
                 overloaded: Optional[Callable[[int], None]] = None, overflow: str = "steer") -> None:
        from ._shm import SharedFleet

        self.strategy = check_strategy(strategy)
        self.overflow = check_overflow(overflow)
        self.reservation_ttl = reservation_ttl
        self.default_blocks = check_blocks(default_blocks)
        self._overloaded = overloaded
        self._rng = random.Random()
        self._rr = 0
        self._lock = threading.Lock()
        self._fleet: Optional[SharedFleet] = None
        self._row = -1
        self._generation = 0
        self._index: Dict[int, int] = {}
        self._index_seq = -1
        self._bookings: "OrderedDict[int, _SharedBooking]" = OrderedDict()
        self._local: Dict[int, List[int]] = {}  # rank slot -> [report seq, blocks] while without a row
        self._local_live: Dict[int, int] = {}  # rank slot -> blocks of unreleased bookings made without a row
        self._tokens = itertools.count(1)
        self._inflight: Dict[int, int] = {}
        self.counters = Counters()

    def attach(self, fleet: Any, row: int) -> None:
        """A (new) connection: the agent's mapping and this process's booking row in it.

        The picker owns the mapping from here: a new agent lifetime's mapping
        replaces the old one, which is closed (under the lock no pick holds it).
        """
        with self._lock:
            if fleet is not self._fleet:
                if self._fleet is not None:
                    self._fleet.close()
                self._index_seq = -1
                self._local.clear()
                self._local_live.clear()
            self._fleet = fleet
            self._row = row
            self._generation += 1

    def detach(self) -> None:
        """The connection closed: the agent clears (and may reuse) the row; book locally from now."""
        with self._lock:
            self._row = -1
            self._generation += 1

    @property
    def attached(self) -> bool:
        return self._fleet is not None

    def close(self) -> None:
        """The monitor stopped: no more picks from the mapping; it is closed."""
        with self._lock:
            self._row = -1
            if self._fleet is not None:
                self._fleet.close()
                self._fleet = None

    def in_flight(self, worker_id: Optional[int] = None) -> int:
        """This process's live reservations (on ``worker_id``, or in all)."""
        with self._lock:
            self._expire(time.monotonic())
            return len(self._bookings) if worker_id is None else self._inflight.get(worker_id, 0)

    def pick(self, free: Tuple[int, ...], *, book: bool, strategy: Optional[str] = None,
             exclude: Collection[int] = (), blocks: Optional[int] = None, model: Optional[str] = None,
             worker_type: Optional[str] = None) -> Optional[Pick]:
        from ._shm import ADMITTED, BUSY, HELD, NONE32, model_hash

        strategy = self.strategy if strategy is None else check_strategy(strategy)
        blocks = self.default_blocks if blocks is None else check_blocks(blocks)
        excluded = unsigned_ids(exclude)
        want_model = None if model is None else model_hash(model)
        want_type = None if worker_type is None else model_hash(worker_type)
        with self._lock:
            fleet = self._fleet
            if fleet is None:
                self.counters.inc("rejected" if book else "select_none")
                return None
            now = time.monotonic()
            if self._bookings and next(iter(self._bookings.values())).deadline <= now:
                self._expire(now)
            _, layout_seq, slots_used, threshold_f, procs_used = fleet.header()
            if layout_seq != self._index_seq:
                self._index = fleet.scan(slots_used)
                self._index_seq = layout_seq
            threshold = None if threshold_f != threshold_f else threshold_f  # NaN: the KV rule is off
            index = self._index
            local = self._local
            local_live = self._local_live
            where: Dict[int, Tuple[int, int, List[Tuple[int, int, int]]]] = {}

            def assess(wid: int, overflow: bool = False) -> Optional[Assessment]:
                if wid in excluded:
                    return None
                slot = index.get(wid)
                row = fleet.read_slot(slot) if slot is not None else None
                if row is None:
                    return None
                flags, rwid, total, dp_start, first, _n, mhash, thash, ranks = row
                if rwid != wid or not flags & ADMITTED or flags & (HELD | BUSY):
                    return None
                if (want_model is not None and mhash != want_model) or (want_type is not None and thash != want_type):
                    return None
                free_ranks = []
                for i, (load, seq, busy) in enumerate(ranks):
                    if busy:
                        continue  # the busy rule calls this rank busy
                    booked, live = fleet.bookings_on(first + i, seq, procs_used)
                    acc = local.get(first + i)
                    if acc is not None and acc[0] == seq:
                        booked += acc[1]
                    live += local_live.get(first + i, 0)
                    reported = 0 if load == NONE32 else load
                    free_ranks.append((dp_start + i, reported, max(booked, live - reported)))
                best = best_rank(free_ranks, None if total == NONE32 else total, threshold, blocks, overflow)
                if best is None:
                    return None
                where[wid] = (first, dp_start, ranks)
                inflight = self._inflight.get(wid, 0)
                if best[2] is not None:
                    return (0, best[2]), best[1], best[2], inflight
                return (1, best[0]), best[1], None, inflight

            def steer(wid: int) -> Optional[Assessment]:
                return assess(wid, True)
            chosen = choose(strategy, self, free, assess, book, steer if self.overflow == "steer" else None)
            settled = settle(self.counters, chosen, book)
            if settled is None or not book:
                return settled
            wid, rank, reason, _ = settled
            first, dp_start, ranks = where[wid]
            rank_slot = first + rank - dp_start
            seq = ranks[rank - dp_start][1]
            if self._row >= 0:
                fleet.add_booking(self._row, rank_slot, seq, blocks)
                generation = self._generation
            else:
                acc = local.get(rank_slot)
                if acc is None or acc[0] != seq:
                    acc = local[rank_slot] = [seq, 0]
                acc[1] += blocks
                local_live[rank_slot] = local_live.get(rank_slot, 0) + blocks
                generation = -1
            booking = _SharedBooking(wid, rank, rank_slot, seq, blocks, now + self.reservation_ttl,
                                     next(self._tokens), generation)
            self._bookings[booking.token] = booking
            self._inflight[wid] = self._inflight.get(wid, 0) + 1
            self.counters.inc("reserved")
            return Pick(wid, rank, reason, Reservation(wid, rank, reason, blocks, self._release, booking,
                                                       self._overloaded))

    def _uncredit(self, b: _SharedBooking) -> None:
        if b.generation == -1:
            take_credit(self._local, b.rank_slot, b.seq, b.blocks)
            take_live(self._local_live, b.rank_slot, b.blocks)
        elif b.generation == self._generation and self._row >= 0 and self._fleet is not None:
            # Only in the row it was written to: after a reconnect the agent
            # cleared that row, and a release must not free someone else's booking.
            self._fleet.remove_booking(self._row, b.rank_slot, b.seq, b.blocks)

    def _expire(self, now: float) -> None:
        self._expire_due(now)
