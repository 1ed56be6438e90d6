"""The fleet state's building blocks: per-rank and per-worker records, card-admission groups, held
reports, and the busy rule for one rank (pure: the reducer keeps its memory, the picker only reads).

Everything here is mutated by the reducer thread only; other threads read
whole values (see the picker's module docstring).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Set, Tuple

from ._model import Card, Thresholds

__all__ = ["Counters", "RankVerdict", "rank_verdict"]  # and the records, private to the reducer and its views


class Counters(Dict[str, int]):
    """A dict of named counters, written by one thread only."""

    def inc(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n


class _Rank:
    __slots__ = ("kv", "decode", "prefill", "revision", "time", "kv_over", "decode_over", "stale", "queued", "seq")

    def __init__(self) -> None:
        # Two KV signals, never one overwriting the other: the worker's own
        # count (kv_used_blocks; LoadEvent's kv_active_blocks) and a router's
        # estimate (active_decode_blocks).
        self.kv: Optional[int] = None
        self.decode: Optional[int] = None
        self.prefill: Optional[int] = None
        self.revision: Optional[int] = None
        self.time = 0.0
        # Hysteresis memory of the KV rule, per signal; see _rank_busy.
        self.kv_over = False
        self.decode_over = False
        # Reports applied to this rank: the picker's bookings made before the
        # newest report stop counting (its credit rule).
        self.seq = 0
        self.stale = False
        # Whether a metrics_ttl deadline for this rank is in the heap: at
        # most one entry per rank, however many reports arrive.
        self.queued = False


class RankVerdict(NamedTuple):
    """The busy rule's answer for one rank: busy (True/False, None without data) and its hysteresis flags."""

    verdict: Optional[bool]
    kv_over: bool
    decode_over: bool


def rank_verdict(r: _Rank, card: Card, th: Thresholds) -> RankVerdict:
    """The busy rule for one rank, without changing it: ``(verdict, kv_over, decode_over)``.

    ``verdict`` is True/False when some configured rule has data for the
    rank, else None (counts as free); the two flags are the hysteresis memory
    the rule would keep for each KV signal.  Pure: the reducer stores the
    flags, the picker (on other threads) only reads the verdict.
    """
    kv_over, decode_over = r.kv_over, r.decode_over
    if r.stale:
        # stale_policy="busy" fails closed; "ignore" drops the stale data
        # (kept, so that turning metrics_ttl off brings the last report back).
        return RankVerdict(True if th.stale_policy == "busy" else None, kv_over, decode_over)
    has_data = False
    over = False
    busy_threshold = th.busy_threshold
    if busy_threshold is not None and (r.kv is not None or r.decode is not None):
        # Each signal is held against the threshold on its own, with its own
        # hysteresis memory; the rank is over when either is.
        has_data = True
        total = card.total_kv_blocks
        recover = th.recover_threshold
        if total:
            if r.kv is not None:
                limit = recover if kv_over and recover is not None else busy_threshold
                kv_over = r.kv > limit * total
            if r.decode is not None:
                limit = recover if decode_over and recover is not None else busy_threshold
                decode_over = r.decode > limit * total
            over = kv_over or decode_over
        else:
            kv_over = decode_over = False
    if r.prefill is not None:
        if th.prefill_tokens_threshold is not None:
            has_data = True
            over = over or r.prefill > th.prefill_tokens_threshold
        if th.prefill_tokens_threshold_frac is not None and card.max_num_batched_tokens is not None:
            has_data = True
            over = over or r.prefill > th.prefill_tokens_threshold_frac * card.max_num_batched_tokens
    return RankVerdict(over if has_data else None, kv_over, decode_over)


class _Worker:
    __slots__ = ("cards", "card", "ranks", "busy", "last_time", "created", "admitted", "group", "config",
                 "hold_until")

    def __init__(self) -> None:
        self.cards: Dict[str, Card] = {}
        self.card: Card = Card()
        self.ranks: Dict[int, _Rank] = {}
        self.busy = False
        self.last_time: Optional[float] = None
        # Card admission: the create revision of its card (registration
        # order), whether its model's frontend would serve it, and the
        # worker set and configuration it is counted under.
        self.created = 0
        self.admitted = True
        self.group: Optional[Tuple[str, ...]] = None
        self.config: Tuple[Tuple[str, str], ...] = ()
        # Reservation.overloaded(): busy until its next report or this time.
        self.hold_until: Optional[float] = None

    def choose_card(self) -> None:
        # Capacity comes from the lexicographically smallest key that carries
        # one; without any, the smallest key's card (unknown capacity).
        keys = sorted(self.cards)
        for key in keys:
            if self.cards[key].total_kv_blocks is not None:
                self.card = self.cards[key]
                break
        else:
            self.card = self.cards[keys[0]] if keys else Card()

    def declares(self, rank_id: int) -> bool:
        card = self.card
        return card.data_parallel_start_rank <= rank_id < card.data_parallel_start_rank + card.data_parallel_size

    def prune_ranks(self) -> int:
        """Drop the data of ranks the card no longer declares; how many went."""
        gone = [r for r in self.ranks if not self.declares(r)]
        for r in gone:
            del self.ranks[r]
        return len(gone)


class _Group:
    """The workers of one model's worker set, for card admission.

    ``incumbent`` is the configuration the frontend admits: the first one
    registered, kept while any worker of it remains (as the frontend keeps
    its WorkerSet); ``counts`` is the number of workers per configuration.
    """

    __slots__ = ("incumbent", "counts", "members")

    def __init__(self) -> None:
        self.incumbent: Optional[Tuple[Tuple[str, str], ...]] = None
        self.counts: Dict[Tuple[Tuple[str, str], ...], int] = {}
        self.members: Set[int] = set()


class _Pending:
    """Load data held for a worker whose card has not arrived yet."""

    __slots__ = ("first", "ranks")

    def __init__(self, now: float) -> None:
        self.first = now
        self.ranks: Dict[int, _Rank] = {}
