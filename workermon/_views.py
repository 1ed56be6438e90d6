"""Read-only views of the fleet state: ``load_state()``, ``explain()`` (``why()``), ``pick_state()``.

A mixin of :class:`~workermon._reduce.FleetState`: nothing here changes state
(the busy rule's verdict is asked without touching its hysteresis memory).
"""

from __future__ import annotations

import types
from typing import Callable, Dict, List, Optional, Tuple

from ._fleet import _Group, _Pending, _Rank, _Worker, rank_verdict
from ._model import Card, Explanation, PickState, RankExplanation, Thresholds, WorkerLoadState
from .options import Limits

__all__ = ["FleetViews"]


class FleetViews:
    """What the reducer's state answers without changing (see the module docstring)."""

    workers: Dict[int, _Worker]
    thresholds: Thresholds
    limits: Limits
    outage_active: bool
    _groups: Dict[Tuple[str, ...], _Group]
    _pending: "Dict[int, _Pending]"

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
            if rank_verdict(r, w.card, self.thresholds).verdict is True:
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
        verdict = rank_verdict(r, card, th).verdict
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
            ranks.append((load, r.seq, rank_verdict(r, card, th).verdict is True))
        return PickState(worker_id, w.admitted, w.busy, w.hold_until is not None, card.total_kv_blocks, start,
                         card.display_name, card.worker_type, tuple(ranks))
