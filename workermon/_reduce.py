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
import weakref
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ._fleet import Counters, _Group, _Pending, _Rank, _Worker, rank_verdict
from ._model import (
    BusyChange,
    Card,
    CardDelete,
    CardListing,
    CardPut,
    FeedStatus,
    LoadReport,
    Overloaded,
    Thresholds,
)
from ._views import FleetViews
from .options import Limits

__all__ = ["Counters", "FleetState", "Limits", "rank_verdict"]


class FleetState(FleetViews):
    """All state the monitor keeps, and the busy rule applied to it.

    Call the ``apply_*`` methods for each update, then :meth:`commit`, which
    returns the :class:`BusyChange` since the previous commit (or None).
    """

    def __init__(self, thresholds: Optional[Thresholds] = None, limits: Optional[Limits] = None,
                 admission: bool = True) -> None:
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self.limits = limits if limits is not None else Limits()
        # Card admission as Dynamo 1.5+ frontends do it (off: every worker is served).
        self.admission = admission
        self._groups: Dict[Tuple[str, ...], _Group] = {}
        self._unadmitted = 0
        # Workers held busy by Reservation.overloaded(): worker -> until.
        self._holds: Dict[int, float] = {}
        self._pending_ranks = 0
        # Workers whose picking state may have changed since take_dirty()
        # (re-evaluated, carded, removed), for the host agent's shared memory.
        self._dirty: Set[int] = set()
        self.track_dirty = False
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
        """Workers with a card that the frontend admits (all of them with admission off)."""
        if not self._unadmitted:
            return frozenset(self.workers)
        return frozenset(wid for wid, w in self.workers.items() if w.admitted)

    @property
    def unadmitted(self) -> int:
        return self._unadmitted

    def is_member(self, worker_id: int) -> bool:
        w = self.workers.get(worker_id)
        return w is not None and w.admitted

    def is_busy(self, worker_id: int) -> bool:
        return worker_id in self._busy

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def take_dirty(self) -> Set[int]:
        """The workers whose picking state may have changed since the last call (turns tracking on)."""
        self.track_dirty = True
        dirty, self._dirty = self._dirty, set()
        return dirty

    @property
    def pending_workers(self) -> int:
        return len(self._pending)

    @property
    def pending_ranks(self) -> int:
        return self._pending_ranks

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
        elif isinstance(update, Overloaded):
            self.apply_overloaded(update, now)
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
                self._pending_ranks -= len(held.ranks)
                w.ranks = held.ranks
                w.last_time = max((r.time for r in held.ranks.values()), default=None)
                self.counters.inc("pending_applied")
        # Workers of one deployment carry equal cards: share one object, so
        # the hot path touches one card in cache instead of one per worker.
        card = self._card_pool.setdefault(put.card, put.card)
        w.cards[put.key] = card
        self._key_owner[put.key] = put.worker_id
        if not w.created or (put.create_revision and put.create_revision < w.created):
            w.created = put.create_revision
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
        if self.admission and (w.group != w.card.worker_set or w.config != w.card.config):
            self._leave_group(wid, w)
            self._join_group(wid, w)

    # --- card admission (Dynamo 1.5+ frontends: "first wins" per worker set) ---

    def _join_group(self, wid: int, w: _Worker) -> None:
        key, config = w.card.worker_set, w.card.config
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        w.group, w.config = key, config
        group.members.add(wid)
        group.counts[config] = group.counts.get(config, 0) + 1
        if group.incumbent is None:
            group.incumbent = config
        self._set_admitted(wid, w, config == group.incumbent)

    def _leave_group(self, wid: int, w: _Worker) -> None:
        key = w.group
        if key is None:
            return
        w.group = None
        group = self._groups[key]
        group.members.discard(wid)
        n = group.counts[w.config] - 1
        if n:
            group.counts[w.config] = n
            return
        del group.counts[w.config]
        if not group.members:
            del self._groups[key]
        elif w.config == group.incumbent:
            # The incumbent configuration's last worker left: the frontend
            # starts a new incumbent with the next registration, i.e. the
            # earliest registered of those that remain.
            first = min(group.members, key=lambda x: (self.workers[x].created, x))
            group.incumbent = self.workers[first].config
            self.counters.inc("admission_incumbent_changes")
            for x in group.members:
                other = self.workers[x]
                self._set_admitted(x, other, other.config == group.incumbent)
                self._evaluate(x, other)

    def _set_admitted(self, wid: int, w: _Worker, admitted: bool) -> None:
        if w.admitted == admitted:
            return
        w.admitted = admitted
        self._membership_changed = True
        if admitted:
            self._unadmitted -= 1
            self.counters.inc("admission_admitted")
        else:
            self._unadmitted += 1
            self.counters.inc("admission_refused")

    def apply_card_delete(self, delete: CardDelete) -> None:
        self.counters.inc("card_deletes")
        self._remove_card(delete.key)

    def apply_listing(self, listing: CardListing, now: float) -> None:
        """Reconcile with a complete listing: drop keys it does not hold."""
        self.counters.inc("listings")
        listed = {put.key for put in listing.cards}
        # A key whose current value is malformed keeps its previous valid
        # card, as on the watch.
        listed.update(listing.malformed_keys)
        kept = sum(1 for k in listing.malformed_keys if k in self._key_owner)
        if kept:
            self.counters.inc("listing_kept_malformed", kept)
        for key in [k for k in self._key_owner if k not in listed]:
            self._remove_card(key)
        # In registration order, so that the first card of a model found in a
        # listing becomes its incumbent, as on a frontend that saw them come.
        for put in sorted(listing.cards, key=lambda p: p.create_revision):
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
        if w.hold_until is not None:
            # A fresh report ends the frontend's memory of a 529 (as Dynamo's).
            w.hold_until = None
            del self._holds[wid]
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

    def apply_overloaded(self, update: Overloaded, now: float) -> None:
        """The frontend refused a request on the worker as overloaded: busy until its next report or ``hold`` s."""
        w = self.workers.get(update.worker_id)
        self.counters.inc("overloaded")
        if w is None or update.hold <= 0:
            return
        w.hold_until = self._holds[update.worker_id] = now + update.hold
        self._evaluate(update.worker_id, w)

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
        self._evaluate_all()  # (every worker is then dirty for the agent: the verdicts may all differ)

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
            self._pending_ranks -= len(held.ranks)
            self.counters.inc("pending_expired")
        if self._holds:
            for wid in [x for x, until in self._holds.items() if until <= now]:
                del self._holds[wid]
                w = self.workers.get(wid)
                if w is not None:
                    w.hold_until = None
                    self._evaluate(wid, w)
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
            # Kept under either policy: the rule reads a stale rank as busy
            # ("busy") or as no data ("ignore"); a newer report, or turning
            # metrics_ttl off, makes it count again.
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
        if self._holds:
            hold_deadline = min(self._holds.values())
            deadline = hold_deadline if deadline is None else min(deadline, hold_deadline)
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
        # Removed: left the member set (no card any more, or no longer admitted).
        removed = frozenset(w for w in left if not self.is_member(w))
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
        limits = self.limits
        held = self._pending.get(wid)
        if held is None:
            if limits.pending_max_workers == 0 or limits.pending_max_ranks == 0:
                self.counters.inc("pending_dropped")
                return
            while len(self._pending) >= limits.pending_max_workers:
                self._drop_pending(next(iter(self._pending)))
            held = self._pending[wid] = _Pending(now)
        if rank_id not in held.ranks and not self._room_for_a_rank(wid):
            self.counters.inc("pending_dropped_ranks")
            return
        before = len(held.ranks)
        self._merge_into(held.ranks, rank_id, kv, decode, prefill, revision, now)
        self._pending_ranks += len(held.ranks) - before

    def _room_for_a_rank(self, keep: int) -> bool:
        """Drop the oldest held workers but ``keep`` until one more held rank fits; False when none can.

        The held workers stay in arrival order, which expire() relies on.
        """
        while self._pending_ranks >= self.limits.pending_max_ranks:
            victim = next((w for w in self._pending if w != keep), None)
            if victim is None:
                return False
            self._drop_pending(victim)
        return True

    def _drop_pending(self, wid: int) -> None:
        dropped = self._pending.pop(wid)
        self._pending_ranks -= len(dropped.ranks)
        self.counters.inc("pending_dropped")

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
        self._leave_group(wid, w)
        if not w.admitted:
            self._unadmitted -= 1
        if w.hold_until is not None:
            del self._holds[wid]
        del self.workers[wid]
        self._membership_changed = True
        if self.track_dirty:
            self._dirty.add(wid)
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
        """The rule's verdict for a rank, keeping its hysteresis memory (reducer thread only)."""
        verdict, r.kv_over, r.decode_over = rank_verdict(r, card, self.thresholds)
        return verdict

    def _evaluate(self, wid: int, w: _Worker) -> None:
        if self.track_dirty:
            self._dirty.add(wid)
        if not w.admitted:
            # Not a member while the frontend would refuse it: never busy
            # (the busy set holds members only).  Its rank memory waits.
            busy = False
        elif w.hold_until is not None:
            busy = True  # the frontend answered 529 for it: busy until its next report
        elif self.outage_active and self.thresholds.outage_policy != "keep":
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
