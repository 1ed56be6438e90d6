"""Picking the worker: select() and reserve() with in-flight credit.

A router that reads ``free_workers()`` still has to choose one, and between
two load reports (20–300 ms under load, none while idle) every naive choice
herds onto the same few workers.  The picker counts what it has just routed,
as Dynamo's KV router does: a rank's *predicted* load is its last reported
load plus the blocks booked on it since that report arrived — or, when more,
the blocks of every booking not yet released (a report leaves out requests
queued in the engine, which hold no KV blocks yet).  A booking stops counting
when it is released; one never released expires after ``reservation_ttl``.

It reads the snapshot's free set and the reducer's live rank objects without
the reducer's lock (the reducer only swaps whole values in them, so a read is
at worst one report old), and books under a lock of its own, so two threads
never both take the last free capacity of a worker and reads such as
``busy_workers()`` are unaffected.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import OrderedDict
from typing import (Any, Callable, Collection, Dict, FrozenSet, Iterable, Iterator, List, Literal, NamedTuple, Optional,
                    Tuple)

from ._reduce import Counters, FleetState, rank_verdict

__all__ = ["Assessment", "Chosen", "Ledger", "OVERFLOW", "Overflow", "Pick", "Picker", "Reservation", "STRATEGIES", "Strategy",
           "best_rank", "check_blocks", "check_overflow", "check_strategy", "choose", "settle", "take_credit", "take_live",
           "unsigned_ids"]

Strategy = Literal["p2c", "least_loaded", "round_robin", "random"]
STRATEGIES: Tuple[str, ...] = ("p2c", "least_loaded", "round_robin", "random")
Overflow = Literal["steer", "refuse"]
OVERFLOW: Tuple[str, ...] = ("steer", "refuse")
MAX_RANKS_SCANNED = 1024
_SAMPLES = 8  # random draws before a random strategy falls back to a scan


class _Booking:
    __slots__ = ("wid", "rank", "blocks", "seq", "deadline", "live", "token")

    def __init__(self, wid: int, rank: int, blocks: int, seq: int, deadline: float, token: int) -> None:
        self.wid = wid
        self.rank = rank
        self.blocks = blocks
        self.seq = seq
        self.deadline = deadline
        self.live = True
        self.token = token


class Reservation:
    """One request booked on a worker (and data-parallel rank) by :meth:`WorkerMonitor.reserve`.

    ``release()`` is idempotent and thread-safe; as a context manager the
    reservation is released on exit, exception included.  When the worker
    answers the request with 529 (overloaded), call :meth:`overloaded`
    instead: it releases, and the worker counts as busy until its next load
    report or for ``overload_hold`` seconds, as the frontend itself does.
    """

    __slots__ = ("worker_id", "dp_rank", "blocks", "overlap_blocks", "token_ids", "_reason", "_release", "_booking",
                 "_overloaded")

    def __init__(self, worker_id: int, dp_rank: int, reason: Callable[[], str], blocks: int,
                 release: Callable[[Any], None], booking: Any,
                 overloaded: Optional[Callable[[int], None]] = None) -> None:
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.blocks = blocks
        # strategy="kv": the prompt's leading blocks the chosen rank holds, and
        # the token ids that were hashed (forward them as nvext.token_data).
        self.overlap_blocks: Optional[int] = None
        self.token_ids: Optional[List[int]] = None
        self._reason = reason
        self._release = release
        self._booking = booking
        self._overloaded = overloaded

    @property
    def reason(self) -> str:
        """One short sentence: the strategy and the scores it compared (formatted when read)."""
        return self._reason()

    @property
    def released(self) -> bool:
        return not self._booking.live

    def release(self) -> None:
        self._release(self._booking)

    def overloaded(self) -> None:
        """The worker answered 529 for this request: release it and hold the worker busy.

        The worker is then busy (``is_busy``, ``busy_workers()``, callbacks;
        never picked) until its next load report arrives or ``overload_hold``
        seconds pass, whichever is first: the frontend's own memory of a
        refusal.  Idempotent for the release; thread-safe; any thread.
        """
        self._release(self._booking)
        if self._overloaded is not None:
            self._overloaded(self.worker_id)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Reservation {self.worker_id:x} rank {self.dp_rank} {state}: {self.reason}>"


class Ledger:
    """The bookings a picker holds: live ones by token (creation order = deadline order) and the
    number in flight per worker, under the picker's lock.  Each picker says how a booking's blocks
    stop counting (:meth:`_uncredit`)."""

    _lock: threading.Lock
    _bookings: "OrderedDict[int, Any]"
    _inflight: Dict[int, int]
    counters: Counters

    def _uncredit(self, booking: Any) -> None:
        raise NotImplementedError

    def _release(self, booking: Any) -> None:
        with self._lock:
            if booking.live:
                self._drop(booking)
                self.counters.inc("released")

    def _drop(self, b: Any) -> None:
        b.live = False
        self._bookings.pop(b.token, None)
        n = self._inflight.get(b.wid, 0) - 1
        if n > 0:
            self._inflight[b.wid] = n
        else:
            self._inflight.pop(b.wid, None)
        self._uncredit(b)

    def _expire_due(self, now: float) -> None:
        bookings = self._bookings
        while bookings:
            b = next(iter(bookings.values()))
            if b.deadline > now:
                break
            self._drop(b)
            self.counters.inc("expired")


def take_credit(credit: Dict[Any, List[int]], key: Any, seq: int, blocks: int) -> None:
    """Remove a booking's blocks from ``credit[key] = [report seq, blocks]`` while that report is current."""
    acc = credit.get(key)
    if acc is not None and acc[0] == seq:
        acc[1] -= blocks
        if acc[1] <= 0:
            del credit[key]


