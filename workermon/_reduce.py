"""The pure reducer: fleet state + update → new state and busy-set changes.

No threads, no I/O, no clock of its own: the caller passes ``now``.  The
monitor calls it under its lock from the reducer thread; tests call it
directly.

The busy set is kept incrementally: an update re-evaluates only the worker it
touches (O(ranks)), so the cost per event does not grow with the fleet.  Only
a threshold change re-evaluates every worker, once.
"""

from __future__ import annotations

import heapq
import types
import weakref
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from ._model import (
    BusyChange,
    Card,
    CardDelete,
    CardListing,
    CardPut,
    Explanation,
    FeedStatus,
    LoadReport,
    RankExplanation,
    Thresholds,
    WorkerLoadState,
)

__all__ = ["Counters", "FleetState", "Limits"]


class Limits:
    """Caps on every structure that grows with input (all configurable)."""

    __slots__ = ("pending_max_workers", "pending_max_age", "max_ranks_per_worker")

    def __init__(
        self,
        pending_max_workers: int = 10_000,
        pending_max_age: float = 30.0,
        max_ranks_per_worker: int = 1024,
    ) -> None:
        if pending_max_workers < 0 or pending_max_age < 0 or max_ranks_per_worker < 1:
            raise ValueError("limits must be non-negative (max_ranks_per_worker >= 1)")
        self.pending_max_workers = pending_max_workers
        self.pending_max_age = pending_max_age
        self.max_ranks_per_worker = max_ranks_per_worker


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


class _Worker:
    __slots__ = ("cards", "card", "ranks", "busy", "last_time")

    def __init__(self) -> None:
        self.cards: Dict[str, Card] = {}
        self.card: Card = Card()
        self.ranks: Dict[int, _Rank] = {}
        self.busy = False
        self.last_time: Optional[float] = None

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


class _Pending:
    """Load data held for a worker whose card has not arrived yet."""

    __slots__ = ("first", "ranks")

    def __init__(self, now: float) -> None:
        self.first = now
        self.ranks: Dict[int, _Rank] = {}


