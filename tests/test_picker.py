"""select() / reserve(): the credit rule, expiry, strategies, filters, why().

Unit tests drive the pure reducer and the picker with an explicit clock; the
concurrency and end-to-end tests use a monitor on real etcd and nats-server.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Dict, List, Optional

import pytest

from workermon import Reservation
from workermon._model import Card, CardPut, LoadReport, Thresholds
from workermon._picker import STRATEGIES, Picker
from workermon._reduce import FleetState, apply_all

from .helpers import Make, RawNatsPublisher, active_load, card_json, card_key

A, B, C, D = 0xA1, 0xB2, 0xC3, 0xD4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fleet(*cards: CardPut, th: Optional[Thresholds] = None, ttl: float = 300.0,
          strategy: str = "p2c", overflow: str = "steer") -> "tuple[FleetState, Picker, Clock]":
    s = FleetState(th or Thresholds(busy_threshold=0.9))
    apply_all(s, cards, 0.0)
    clock = Clock()
    picker = Picker(s, lambda: tuple(sorted(s.members - s.busy)), clock, strategy, ttl, overflow=overflow)
    return s, picker, clock


def put(wid: int, total: Optional[int] = 100, **card: Any) -> CardPut:
    return CardPut(f"v1/mdc/ns/c/e/{wid:x}", wid, Card(total_kv_blocks=total, **card))


def reserve(p: Picker, **kw: Any) -> Optional[Reservation]:
    chosen = p.pick(book=True, **kw)
    return None if chosen is None else chosen.reservation


# --- the credit rule ----------------------------------------------------------------------

def test_a_report_after_the_booking_cancels_it() -> None:
    s, p, _ = fleet(put(A))
    apply_all(s, [LoadReport(A, 0, 50)], 0.0)
    r = reserve(p, blocks=30)
    assert r is not None and r.worker_id == A and p.booked(A, 0) == 30
    apply_all(s, [LoadReport(A, 0, 80)], 0.0)  # the worker's own count now includes the request
    assert p.booked(A, 0) == 0
    r.release()
    assert p.totals() == (0, 0)


def test_a_report_before_the_booking_does_not_cancel_it() -> None:
    s, p, _ = fleet(put(A), overflow="refuse")
    apply_all(s, [LoadReport(A, 0, 50)], 0.0)
    r = reserve(p, blocks=30)
    assert r is not None and p.booked(A, 0) == 30
    # 50 + 30 = 80; a request of 20 would make 100 > 90: predicted busy.
    assert reserve(p, blocks=20) is None
    assert reserve(p, blocks=10) is not None  # 90 is not over 90 (strictly greater)
    assert p.counters["rejected"] == 1


def test_release_is_idempotent_and_the_sum_returns_to_zero() -> None:
    s, p, _ = fleet(put(A), put(B))
    held = [reserve(p) for _ in range(50)]
    assert all(held) and p.totals() == (50, 50)
    for r in held:
        assert r is not None
        r.release()
        r.release()
    assert p.totals() == (0, 0) and p.counters["released"] == 50


def test_context_manager_releases_on_exception() -> None:
    s, p, _ = fleet(put(A))
    with pytest.raises(RuntimeError):
        with reserve(p) as r:  # type: ignore[union-attr]
            assert p.in_flight(A) == 1
            raise RuntimeError("forward failed")
    assert r.released and p.in_flight(A) == 0


def test_unreleased_bookings_expire_after_the_ttl() -> None:
    s, p, clock = fleet(put(A), ttl=10.0)
    r = reserve(p, blocks=5)
    assert r is not None and p.booked(A, 0) == 5
    clock.now = 9.9
    p.expire()
    assert p.booked(A, 0) == 5
    clock.now = 10.0
    p.expire()
    assert p.booked(A, 0) == 0 and p.in_flight(A) == 0 and p.counters["expired"] == 1
    r.release()  # after expiry: a no-op
    assert p.counters.get("released", 0) == 0


# --- choosing ----------------------------------------------------------------------------

def test_every_strategy_on_a_fixed_fleet() -> None:
    cards = [put(A), put(B), put(C), put(D)]
    loads = [LoadReport(A, 0, 80), LoadReport(B, 0, 10), LoadReport(C, 0, 40), LoadReport(D, 0, 95)]
    s, p, _ = fleet(*cards)
    apply_all(s, loads, 0.0)
    assert s.busy == {D}
    # least_loaded: the lowest predicted utilisation.
    assert p.pick(book=False, strategy="least_loaded").worker_id == B  # type: ignore[union-attr]
    # round_robin: the free workers in turn (sorted ids), skipping the busy one; a dry run
    # (select) names the next one without moving the turn.
    rr = []
    for _ in range(6):
        dry = p.pick(book=False, strategy="round_robin")
        booked = p.pick(book=True, strategy="round_robin", blocks=0)
        assert dry is not None and booked is not None and dry[0] == booked[0]
        booked[3].release()  # type: ignore[union-attr]
        rr.append(booked[0])
    assert rr == [A, B, C, A, B, C]
    # p2c: of two distinct random candidates, the lower predicted utilisation; never the worst one.
    picks = Counter(p.pick(book=False, strategy="p2c").worker_id for _ in range(300))  # type: ignore[union-attr]
    assert set(picks) <= {B, C} and picks[B] > picks[C]
    # random: any free worker that can take it.
    rnd = Counter(p.pick(book=False, strategy="random").worker_id for _ in range(300))  # type: ignore[union-attr]
    assert set(rnd) == {A, B, C}
    chosen = p.pick(book=False, strategy="p2c")
    assert chosen is not None and chosen.reason().startswith("p2c: ") and "util" in chosen.reason()


def test_unknown_strategy_and_bad_blocks() -> None:
    s, p, _ = fleet(put(A))
    with pytest.raises(ValueError):
        p.pick(book=True, strategy="fastest")
    with pytest.raises(ValueError):
        p.pick(book=True, blocks=-1)
    with pytest.raises(ValueError):
        Picker(s, lambda: (), Clock(), "nope")


def test_exclude_for_a_retry() -> None:
    s, p, _ = fleet(put(A), put(B))
    assert {p.pick(book=False, exclude=(A,)).worker_id for _ in range(20)} == {B}  # type: ignore[union-attr]
    assert p.pick(book=False, exclude=(A, B)) is None


def test_none_when_every_member_is_busy_or_predicted_busy() -> None:
    s, p, _ = fleet(put(A), put(B), overflow="refuse")
    apply_all(s, [LoadReport(A, 0, 95), LoadReport(B, 0, 85)], 0.0)
    assert reserve(p, blocks=4) is not None   # B: 85 + 4 = 89
    assert reserve(p, blocks=4) is None       # B: 89 + 4 = 93 > 90; A is busy
    assert s.busy == {A}


def test_unknown_capacity_compared_by_in_flight_count() -> None:
    s, p, _ = fleet(put(A, None), put(B, None))
    held = [reserve(p, strategy="least_loaded") for _ in range(10)]
    counts = Counter(r.worker_id for r in held if r is not None)
    assert counts == {A: 5, B: 5}


def test_data_parallel_rank_chosen_is_the_least_loaded() -> None:
    s, p, _ = fleet(put(A, 100, data_parallel_size=3))
    apply_all(s, [LoadReport(A, 0, 70), LoadReport(A, 1, 20), LoadReport(A, 2, 50)], 0.0)
    r = reserve(p, blocks=5)
    assert r is not None and r.dp_rank == 1
    ranks = Counter(reserve(p, blocks=5).dp_rank for _ in range(10))  # type: ignore[union-attr]
    assert ranks[1] >= 5 and 0 not in ranks or ranks[0] <= ranks[1]


def test_filters_from_the_card() -> None:
    s, p, _ = fleet(put(A, display_name="llama", worker_type="prefill"),
                    put(B, display_name="llama", worker_type="decode"),
                    put(C, display_name="qwen", worker_type="aggregated"))
    assert {p.pick(book=False, model="qwen").worker_id for _ in range(10)} == {C}  # type: ignore[union-attr]
    picked = {p.pick(book=False, model="llama", worker_type="decode") for _ in range(10)}
    assert {c.worker_id for c in picked if c is not None} == {B} and None not in picked
    assert p.pick(book=False, model="mistral") is None


def test_kv_rule_off_picks_by_in_flight() -> None:
    s, p, _ = fleet(put(A), put(B), th=Thresholds(busy_threshold=None))
    apply_all(s, [LoadReport(A, 0, 10_000)], 0.0)
    held = [reserve(p, strategy="least_loaded") for _ in range(4)]
    assert Counter(r.worker_id for r in held if r) == {A: 2, B: 2}


def test_spread_between_two_reports() -> None:
    # 100 equal workers, 5,000 reservations before any report: p2c and least_loaded stay even.
    cards = [put(0x1000 + i, 100_000) for i in range(100)]
    for strategy in ("p2c", "least_loaded"):
        s, p, _ = fleet(*cards, strategy=strategy)
        counts = Counter(reserve(p).worker_id for _ in range(5000))  # type: ignore[union-attr]
        assert max(counts.values()) / min(counts.values()) <= 1.25, (strategy, counts.most_common(3))


# --- why() ----------------------------------------------------------------------------------

def test_why_explains_each_rank() -> None:
    s, p, _ = fleet(put(A, 100, data_parallel_size=2), th=Thresholds(busy_threshold=0.5))
    apply_all(s, [LoadReport(A, 0, 80), LoadReport(A, 1, 10, None, None, 60)], 0.0)
    assert s.is_busy(A)
    e = s.explain(A, 1.0, p.booked, p.in_flight(A))
    assert e.member and e.busy and len(e.ranks) == 2
    r0, r1 = e.ranks
    assert r0.kv_used_blocks == 80 and r0.kv_limit == 50 and r0.busy
    assert r1.kv_used_blocks == 10 and r1.active_decode_blocks == 60 and r1.busy  # either signal over
    text = str(e)
    assert "BUSY" in text and "kv_used_blocks 80 > 50" in text and "active_decode_blocks 60 > 50" in text
    assert "busy_threshold 0.5" in text and "outage policy 'keep'" in text
    missing = s.explain(0xEE, 1.0, p.booked, 0)
    assert not missing.member and "not a member" in str(missing)


def test_why_rank_without_report() -> None:
    s, p, _ = fleet(put(A, 100, data_parallel_size=2))
    apply_all(s, [LoadReport(A, 1, 99)], 0.0)
    e = s.explain(A, 0.0, p.booked, 0)
    assert not e.busy and not e.ranks[0].reported and "no report yet" in e.ranks[0].why


# --- against a real monitor -----------------------------------------------------------------



def test_64_threads_never_overbook(make_monitor: Make, etcd: Any, namespace: str) -> None:
    ids = [0x5000 + i for i in range(4)]
    for wid in ids:
        etcd.put(card_key(namespace, wid), card_json(100))
    mon = make_monitor(busy_threshold=1.0, overflow="refuse")  # the prediction, strictly
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == set(ids), 10)
    held: Dict[int, int] = {wid: 0 for wid in ids}
    peak: Dict[int, int] = dict(held)
    lock = threading.Lock()
    errors: List[str] = []
    barrier = threading.Barrier(64)

    def worker() -> None:
        barrier.wait(10)
        for _ in range(200):
            r = mon.reserve(blocks=10)  # each worker can take 10 such requests (100 blocks)
            if r is None:
                continue
            with lock:
                held[r.worker_id] += 1
                peak[r.worker_id] = max(peak[r.worker_id], held[r.worker_id])
                if held[r.worker_id] > 10:
                    errors.append(f"{r.worker_id:x} holds {held[r.worker_id]}")
            with lock:
                held[r.worker_id] -= 1
            r.release()

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and max(peak.values()) <= 10
    h = mon.health().picker
    assert h["in_flight"] == 0 and h["booked_blocks"] == 0 and h["reserved"] == h["released"]
    for wid in ids:
        etcd.delete(card_key(namespace, wid))


def test_reserve_end_to_end(make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher) -> None:
    ids = [0x6000 + i for i in range(3)]
    for wid in ids:
        etcd.put(card_key(namespace, wid), card_json(100))
    mon = make_monitor(overflow="refuse")  # None when the prediction leaves no room
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == set(ids), 10)
    subject = f"namespace.{namespace}.kv_metrics"
    for wid, used in zip(ids, (95, 89, 10)):
        publisher.publish(subject, active_load(wid, kv_used_blocks=used))
    publisher.flush()
    assert mon.wait_for(lambda: mon.busy_workers() == {ids[0]}, 10)
    with mon.reserve(strategy="least_loaded") as r:  # type: ignore[union-attr]
        assert r.worker_id == ids[2] and r.dp_rank == 0 and "least_loaded" in r.reason
        assert mon.why(ids[2]).bookings_in_flight == 1
    assert mon.select(exclude=(ids[2],), blocks=2) is None  # ids[1]: 89 + 2 = 91 > 90
    assert mon.select(exclude=(ids[2],), blocks=1) == ids[1]
    assert "kv_used_blocks 95 > 90" in str(mon.why(ids[0]))
    assert mon.health().picker["reserved"] == 1
    for wid in ids:
        etcd.delete(card_key(namespace, wid))


def test_steer_books_the_roomiest_free_worker_when_none_has_room() -> None:
    # overflow="steer" (the default): refuse only when the frontend would (every
    # worker busy by the rule); when the request fits nowhere, the free worker
    # with the lowest predicted utilisation (its capacity counted) takes it.
    for strategy in STRATEGIES:
        s, p, _ = fleet(put(A, 100), put(B, 400), strategy=strategy)
        apply_all(s, [LoadReport(A, 0, 50), LoadReport(B, 0, 300)], 0.0)
        r = reserve(p, blocks=100)  # fits neither (A 150 > 90, B 400 > 360): A 0.50 < B 0.75
        assert r is not None and r.worker_id == A and p.counters["steered"] == 1
        assert "steer" in r.reason
        r2 = reserve(p, blocks=100)  # A now 1.50 predicted, B 0.75
        assert r2 is not None and r2.worker_id == B
        r3 = reserve(p, blocks=10)  # still fits nowhere: B 1.00 < A 1.50
        assert r3 is not None and r3.worker_id == B and p.counters["steered"] == 3
        r2.release()
        r3.release()
        r4 = reserve(p, blocks=10)  # B fits again (300 + 10 ≤ 360): no steering needed
        assert r4 is not None and r4.worker_id == B and p.counters["steered"] == 3
        apply_all(s, [LoadReport(A, 0, 95), LoadReport(B, 0, 390)], 1.0)
        assert s.busy == {A, B} and reserve(p, blocks=1) is None and p.counters["rejected"] == 1


def test_steer_prefers_any_worker_with_room_over_the_roomiest_overflow() -> None:
    s, p, _ = fleet(put(A, 100), put(B, 1000))
    apply_all(s, [LoadReport(A, 0, 10), LoadReport(B, 0, 850)], 0.0)
    # A fits 60 more (70 ≤ 90), B does not (910 > 900): every draw must take A,
    # never steer, whatever p2c samples.
    for _ in range(20):
        r = reserve(p, blocks=60)
        assert r is not None and r.worker_id == A
        r.release()
    assert p.counters.get("steered", 0) == 0