def take_live(live: Dict[Any, int], key: Any, blocks: int) -> None:
    """Remove a released booking's blocks from ``live[key]`` (the blocks of unreleased bookings)."""
    left = live.get(key, 0) - blocks
    if left > 0:
        live[key] = left
    else:
        live.pop(key, None)


# An assessment of one candidate: (sort key, rank chosen, utilisation or None, in-flight count).
Assessment = Tuple[Tuple[int, float], int, Optional[float], int]


class Picker(Ledger):
    """Chooses and books workers; see the module docstring for the credit rule."""

    def __init__(
        self,
        state: FleetState,
        free: Callable[[], Tuple[int, ...]],
        clock: Callable[[], float],
        strategy: str = "p2c",
        reservation_ttl: float = 300.0,
        default_blocks: int = 1,
        overloaded: Optional[Callable[[int], None]] = None,
        overflow: str = "steer",
    ) -> None:
        check_strategy(strategy)
        self.overflow = check_overflow(overflow)
        if not isinstance(reservation_ttl, (int, float)) or isinstance(reservation_ttl, bool) or not (
            0 < reservation_ttl < float("inf")
        ):
            raise ValueError(f"reservation_ttl must be a number of seconds > 0, got {reservation_ttl!r}")
        self._state = state
        self._free = free
        self._clock = clock
        self.strategy = strategy
        self.reservation_ttl = float(reservation_ttl)
        self.default_blocks = check_blocks(default_blocks)
        self._lock = threading.Lock()
        # (worker, rank) -> [report seq the blocks were booked against, blocks]
        self._credit: Dict[Tuple[int, int], List[int]] = {}
        # (worker, rank) -> blocks of the bookings not yet released (whatever the reports say).
        self._live: Dict[Tuple[int, int], int] = {}
        self._inflight: Dict[int, int] = {}
        # Live bookings by token, in creation order = deadline order: a
        # release takes its booking out at once, so the dict holds live ones only.
        self._bookings: "OrderedDict[int, _Booking]" = OrderedDict()
        self._tokens = itertools.count(1)
        self._overloaded = overloaded
        # Bookings made elsewhere (the host agent's client processes): (worker, rank) -> blocks.
        self.external: Optional[Callable[[int, int], int]] = None
        self._rr = 0
        self._rng = random.Random()
        self.counters = Counters()

    # --- reading ----------------------------------------------------------------

    def in_flight(self, wid: int) -> int:
        """Live bookings on ``wid`` (expired ones are dropped first)."""
        self.expire()
        return self._inflight.get(wid, 0)

    def booked(self, wid: int, rank: int) -> int:
        """Blocks booked on a rank since its last report (what its prediction adds)."""
        w = self._state.workers.get(wid)
        r = w.ranks.get(rank) if w is not None else None
        seq = r.seq if r is not None else 0
        acc = self._credit.get((wid, rank))
        mine = acc[1] if acc is not None and acc[0] == seq else 0
        external = self.external
        return mine if external is None else mine + external(wid, rank)

    def totals(self) -> Tuple[int, int]:
        """(bookings in flight, blocks they still add to predictions); expired ones are dropped first."""
        with self._lock:
            self._expire(self._clock())
            return sum(self._inflight.values()), sum(self.booked(w, r) for w, r in self._credit)

    # --- choosing ---------------------------------------------------------------

    def pick(
        self,
        *,
        book: bool,
        strategy: Optional[str] = None,
        exclude: Collection[int] = (),
        blocks: Optional[int] = None,
        model: Optional[str] = None,
        worker_type: Optional[str] = None,
        choose_fn: Optional[Callable[[Tuple[int, ...]], Chosen]] = None,
    ) -> Optional["Pick"]:
        """Choose a worker (a :class:`Pick`, its reservation when ``book``), or None.

        ``reason`` is a callable that formats the sentence (only when asked).
        ``choose_fn`` (the KV router's) replaces the strategy: it gets the
        free workers and returns the choice, under the picker's lock.
        """
        strategy = self.strategy if strategy is None else check_strategy(strategy)
        blocks = self.default_blocks if blocks is None else check_blocks(blocks)
        free = self._free()
        assess_one = self._assess
        excluded = unsigned_ids(exclude) if exclude else frozenset()

        def assess(wid: int) -> Optional[Assessment]:
            return None if wid in excluded else assess_one(wid, blocks, model, worker_type, False)

        def steer(wid: int) -> Optional[Assessment]:
            return None if wid in excluded else assess_one(wid, blocks, model, worker_type, True)
        with self._lock:
            now = self._clock()
            bookings = self._bookings
            if bookings and next(iter(bookings.values())).deadline <= now:
                self._expire(now)
            if choose_fn is not None:
                chosen = choose_fn(free)
            else:
                chosen = choose(strategy, self, free, assess, book, steer if self.overflow == "steer" else None)
            settled = settle(self.counters, chosen, book)
            if settled is None or not book:
                return settled
            wid, rank, reason, _ = settled
            w = self._state.workers.get(wid)
            r = w.ranks.get(rank) if w is not None else None
            seq = r.seq if r is not None else 0
            acc = self._credit.get((wid, rank))
            if acc is None or acc[0] != seq:
                acc = self._credit[(wid, rank)] = [seq, 0]
            acc[1] += blocks
            self._live[(wid, rank)] = self._live.get((wid, rank), 0) + blocks
            self._inflight[wid] = self._inflight.get(wid, 0) + 1
            booking = _Booking(wid, rank, blocks, seq, now + self.reservation_ttl, next(self._tokens))
            self._bookings[booking.token] = booking
            self.counters.inc("reserved")
            return Pick(wid, rank, reason, Reservation(wid, rank, reason, blocks, self._release, booking,
                                                       self._overloaded))

    def _assess(self, wid: int, blocks: int, model: Optional[str], worker_type: Optional[str],
                overflow: bool = False) -> Optional[Assessment]:
        """Whether ``wid`` can take ``blocks`` more, on which rank, at what predicted utilisation.

        A rank qualifies only when the busy rule calls it free right now (the
        same verdict, thresholds and hysteresis memory as the busy set) and,
        with a known capacity, its reported load plus its bookings plus this
        request stays within ``busy_threshold × total`` (unless ``overflow``).
        """
        state = self._state
        w = state.workers.get(wid)
        if w is None or not w.admitted or w.hold_until is not None:
            return None
        card = w.card
        if model is not None and card.display_name != model:
            return None
        if worker_type is not None and card.worker_type != worker_type:
            return None
        inflight = self._inflight.get(wid, 0)
        total = card.total_kv_blocks
        th = state.thresholds
        threshold = th.busy_threshold
        start = card.data_parallel_start_rank
        end = start + min(card.data_parallel_size, MAX_RANKS_SCANNED)
        credit = self._credit
        ranks = w.ranks
        best = best_rank(_declared_ranks(wid, ranks, card, th, credit, start, end, self.external, self._live), total,
                         threshold,
                         blocks, overflow)
        if best is None:
            return None  # every rank busy or predicted busy
        if best[2] is not None:
            return (0, best[2]), best[1], best[2], inflight
        return (1, float(inflight)), best[1], None, inflight

    def free_ranks(self, wid: int, w: Any) -> Iterator[Tuple[int, int, int]]:
        """``(rank, reported load, booked blocks)`` of each of ``w``'s declared ranks the busy rule calls free."""
        card = w.card
        start = card.data_parallel_start_rank
        end = start + min(card.data_parallel_size, MAX_RANKS_SCANNED)
        return _declared_ranks(wid, w.ranks, card, self._state.thresholds, self._credit, start, end, self.external,
                               self._live)

    def live_blocks(self, wid: int, rank: int) -> int:
        """Blocks of this picker's unreleased bookings on a rank: the requests it routed there and has
        not seen finish (the KV router's own measure of a rank's decode load)."""
        return self._live.get((wid, rank), 0)

    def in_flight_now(self, wid: int) -> int:
        """Live bookings on ``wid`` without expiring any (for a chooser under the lock)."""
        return self._inflight.get(wid, 0)

    # --- releasing and expiry ---------------------------------------------------

    def _uncredit(self, b: _Booking) -> None:
        take_credit(self._credit, (b.wid, b.rank), b.seq, b.blocks)
        take_live(self._live, (b.wid, b.rank), b.blocks)

    def _expire(self, now: float) -> None:
        self._expire_due(now)
        # Credit booked against an older report no longer counts: forget it.
        if len(self._credit) > 4 * len(self._inflight) + 64:
            for key in [k for k, acc in self._credit.items() if acc[0] != self._seq_of(*k)]:
                del self._credit[key]

    def _seq_of(self, wid: int, rank: int) -> int:
        w = self._state.workers.get(wid)
        r = w.ranks.get(rank) if w is not None else None
        return r.seq if r is not None else 0

    def expire(self) -> None:
        with self._lock:
            self._expire(self._clock())