class FleetState:
    """All state the monitor keeps, and the busy rule applied to it.

    Call the ``apply_*`` methods for each update, then :meth:`commit`, which
    returns the :class:`BusyChange` since the previous commit (or None).
    """

    def __init__(self, thresholds: Optional[Thresholds] = None, limits: Optional[Limits] = None) -> None:
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.limits = limits if limits is not None else Limits()
        self.counters = Counters()
        self.version = 0
        self.workers: Dict[int, _Worker] = {}
        self._key_owner: Dict[str, int] = {}
        self._card_pool: "weakref.WeakValueDictionary[Card, Card]" = weakref.WeakValueDictionary()
        self._busy: Set[int] = set()
        self._pending: "OrderedDict[int, _Pending]" = OrderedDict()
        # Since the last commit: each worker whose busy flag changed, mapped
        # to the flag it had at that commit (flips inside a batch cancel out).
        self._touched: Dict[int, bool] = {}
        self._membership_changed = False
        # Metrics-feed outage: since when it is down, and whether the
        # outage policy currently overrides the rule (see Thresholds).
        self.feed_down_since: Optional[float] = None
        self.outage_active = False
        # (deadline, seq, worker, rank id, rank) heap for metrics_ttl.  A rank
        # has at most one entry: when it comes due after newer reports it is
        # pushed again for the newest one, so the heap never outgrows the
        # ranks (a report per message would grow it with the message rate).
        self._ttl_heap: List[Tuple[float, int, int, int, _Rank]] = []
        self._ttl_seq = 0

    # --- reading ------------------------------------------------------------

    @property
    def busy(self) -> frozenset[int]:
        return frozenset(self._busy)

    @property
    def members(self) -> frozenset[int]:
        return frozenset(self.workers)

    def is_busy(self, worker_id: int) -> bool:
        return worker_id in self._busy

    def load_state(self, worker_id: int, now: float) -> WorkerLoadState:
        w = self.workers[worker_id]
        kv: Dict[int, int] = {}
        used: Dict[int, int] = {}
        decode: Dict[int, int] = {}
        prefill: Dict[int, int] = {}
        busy_ranks = set()
        stale_ranks = set()
        for rank_id, r in w.ranks.items():
            if r.kv is not None:
                used[rank_id] = kv[rank_id] = r.kv
            if r.decode is not None:
                decode[rank_id] = r.decode
                # The signal nearer the threshold is the one the rule acts on.
                kv[rank_id] = max(r.decode, kv.get(rank_id, 0))
            if r.prefill is not None:
                prefill[rank_id] = r.prefill
            if r.stale:
                stale_ranks.add(rank_id)
            if self._rank_busy(r, w.card) is True:
                busy_ranks.add(rank_id)
        return WorkerLoadState(
            worker_id=worker_id,
            kv_total_blocks=w.card.total_kv_blocks,
            kv_active_blocks=types.MappingProxyType(kv),
            busy=w.busy,
            last_report_age=None if w.last_time is None else max(0.0, now - w.last_time),
            active_prefill_tokens=types.MappingProxyType(prefill),
            busy_ranks=frozenset(busy_ranks),
            stale_ranks=frozenset(stale_ranks),
            data_parallel_size=w.card.data_parallel_size,
            data_parallel_start_rank=w.card.data_parallel_start_rank,
            max_num_batched_tokens=w.card.max_num_batched_tokens,
            card_keys=tuple(sorted(w.cards)),
            kv_used_blocks=types.MappingProxyType(used),
            active_decode_blocks=types.MappingProxyType(decode),
            display_name=w.card.display_name,
            worker_type=w.card.worker_type,
        )

    def explain(self, worker_id: int, now: float, booked: Callable[[int, int], int], in_flight: int) -> Explanation:
        """Why ``worker_id`` is (or is not) busy: each declared rank against the rule (no state changes)."""
        th = self.thresholds
        outage = self.outage_active and th.outage_policy != "keep"
        w = self.workers.get(worker_id)
        if w is None:
            held = " (reports for it are held until its card arrives)" if worker_id in self._pending else ""
            return Explanation(worker_id, False, False, (), th, th.outage_policy, self.outage_active, in_flight,
                               f"not a member: no card in etcd{held}")
        card = w.card
        ranks: List[RankExplanation] = []
        start = card.data_parallel_start_rank
        for rank_id in range(start, start + min(card.data_parallel_size, self.limits.max_ranks_per_worker)):
            ranks.append(self._explain_rank(rank_id, w.ranks.get(rank_id), card, now, booked(worker_id, rank_id)))
        declared = f"{card.data_parallel_size} declared rank(s) {start}…{start + card.data_parallel_size - 1}"
        if outage:
            summary = (f"{'BUSY' if w.busy else 'free'}: the metrics feed is down past outage_grace and "
                       f"outage_policy={th.outage_policy!r} overrides the rule")
        elif w.busy:
            summary = f"BUSY: every one of its {declared} is busy"
        else:
            free = [r.rank for r in ranks if not r.busy]
            summary = f"free: of its {declared}, rank(s) {', '.join(map(str, free[:8]))} not busy"
        return Explanation(worker_id, True, w.busy, tuple(ranks), th, th.outage_policy, self.outage_active,
                           in_flight, summary)

    def _explain_rank(self, rank_id: int, r: Optional[_Rank], card: Card, now: float, booked: int) -> RankExplanation:
        th = self.thresholds
        total = card.total_kv_blocks
        if r is None:
            return RankExplanation(rank_id, False, None, None, None, total, None, False, False, None, booked,
                                   "no report yet: counts as free (as Dynamo 1.6's frontend)")
        age = max(0.0, now - r.time)
        limit: Optional[float] = None
        parts: List[str] = []
        if th.busy_threshold is not None and total:
            held = (r.kv_over or r.decode_over) and th.recover_threshold is not None
            limit = (th.recover_threshold if held and th.recover_threshold is not None else th.busy_threshold) * total
            for name, value in (("kv_used_blocks", r.kv), ("active_decode_blocks", r.decode)):
                if value is not None:
                    parts.append(f"{name} {value} {'>' if value > limit else '≤'} {limit:g}"
                                 f"{' (recover, while over)' if held else ''} of {total}")
        elif th.busy_threshold is None:
            parts.append("KV rule off")
        else:
            parts.append("capacity unknown or 0: the KV rule cannot be over")
        if r.prefill is not None:
            if th.prefill_tokens_threshold is not None:
                parts.append(f"active_prefill_tokens {r.prefill} {'>' if r.prefill > th.prefill_tokens_threshold else '≤'}"
                             f" {th.prefill_tokens_threshold}")
            if th.prefill_tokens_threshold_frac is not None and card.max_num_batched_tokens is not None:
                lim = th.prefill_tokens_threshold_frac * card.max_num_batched_tokens
                parts.append(f"active_prefill_tokens {r.prefill} {'>' if r.prefill > lim else '≤'} {lim:g}")
        if r.stale:
            busy = True
            parts.insert(0, f"STALE (no report for {age:.1f} s > metrics_ttl; stale_policy='busy': fails closed)")
        else:
            verdict = self._rank_verdict(r, card)
            busy = verdict is True
            if verdict is None:
                parts.append("no data for any configured rule: counts as free")
        if booked:
            parts.append(f"{booked} block(s) booked since this report")
        text = ("BUSY: " if busy else "free: ") + "; ".join(parts) + f" (reported {age:.1f} s ago)"
        return RankExplanation(rank_id, True, r.kv, r.decode, r.prefill, total, limit, busy, r.stale, age, booked,
                               text)

    def _rank_verdict(self, r: _Rank, card: Card) -> Optional[bool]:
        """:meth:`_rank_busy` without touching the hysteresis memory."""
        saved = (r.kv_over, r.decode_over)
        try:
            return self._rank_busy(r, card)
        finally:
            r.kv_over, r.decode_over = saved

    def load_states(self, now: float) -> Dict[int, WorkerLoadState]:
        return {wid: self.load_state(wid, now) for wid in self.workers}

    @property
    def pending_workers(self) -> int:
        return len(self._pending)

    # --- updates ------------------------------------------------------------

    def apply(self, update: object, now: float) -> None:
        """Apply any one update (dispatch on its type)."""
        if isinstance(update, LoadReport):
            self.apply_load(update, now)
        elif isinstance(update, CardPut):
            self.apply_card_put(update, now)
        elif isinstance(update, CardDelete):
            self.apply_card_delete(update)
        elif isinstance(update, CardListing):
            self.apply_listing(update, now)
        elif isinstance(update, FeedStatus):
            self.apply_feed_status(update, now)
        else:
            raise TypeError(f"unknown update {type(update).__name__}")

    def apply_card_put(self, put: CardPut, now: float) -> None:
        self.counters.inc("card_puts")
        owner = self._key_owner.get(put.key)
        if owner is not None and owner != put.worker_id:
            # The key moved to another lease: it leaves its old owner first.
            self._remove_card(put.key)
        held = None
        w = self.workers.get(put.worker_id)
        if w is None:
            w = self.workers[put.worker_id] = _Worker()
            self._membership_changed = True
            held = self._pending.pop(put.worker_id, None)
            if held is not None:
                w.ranks = held.ranks
                w.last_time = max((r.time for r in held.ranks.values()), default=None)
                self.counters.inc("pending_applied")
        # Workers of one deployment carry equal cards: share one object, so
        # the hot path touches one card in cache instead of one per worker.
        card = self._card_pool.setdefault(put.card, put.card)
        w.cards[put.key] = card
        self._key_owner[put.key] = put.worker_id
        self._card_changed(put.worker_id, w)
        if held is not None:
            for rank_id, r in w.ranks.items():
                self._schedule_ttl(put.worker_id, rank_id, r)
        self._evaluate(put.worker_id, w)

    def _card_changed(self, wid: int, w: _Worker) -> None:
        w.choose_card()
        # Ranks that left the declared range go with their data.
        dropped = w.prune_ranks()
        if dropped:
            self.counters.inc("dropped_rank_out_of_range", dropped)

    def apply_card_delete(self, delete: CardDelete) -> None:
        self.counters.inc("card_deletes")
        self._remove_card(delete.key)

    def apply_listing(self, listing: CardListing, now: float) -> None:
        """Reconcile with a complete listing: drop keys it does not hold."""
        self.counters.inc("listings")
        listed = {put.key for put in listing.cards}
        # A key whose current value is malformed keeps its previous valid
        # card, as on the watch (SPEC §1.1).
        listed.update(listing.malformed_keys)
        kept = sum(1 for k in listing.malformed_keys if k in self._key_owner)
        if kept:
            self.counters.inc("listing_kept_malformed", kept)
        for key in [k for k in self._key_owner if k not in listed]:
            self._remove_card(key)
        for put in listing.cards:
            owner = self._key_owner.get(put.key)
            if owner == put.worker_id and self.workers[owner].cards.get(put.key) == put.card:
                continue
            self.apply_card_put(put, now)

    def apply_load(self, report: LoadReport, now: float) -> bool:
        """Apply one load report; True when it changed a member's data."""
        return self.apply_load_fields(
            report.worker_id, report.dp_rank, report.kv_active_blocks, report.active_decode_blocks,
            report.active_prefill_tokens, report.revision, now,
        )

    def apply_load_fields(
        self,
        wid: int,
        rank_id: int,
        kv: Optional[int],
        decode: Optional[int],
        prefill: Optional[int],
        revision: Optional[int],
        now: float,
    ) -> bool:
        """The hot path of :meth:`apply_load`, on plain fields (see ``parse_load_fields``)."""
        w = self.workers.get(wid)
        if w is None:
            self._hold(wid, rank_id, kv, decode, prefill, revision, now)
            return False
        card = w.card
        if not card.data_parallel_start_rank <= rank_id < card.data_parallel_start_rank + card.data_parallel_size:
            self.counters.inc("dropped_rank_out_of_range")
            return False
        rank = self._merge_into(w.ranks, rank_id, kv, decode, prefill, revision, now)
        if rank is None:
            return False
        w.last_time = now
        if not rank.queued and self.thresholds.metrics_ttl is not None:
            self._schedule_ttl(wid, rank_id, rank)
        self._evaluate(wid, w)
        return True

    def apply_feed_status(self, status: FeedStatus, now: float) -> None:
        """The metrics feed went down (policy applies after the grace) or came back."""
        if status.up:
            self.feed_down_since = None
            if self.outage_active:
                self.outage_active = False
                self.counters.inc("outages_ended")
                self._evaluate_all()
        elif self.feed_down_since is None:
            self.feed_down_since = status.at
            self.expire(now)

    def set_thresholds(self, thresholds: Thresholds, now: float) -> None:
        """Change the rule and re-evaluate every worker at once.

        State that depends on a setting is re-derived only when that setting
        changed: the hysteresis memory when ``busy_threshold`` or
        ``recover_threshold`` changed, each rank's staleness when
        ``metrics_ttl`` or ``stale_policy`` changed.
        """
        old = self.thresholds
        self.thresholds = thresholds
        if (old.busy_threshold, old.recover_threshold) != (thresholds.busy_threshold, thresholds.recover_threshold):
            for w in self.workers.values():
                for r in w.ranks.values():
                    # The memory says "over the old threshold": meaningless now.
                    r.kv_over = r.decode_over = False
        if (old.metrics_ttl, old.stale_policy) != (thresholds.metrics_ttl, thresholds.stale_policy):
            self._restale(now)
        self._evaluate_all()

    def _restale(self, now: float) -> None:
        """Re-derive every rank's staleness (and the TTL heap) under the current rule.

        Every rank starts fresh and is scheduled again; :meth:`expire` then
        applies the policy to those already past the TTL.  Without a TTL the
        last report stands.
        """
        self._ttl_heap = []
        for wid, w in self.workers.items():
            for rank_id, r in w.ranks.items():
                r.queued = False
                r.stale = False
                self._schedule_ttl(wid, rank_id, r)
        self.expire(now)

    def _evaluate_all(self) -> None:
        for wid, w in self.workers.items():
            self._evaluate(wid, w)

    def expire(self, now: float) -> None:
        """Apply staleness (metrics_ttl), the outage policy, and drop held metrics that are too old."""
        if (
            self.feed_down_since is not None
            and not self.outage_active
            and now - self.feed_down_since >= self.thresholds.outage_grace
        ):
            self.outage_active = True
            self.counters.inc("outages")
            if self.thresholds.outage_policy != "keep":
                self._evaluate_all()
        limits = self.limits
        while self._pending:
            wid, held = next(iter(self._pending.items()))
            if now - held.first < limits.pending_max_age:
                break
            del self._pending[wid]
            self.counters.inc("pending_expired")
        ttl = self.thresholds.metrics_ttl
        heap = self._ttl_heap
        if ttl is None:
            heap.clear()
            return
        while heap and heap[0][0] <= now:
            _, _, wid, rank_id, r = heapq.heappop(heap)
            w = self.workers.get(wid)
            if w is None or w.ranks.get(rank_id) is not r:
                continue  # the rank (or its worker) is gone
            r.queued = False
            if r.stale:
                continue
            if now - r.time < ttl:
                self._schedule_ttl(wid, rank_id, r)  # refreshed meanwhile: due later
                continue
            self.counters.inc("stale_expired")
            if self.thresholds.stale_policy == "ignore":
                del w.ranks[rank_id]
            else:
                r.stale = True
            self._evaluate(wid, w)

    def next_deadline(self) -> Optional[float]:
        """The earliest ``now`` at which :meth:`expire` has work, if any."""
        deadline: Optional[float] = None
        if self._ttl_heap and self.thresholds.metrics_ttl is not None:
            deadline = self._ttl_heap[0][0]
        if self._pending:
            held_deadline = next(iter(self._pending.values())).first + self.limits.pending_max_age
            deadline = held_deadline if deadline is None else min(deadline, held_deadline)
        if self.feed_down_since is not None and not self.outage_active:
            outage_deadline = self.feed_down_since + self.thresholds.outage_grace
            deadline = outage_deadline if deadline is None else min(deadline, outage_deadline)
        return deadline

    def commit(self) -> Optional[BusyChange]:
        """The change of the busy set since the last commit, or None."""
        touched = self._touched
        if not touched:
            return None
        self._touched = {}
        busy_now = self._busy
        became_busy = {w for w, was in touched.items() if not was and w in busy_now}
        left = {w for w, was in touched.items() if was and w not in busy_now}
        if not became_busy and not left:
            return None
        removed = frozenset(w for w in left if w not in self.workers)
        self.version += 1
        return BusyChange(
            busy=frozenset(self._busy),
            became_busy=frozenset(became_busy),
            became_free=frozenset(left) - removed,
            removed=removed,
            version=self.version,
        )

    def take_membership_changed(self) -> bool:
        """True once after any member joined or left (for snapshot rebuilds)."""
        changed = self._membership_changed
        self._membership_changed = False
        return changed

    # --- internals ----------------------------------------------------------

    def _hold(self, wid: int, rank_id: int, kv: Optional[int], decode: Optional[int], prefill: Optional[int],
              revision: Optional[int], now: float) -> None:
        self.counters.inc("unknown_worker")
        held = self._pending.get(wid)
        if held is None:
            if self.limits.pending_max_workers == 0:
                self.counters.inc("pending_dropped")
                return
            while len(self._pending) >= self.limits.pending_max_workers:
                self._pending.popitem(last=False)  # oldest first
                self.counters.inc("pending_dropped")
            held = self._pending[wid] = _Pending(now)
        self._merge_into(held.ranks, rank_id, kv, decode, prefill, revision, now)

    def _merge_into(self, ranks: Dict[int, _Rank], rank_id: int, kv: Optional[int], decode: Optional[int],
                    prefill: Optional[int], revision: Optional[int], now: float) -> Optional[_Rank]:
        """Merge a report into a member's or a held worker's ranks; None when it was dropped.

        The rank is created under the per-worker cap; a report whose revision
        is older than the rank's last one is stale and ignored.
        """
        rank = ranks.get(rank_id)
        if rank is None:
            if len(ranks) >= self.limits.max_ranks_per_worker:
                self.counters.inc("dropped_rank_limit")
                return None
            rank = ranks[rank_id] = _Rank()
        elif revision is not None and rank.revision is not None and revision < rank.revision:
            self.counters.inc("stale_revision")
            return None
        # A null field means "not reported": the rank's previous value stays.
        if kv is not None:
            rank.kv = kv
        if decode is not None:
            rank.decode = decode
        if prefill is not None:
            rank.prefill = prefill
        if revision is not None:
            rank.revision = revision
        rank.time = now
        rank.stale = False
        rank.seq += 1
        return rank

    def _remove_card(self, key: str) -> None:
        wid = self._key_owner.pop(key, None)
        if wid is None:
            return
        w = self.workers[wid]
        del w.cards[key]
        if w.cards:
            self._card_changed(wid, w)
            self._evaluate(wid, w)
            return
        # The last card went: the worker leaves with all its load data.
        del self.workers[wid]
        self._membership_changed = True
        self.counters.inc("workers_removed")
        if wid in self._busy:
            self._busy.discard(wid)
            self._note(wid, False)

    def _schedule_ttl(self, wid: int, rank_id: int, r: _Rank) -> None:
        ttl = self.thresholds.metrics_ttl
        if ttl is not None and not r.queued:
            self._ttl_seq += 1
            heapq.heappush(self._ttl_heap, (r.time + ttl, self._ttl_seq, wid, rank_id, r))
            r.queued = True

    def _rank_busy(self, r: _Rank, card: Card) -> Optional[bool]:
        """True/False when some configured rule has data for the rank, else None."""
        if r.stale:
            return True  # only "busy" policy keeps stale ranks: fail closed
        th = self.thresholds
        has_data = False
        over = False
        busy_threshold = th.busy_threshold
        if busy_threshold is not None and (r.kv is not None or r.decode is not None):
            # Each signal is held against the threshold on its own, with its
            # own hysteresis memory; the rank is over when either is.
            has_data = True
            total = card.total_kv_blocks
            recover = th.recover_threshold
            if total:
                if r.kv is not None:
                    limit = recover if r.kv_over and recover is not None else busy_threshold
                    r.kv_over = r.kv > limit * total
                if r.decode is not None:
                    limit = recover if r.decode_over and recover is not None else busy_threshold
                    r.decode_over = r.decode > limit * total
                over = r.kv_over or r.decode_over
            else:
                r.kv_over = r.decode_over = False
        if r.prefill is not None:
            if th.prefill_tokens_threshold is not None:
                has_data = True
                over = over or r.prefill > th.prefill_tokens_threshold
            if th.prefill_tokens_threshold_frac is not None and card.max_num_batched_tokens is not None:
                has_data = True
                over = over or r.prefill > th.prefill_tokens_threshold_frac * card.max_num_batched_tokens
        return over if has_data else None

    def _evaluate(self, wid: int, w: _Worker) -> None:
        if self.outage_active and self.thresholds.outage_policy != "keep":
            # The feed is down past its grace: fail closed ("busy") or open ("ignore").
            busy = self.thresholds.outage_policy == "busy"
        else:
            # Busy only when every declared rank is busy, as Dynamo 1.6's
            # frontend counts: a declared rank with no report (or no data for
            # any configured rule) counts as free.  Ranks hold only declared
            # ranks, so "every declared" is "as many as declared, all busy".
            # Every rank is evaluated, to keep each hysteresis memory current.
            card = w.card
            busy = True
            for r in w.ranks.values():
                if self._rank_busy(r, card) is not True:
                    busy = False
            if len(w.ranks) < card.data_parallel_size:
                busy = False
        if busy == w.busy:
            return
        w.busy = busy
        if busy:
            self._busy.add(wid)
        else:
            self._busy.discard(wid)
        self._note(wid, busy)

    def _note(self, wid: int, busy: bool) -> None:
        self._touched.setdefault(wid, not busy)


def apply_all(state: FleetState, updates: Iterable[object], now: float) -> Optional[BusyChange]:
    """Apply updates in order and commit once (a convenience for tests and tools)."""
    for update in updates:
        state.apply(update, now)
    state.expire(now)
    return state.commit()
