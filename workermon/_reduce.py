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

from .options import Limits
from ._model import (
    BusyChange,
    Card,
    CardDelete,
    CardListing,
    CardPut,
    Explanation,
    FeedStatus,
    LoadReport,
    Overloaded,
    PickState,
    RankExplanation,
    Thresholds,
    WorkerLoadState,
)

__all__ = ["Counters", "FleetState", "Limits"]


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


def rank_verdict(r: _Rank, card: Card, th: Thresholds) -> Tuple[Optional[bool], bool, bool]:
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
        return (True if th.stale_policy == "busy" else None), kv_over, decode_over
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
    return (over if has_data else None), kv_over, decode_over


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


class FleetState:
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

    def load_state(self, worker_id: int, now: float) -> WorkerLoadState:
        w = self.workers[worker_id]
        kv: Dict[int, int] = {}
        used: Dict[int, int] = {}
        decode: Dict[int, int] = {}
        prefill: Dict[int, int] = {}
        busy_ranks = set()
        stale_ranks = set()
        ignore_stale = self.thresholds.stale_policy == "ignore"
        for rank_id, r in w.ranks.items():
            if r.stale and ignore_stale:
                # Kept (turning metrics_ttl off brings it back) but not used: not shown.
                stale_ranks.add(rank_id)
                continue
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
            if rank_verdict(r, w.card, self.thresholds)[0] is True:
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
            admitted=w.admitted,
            overload_hold_left=None if w.hold_until is None else max(0.0, w.hold_until - now),
        )

    def explain(self, worker_id: int, now: float, booked: Callable[[int, int], int], in_flight: int,
                blocks: int = 1) -> Explanation:
        """Why ``worker_id`` is (or is not) busy: each declared rank against the rule (no state changes).

        ``blocks`` is the request size a ``reserve()`` would book: a rank the
        rule calls free but whose bookings leave no room for it is said so.
        """
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
            ranks.append(self._explain_rank(rank_id, w.ranks.get(rank_id), card, now, booked(worker_id, rank_id),
                                            blocks))
        declared = f"{card.data_parallel_size} declared rank(s) {start}…{start + card.data_parallel_size - 1}"
        hold_left = None if w.hold_until is None else max(0.0, w.hold_until - now)
        if not w.admitted:
            summary = "NOT ADMITTED (never picked, not a member): " + self._admission_text(w)
        elif hold_left is not None:
            summary = (f"BUSY: the frontend answered 529 for it (Reservation.overloaded()); held busy until its "
                       f"next load report, or {hold_left:.2f} s more")
        elif outage:
            summary = (f"{'BUSY' if w.busy else 'free'}: the metrics feed is down past outage_grace and "
                       f"outage_policy={th.outage_policy!r} overrides the rule")
        elif w.busy:
            summary = f"BUSY: every one of its {declared} is busy"
        else:
            free = [r.rank for r in ranks if not r.busy]
            summary = f"free: of its {declared}, rank(s) {', '.join(map(str, free[:8]))} not busy"
            if not any(r.pickable for r in ranks):
                summary += (f"; but reserve(blocks={blocks}) would not choose it: no rank has room for the request "
                            "beside its bookings")
        return Explanation(worker_id, True, w.busy, tuple(ranks), th, th.outage_policy, self.outage_active,
                           in_flight, summary, w.admitted, hold_left)

    def _admission_text(self, w: _Worker) -> str:
        """Which card field differs from the incumbent configuration, and whose card that is."""
        group = self._groups.get(w.group) if w.group is not None else None
        incumbent = group.incumbent if group is not None else None
        if group is None or incumbent is None:
            return "its model has no incumbent configuration"
        holder = min((x for x in group.members if self.workers[x].config == incumbent),
                     key=lambda x: (self.workers[x].created, x), default=None)
        mine = dict(w.config)
        theirs = dict(incumbent)
        diffs = [f"{name} {mine.get(name, 'null')[:120]} (incumbent: {theirs.get(name, 'null')[:120]})"
                 for name in sorted(set(mine) | set(theirs)) if mine.get(name) != theirs.get(name)]
        who = f"worker {holder:x}" if holder is not None else "an earlier worker"
        return (f"its card differs from the incumbent configuration of model {w.card.display_name!r} "
                f"(first registered: {who}) in " + "; ".join(diffs or ["fields it does not show"]) +
                ": a Dynamo 1.5+ frontend refuses it (400)")

    def _explain_rank(self, rank_id: int, r: Optional[_Rank], card: Card, now: float, booked: int,
                      blocks: int) -> RankExplanation:
        th = self.thresholds
        total = card.total_kv_blocks
        limit: Optional[float] = None
        if th.busy_threshold is not None and total:
            limit = th.busy_threshold * total
        if r is None:
            room = limit is None or booked + blocks <= limit
            text = "no report yet: counts as free (as Dynamo 1.6's frontend)"
            if booked:
                text += f"; {booked} block(s) booked"
            if not room:
                text += f"; full for reserve(): {booked} booked + {blocks} > {limit:g}"
            return RankExplanation(rank_id, False, None, None, None, total, limit, False, False, None, booked,
                                   text, room)
        age = max(0.0, now - r.time)
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
        verdict = rank_verdict(r, card, th)[0]
        busy = verdict is True
        if r.stale:
            parts.insert(0, f"STALE (no report for {age:.1f} s > metrics_ttl; " + (
                "stale_policy='busy': fails closed)" if busy else "stale_policy='ignore': its data is not used)"))
        elif verdict is None:
            parts.append("no data for any configured rule: counts as free")
        room = not busy
        if booked:
            parts.append(f"{booked} block(s) booked since this report")
        if room and th.busy_threshold is not None and total:
            load = 0 if r.stale else max(r.kv or 0, r.decode or 0)
            over_limit = th.busy_threshold * total
            if load + booked + blocks > over_limit:
                room = False
                parts.append(f"full for reserve(): {load} + {booked} booked + {blocks} > {over_limit:g}")
        text = ("BUSY: " if busy else "free: ") + "; ".join(parts) + f" (reported {age:.1f} s ago)"
        return RankExplanation(rank_id, True, r.kv, r.decode, r.prefill, total, limit, busy, r.stale, age, booked,
                               text, room)

    def load_states(self, now: float) -> Dict[int, WorkerLoadState]:
        return {wid: self.load_state(wid, now) for wid in self.workers}

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def take_dirty(self) -> Set[int]:
        """The workers whose picking state may have changed since the last call (turns tracking on)."""
        self.track_dirty = True
        dirty, self._dirty = self._dirty, set()
        return dirty

    def pick_state(self, worker_id: int) -> Optional[PickState]:
        """What picking needs of one worker, or None when it has no card."""
        w = self.workers.get(worker_id)
        if w is None:
            return None
        card = w.card
        th = self.thresholds
        ranks: List[Tuple[Optional[int], int, bool]] = []
        start = card.data_parallel_start_rank
        for rank_id in range(start, start + min(card.data_parallel_size, self.limits.max_ranks_per_worker)):
            r = w.ranks.get(rank_id)
            if r is None:
                ranks.append((None, 0, False))
                continue
            load: Optional[int] = None
            if not r.stale and (r.kv is not None or r.decode is not None):
                load = max(r.kv if r.kv is not None else 0, r.decode if r.decode is not None else 0)
            ranks.append((load, r.seq, rank_verdict(r, card, th)[0] is True))
        return PickState(worker_id, w.admitted, w.busy, w.hold_until is not None, card.total_kv_blocks, start,
                         card.display_name, card.worker_type, tuple(ranks))

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
        # card, as on the watch (SPEC §1.1).
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
                self._drop_oldest_pending()
            held = self._pending[wid] = _Pending(now)
        elif rank_id not in held.ranks and self._pending_ranks >= limits.pending_max_ranks:
            # The held ranks are full: the oldest held workers make room (never this one).
            self._pending.move_to_end(wid)
            while self._pending_ranks >= limits.pending_max_ranks and next(iter(self._pending)) != wid:
                self._drop_oldest_pending()
            if self._pending_ranks >= limits.pending_max_ranks:
                self.counters.inc("pending_dropped_ranks")
                return
        before = len(held.ranks)
        self._merge_into(held.ranks, rank_id, kv, decode, prefill, revision, now)
        self._pending_ranks += len(held.ranks) - before
        while self._pending_ranks > limits.pending_max_ranks and len(self._pending) > 1:
            self._pending.move_to_end(wid)
            self._drop_oldest_pending()

    def _drop_oldest_pending(self) -> None:
        _, dropped = self._pending.popitem(last=False)  # oldest first
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