def _declared_ranks(wid: int, ranks: Dict[int, Any], card: Any, th: Any, credit: Dict[Tuple[int, int], List[int]],
                    start: int, end: int, external: Optional[Callable[[int, int], int]] = None,
                    live: Optional[Dict[Tuple[int, int], int]] = None) -> Iterator[Tuple[int, int, int]]:
    """``(rank, load, booked)`` for each declared rank the busy rule calls free right now.

    ``booked`` is what the bookings add to the reported load: the blocks booked
    since that report or, when more, those of every unreleased booking beyond
    it (``live``: a report leaves out the requests queued in the engine, which
    hold no KV blocks yet; so predicted load = max(report + booked since it,
    unreleased bookings))."""
    for rank_id in range(start, end):
        r = ranks.get(rank_id)
        load, seq = 0, 0
        if r is not None:
            if rank_verdict(r, card, th).verdict is True:
                continue  # the busy rule calls this rank busy (KV, prefill, hysteresis, stale)
            seq = r.seq
            if not r.stale:
                kv, decode = r.kv, r.decode
                load = max(kv if kv is not None else 0, decode if decode is not None else 0)
        acc = credit.get((wid, rank_id))
        booked = acc[1] if acc is not None and acc[0] == seq else 0
        if external is not None:
            booked += external(wid, rank_id)
        held = live.get((wid, rank_id), 0) if live is not None else 0
        yield rank_id, load, max(booked, held - load)


def best_rank(free_ranks: Iterable[Tuple[int, int, int]], total: Optional[int], threshold: Optional[float],
              blocks: int, overflow: bool = False) -> Optional[Tuple[float, int, Optional[float]]]:
    """The rank to book among ``(rank, reported load, booked blocks)`` of ranks the rule calls free.

    With a known capacity and the KV rule on: the lowest predicted
    utilisation among ranks where ``load + booked + blocks ≤ threshold ×
    total``: ``(utilisation, rank, utilisation)``; with ``overflow``, among
    every rank the rule calls free (the frontend would take the request
    there).  Otherwise the rank with the fewest blocks booked: ``(booked,
    rank, None)``.  None: no rank can take the request.  Shared by the
    in-process and the shared-memory pickers.
    """
    best: Optional[Tuple[float, int, Optional[float]]] = None
    if total and threshold is not None:
        limit = threshold * total
        for rank_id, load, booked in free_ranks:
            predicted = load + booked
            if predicted + blocks > limit and not overflow:
                continue  # this request would take the rank over the busy rule
            util = predicted / total
            if best is None or util < best[0]:
                best = (util, rank_id, util)
        return best
    for rank_id, _load, booked in free_ranks:
        if best is None or booked < best[0]:
            best = (float(booked), rank_id, None)
    return best


def check_overflow(overflow: Any) -> str:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}; got {overflow!r}")
    return str(overflow)


def check_strategy(strategy: Any) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    return str(strategy)


def check_blocks(blocks: Any) -> int:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"blocks must be an integer >= 0, got {blocks!r}")
    return blocks


def unsigned_ids(ids: Collection[int]) -> FrozenSet[int]:
    """Worker ids a caller named, in the unsigned form the fleet is keyed by."""
    return frozenset(i + (1 << 64) if i < 0 else i for i in ids)


def _describe(a: Assessment) -> str:
    util = a[2]
    return f"util {util:.2f}" if util is not None else f"{a[3]} in flight"


Chosen = Optional[Tuple[int, Assessment, Callable[[], str]]]


def _scan(free: Tuple[int, ...], assess: Callable[[int], Optional[Assessment]]) -> Chosen:
    best: Chosen = None
    for wid in free:
        a = assess(wid)
        if a is not None and (best is None or a[0] < best[1][0]):
            best = (wid, a, str)
    return best


def _least_loaded(picker: Picker, free: Tuple[int, ...], assess: Callable[[int], Optional[Assessment]]) -> Chosen:
    best = _scan(free, assess)
    if best is None:
        return None
    wid, a, _ = best
    return wid, a, lambda: f"least_loaded: {wid:x} has the lowest predicted load of {len(free)} free ({_describe(a)})"


def _p2c(picker: Picker, free: Tuple[int, ...], assess: Callable[[int], Optional[Assessment]]) -> Chosen:
    n = len(free)
    if n == 0:
        return None
    if n == 1:
        only = assess(free[0])
        if only is None:
            return None
        return free[0], only, lambda: f"p2c: {free[0]:x} is the only free worker ({_describe(only)})"
    rng = picker._rng
    found: List[Tuple[int, Assessment]] = []
    first = -1
    rand = rng.random
    for _ in range(_SAMPLES):
        i = int(rand() * n)
        if i == first:
            continue
        a = assess(free[i])
        if a is not None:
            found.append((free[i], a))
            if len(found) == 2:
                break
            first = i
    if len(found) < 2:
        # Few can take it: look at every free worker (the answer "none" must be true).
        best = _scan(free, assess)
        if best is None:
            return None
        wid, a, _ = best
        return wid, a, lambda: (f"p2c: {wid:x} is the least loaded that can take it ({_describe(a)}; "
                                "random draws found fewer than two)")
    (w1, a1), (w2, a2) = found
    if a2[0] < a1[0]:
        (w1, a1), (w2, a2) = (w2, a2), (w1, a1)
    return w1, a1, lambda: f"p2c: {w1:x} ({_describe(a1)}) over {w2:x} ({_describe(a2)})"


def _round_robin(picker: Picker, free: Tuple[int, ...], assess: Callable[[int], Optional[Assessment]]) -> Chosen:
    n = len(free)
    for k in range(n):
        i = (picker._rr + k) % n
        a = assess(free[i])
        if a is not None:
            picker._rr = i + 1
            wid = free[i]
            return wid, a, lambda: f"round_robin: {wid:x}, next of {n} free ({_describe(a)})"
    return None


def _random(picker: Picker, free: Tuple[int, ...], assess: Callable[[int], Optional[Assessment]]) -> Chosen:
    n = len(free)
    rng = picker._rng
    for _ in range(_SAMPLES if n else 0):
        wid = free[rng.randrange(n)]
        a = assess(wid)
        if a is not None:
            return wid, a, lambda: f"random: {wid:x} of {n} free ({_describe(a)})"
    eligible = [(wid, a) for wid in free for a in (assess(wid),) if a is not None]
    if not eligible:
        return None
    wid, a = eligible[rng.randrange(len(eligible))]
    return wid, a, lambda: f"random: {wid:x} of {len(eligible)} that can take it ({_describe(a)})"


_STRATEGY_IMPL: Dict[str, Callable[[Any, Tuple[int, ...], Callable[[int], Optional[Assessment]]], Chosen]] = {
    "p2c": _p2c,
    "least_loaded": _least_loaded,
    "round_robin": _round_robin,
    "random": _random,
}


class Pick(NamedTuple):
    """What a picker chose: the worker and rank, why (a callable that formats the sentence, only when
    asked), and the booking (None for ``select()``, and from :func:`settle` before the booking)."""

    worker_id: int
    dp_rank: int
    reason: Callable[[], str]
    reservation: Optional[Reservation]


def settle(counters: Counters, chosen: Chosen, book: bool) -> Optional[Pick]:
    """Count a pick's outcome: a :class:`Pick` without its booking for the booking to follow, or None."""
    if chosen is None:
        counters.inc("rejected" if book else "select_none")
        return None
    wid, assessment, reason = chosen
    if not book:
        counters.inc("selected")
    return Pick(wid, assessment[1], reason, None)


def choose(strategy: str, draws: Any, free: Tuple[int, ...], assess: Callable[[int], Optional[Assessment]],
           book: bool, steer: Optional[Callable[[int], Optional[Assessment]]] = None) -> Chosen:
    """Apply a strategy over ``free`` with ``assess``; ``draws`` holds ``_rng`` and the round-robin
    cursor ``_rr`` (a dry run leaves the cursor where the next booking will find it).

    ``steer`` (``overflow="steer"``): when no free worker has room for the
    request, the one ``steer`` rates most roomy among those the busy rule
    calls free — the frontend would serve it there; refusing would only shed.
    """
    rr = draws._rr
    chosen = _STRATEGY_IMPL[strategy](draws, free, assess)
    if not book:
        draws._rr = rr
    if chosen is None and steer is not None:
        best = _scan(free, steer)
        if best is not None:
            wid, a, _ = best
            draws.counters.inc("steered")
            chosen = wid, a, lambda: (f"steer: no free worker has room for this request; {wid:x} has the most "
                                      f"room left ({_describe(a)})")
    return chosen
