"""Agreeing with the frontend on who can take a request: card admission (Dynamo 1.5+) and
the frontend's memory of a 529, in the pure reducer and against real etcd + NATS."""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from workermon import Limits, WorkerMonitor
from workermon._model import Card, CardDelete, CardListing, CardPut, Overloaded, Thresholds
from workermon._parse import parse_card
from workermon._reduce import FleetState, apply_all

from .conftest import Changes
from .helpers import Make, RawNatsPublisher, active_load, card_key

A, B, C, D = 0xA1, 0xB2, 0xC3, 0xD4


def card_doc(block_size: int = 16, total: int = 100, tokenizer: str = "blake3:aaaa", path: str = "/m/x",
             name: str = "model-x", **runtime: Any) -> str:
    """A 1.6-shaped card; ``path`` is where the worker's files lie (not part of the checksum)."""
    rc: Dict[str, Any] = {"total_kv_blocks": total, "max_num_batched_tokens": 8192, **runtime}
    card = {
        "display_name": name,
        "tokenizer": {"hf_tokenizer_json": {"path": f"{path}/tokenizer.json", "checksum": tokenizer, "size": 5}},
        "kv_cache_block_size": block_size,
        "context_length": 0,
        "architectural_max_context_length": 4096,
        "model_type": "Chat | Completions",
        "model_input": "Tokens",
        "worker_type": "aggregated",
        "needs": [],
        "runtime_config": rc,
    }
    return json.dumps({"type": "Model", "namespace": "ns", "component": "backend", "endpoint": "generate",
                       "instance_id": 1, "card_json": card})


def put(wid: int, created: int, **doc: Any) -> CardPut:
    key = f"v1/mdc/ns/backend/generate/{wid:x}"
    parsed = parse_card(key, card_doc(**doc).encode(), wid, create_revision=created)
    return parsed


# --- card admission, pure -----------------------------------------------------------------

def test_first_registered_configuration_wins_and_others_are_not_members() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10), put(B, 11, block_size=32), put(C, 12, path="/other/host")], 0.0)
    # C differs only in where its files lie: the same checksums, so compatible.
    assert s.members == {A, C} and s.unadmitted == 1
    assert s.load_state(B, 0.0).admitted is False and s.load_state(A, 0.0).admitted is True
    text = s.explain(B, 0.0, lambda w, r: 0, 0).summary
    assert "NOT ADMITTED" in text and "kv_cache_block_size 32 (incumbent: 16)" in text and f"{A:x}" in text


def test_runtime_config_may_differ_freely() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10, total=100), put(B, 11, total=4096, data_parallel_size=2)], 0.0)
    assert s.members == {A, B} and s.unadmitted == 0


def test_a_listing_admits_in_registration_order_not_key_order() -> None:
    s = FleetState()
    # B's key sorts after A's, but B registered first: B's configuration is the incumbent.
    apply_all(s, [CardListing((put(A, 20), put(B, 5, block_size=32)), 30)], 0.0)
    assert s.members == {B} and s.load_state(A, 0.0).admitted is False


def test_incumbent_kept_while_any_worker_of_it_remains_then_the_next_registration() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10), put(B, 11, block_size=32), put(C, 12)], 0.0)
    assert s.members == {A, C}
    apply_all(s, [CardDelete(f"v1/mdc/ns/backend/generate/{A:x}")], 0.0)
    assert s.members == {C}  # C keeps the incumbent configuration: B stays refused
    change = apply_all(s, [CardDelete(f"v1/mdc/ns/backend/generate/{C:x}")], 0.0)
    assert s.members == {B} and s.unadmitted == 0 and change is None
    assert s.counters["admission_incumbent_changes"] == 1
    # A returns with the old configuration: now it is the one refused.
    apply_all(s, [put(A, 40)], 0.0)
    assert s.members == {B} and s.load_state(A, 0.0).admitted is False


def test_models_and_worker_sets_are_admitted_apart() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10), put(B, 11, block_size=32, name="model-y")], 0.0)
    assert s.members == {A, B}


def test_a_busy_worker_that_loses_admission_is_removed_from_the_busy_set() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10), put(B, 11)], 0.0)
    s.apply_load_fields(B, 0, 95, None, None, None, 0.0)
    assert s.commit() is not None and s.busy == {B}
    # B's card changes to an incompatible one (a re-registration with another block size).
    change = apply_all(s, [put(B, 11, block_size=32)], 0.0)
    assert change is not None and change.removed == {B} and change.became_free == frozenset()
    assert s.busy == frozenset() and s.members == {A}


def test_admission_off_serves_every_worker() -> None:
    s = FleetState(admission=False)
    apply_all(s, [put(A, 10), put(B, 11, block_size=32)], 0.0)
    assert s.members == {A, B} and s.unadmitted == 0


# --- the frontend's memory of a 529, pure ----------------------------------------------------

def test_overloaded_holds_busy_until_the_next_report_or_the_hold() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10), put(B, 11)], 0.0)
    change = apply_all(s, [Overloaded(A, 1.0)], 0.0)
    assert change is not None and change.became_busy == {A} and s.next_deadline() == 1.0
    assert "answered 529" in s.explain(A, 0.5, lambda w, r: 0, 0).summary
    assert s.load_state(A, 0.5).overload_hold_left == pytest.approx(0.5)
    # A fresh report (below the threshold) ends the hold at once.
    s.apply_load_fields(A, 0, 10, None, None, None, 0.2)
    assert s.commit() is not None and not s.is_busy(A)
    # Without a report, the hold ends by time.
    apply_all(s, [Overloaded(B, 1.0)], 1.0)
    assert s.is_busy(B) and apply_all(s, [], 1.99) is None
    change = apply_all(s, [], 2.0)
    assert change is not None and change.became_free == {B}


def test_overloaded_with_no_hold_changes_nothing() -> None:
    s = FleetState()
    apply_all(s, [put(A, 10)], 0.0)
    assert apply_all(s, [Overloaded(A, 0.0)], 0.0) is None and s.counters["overloaded"] == 1


# --- held reports are bounded by ranks (item 7), stale data kept under "ignore" (item 8) --------

def test_held_reports_bounded_by_ranks_not_by_workers() -> None:

    s = FleetState(limits=Limits(pending_max_ranks=5000))
    for wid in range(1000):
        for rank in range(64):
            s.apply_load_fields(0x10000 + wid, rank, 1, None, None, None, 0.0)
        assert s.pending_ranks <= 5000
    assert s.pending_ranks == sum(len(p.ranks) for p in s._pending.values()) > 4900
    assert s.counters["pending_dropped"] > 900
    # The newest held worker survives the eviction; its card brings its ranks.
    s.apply_card_put(CardPut("k", 0x10000 + 999, Card(100, data_parallel_size=64)), 0.0)
    assert len(s.load_state(0x10000 + 999, 0.0).kv_active_blocks) == 64


def test_turning_metrics_ttl_off_brings_the_last_report_back_under_ignore() -> None:
    s = FleetState(Thresholds(metrics_ttl=1.0, stale_policy="ignore"))
    apply_all(s, [put(A, 10)], 0.0)
    s.apply_load_fields(A, 0, 95, None, None, None, 0.0)
    assert s.commit() is not None and s.is_busy(A)
    change = apply_all(s, [], 1.0)
    assert change is not None and change.became_free == {A}
    assert s.load_state(A, 1.0).stale_ranks == {0} and dict(s.load_state(A, 1.0).kv_active_blocks) == {}
    s.set_thresholds(Thresholds(metrics_ttl=None, stale_policy="ignore"), 1.0)
    assert s.commit() is not None and s.is_busy(A)
    assert dict(s.load_state(A, 1.0).kv_active_blocks) == {0: 95}


# --- against real etcd + NATS -----------------------------------------------------------------

def _key(namespace: str, wid: int) -> str:
    return card_key(namespace, wid)


def test_mixed_block_sizes_never_picked_and_readmitted_after_the_incumbent_leaves(
        make_monitor: Make, etcd: Any, namespace: str, changes: Changes) -> None:
    wa, wb = 0x7100, 0x7200
    etcd.put(_key(namespace, wa), card_doc(block_size=16))
    etcd.put(_key(namespace, wb), card_doc(block_size=32))
    mon = make_monitor()
    mon.on_busy_change(changes)
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: len(mon.load_states()) == 2, 10)
    assert mon.members() == {wa} and mon.free_workers() == {wa}
    assert {w: st.admitted for w, st in mon.load_states().items()} == {wa: True, wb: False}
    assert all(mon.select() == wa for _ in range(50))
    picks = [mon.reserve() for _ in range(20)]
    assert {r.worker_id for r in picks if r is not None} == {wa} and all(picks)
    for r in picks:
        r.release()  # type: ignore[union-attr]
    assert "kv_cache_block_size 32 (incumbent: 16)" in str(mon.why(wb))
    h = mon.health().reducer
    assert h["unadmitted_workers"] == 1 and h["admission_refused"] == 1
    # The incumbent's last worker leaves: the frontend then serves B (measured on 1.6.1).
    etcd.delete(_key(namespace, wa))
    assert mon.wait_for(lambda: mon.members() == {wb}, 10)
    assert mon.reserve().worker_id == wb  # type: ignore[union-attr]
    assert mon.health().reducer["unadmitted_workers"] == 0
    etcd.delete(_key(namespace, wb))


def test_admission_off(make_monitor: Make, etcd: Any, namespace: str) -> None:
    wa, wb = 0x7300, 0x7400
    etcd.put(_key(namespace, wa), card_doc(block_size=16))
    etcd.put(_key(namespace, wb), card_doc(block_size=32))
    mon = make_monitor(admission=False)
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {wa, wb}, 10)
    for wid in (wa, wb):
        etcd.delete(_key(namespace, wid))


def test_overloaded_holds_the_worker_busy_until_its_next_report(
        make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher, changes: Changes) -> None:
    wa, wb = 0x7500, 0x7600
    for wid in (wa, wb):
        etcd.put(_key(namespace, wid), card_doc())
    mon = make_monitor(overload_hold=30.0)
    mon.on_busy_change(changes)
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {wa, wb}, 10)
    r = mon.reserve(exclude=(wb,))
    assert r is not None and r.worker_id == wa
    r.overloaded()
    # At once, before any report: busy, released, never picked, told to callbacks.
    assert r.released and mon.is_busy(wa) and mon.busy_workers() == {wa}
    assert all(mon.select() == wb for _ in range(30))
    assert mon.reserve(exclude=(wb,)) is None
    assert changes.get().became_busy == {wa}
    assert "answered 529" in str(mon.why(wa)) and mon.health().picker["in_flight"] == 0
    # Its next load report ends the hold.
    publisher.publish(f"namespace.{namespace}.kv_metrics", active_load(wa, kv_used_blocks=5))
    publisher.flush()
    assert changes.get().became_free == {wa} and not mon.is_busy(wa)
    for wid in (wa, wb):
        etcd.delete(_key(namespace, wid))


def test_overload_hold_ends_by_time_and_zero_turns_it_off(
        make_monitor: Make, etcd: Any, namespace: str, changes: Changes) -> None:
    wa = 0x7700
    etcd.put(_key(namespace, wa), card_doc())
    mon = make_monitor(overload_hold=0.2)
    mon.on_busy_change(changes)
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {wa}, 10)
    mon.overloaded(wa)
    assert mon.is_busy(wa) and changes.get().became_busy == {wa}
    # No report comes: the reducer wakes for the hold's end by itself.
    assert changes.get(timeout=10).became_free == {wa}
    off = make_monitor(overload_hold=0)
    off.start()
    assert off.wait_ready(10) and off.wait_for(lambda: off.members() == {wa}, 10)
    r = off.reserve()
    assert r is not None
    r.overloaded()
    assert r.released and not off.is_busy(wa) and off.health().reducer["overloaded"] == 1
    with pytest.raises(ValueError):
        WorkerMonitor(etcd_endpoints=None, overload_hold=-1)
    etcd.delete(_key(namespace, wa))


def test_reserved_rank_is_one_the_rule_calls_free(
        make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher) -> None:
    wid = 0x7800
    etcd.put(_key(namespace, wid), card_doc(total=100, data_parallel_size=2))
    mon = make_monitor(thresholds=Thresholds(prefill_tokens_threshold=1000, recover_threshold=0.5))
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {wid}, 10)
    subject = f"namespace.{namespace}.kv_metrics"
    # Rank 0: held busy by the prefill rule while its KV load is the lowest.
    publisher.publish(subject, active_load(wid, dp_rank=0, kv_used_blocks=1, active_prefill_tokens=5000))
    publisher.publish(subject, active_load(wid, dp_rank=1, kv_used_blocks=40))
    publisher.flush()
    assert mon.wait_for(lambda: mon.load_state(wid) is not None
                        and mon.load_state(wid).busy_ranks == {0}, 10)  # type: ignore[union-attr]
    ranks = set()
    for _ in range(50):
        r = mon.reserve()
        assert r is not None
        ranks.add(r.dp_rank)
        r.release()
    assert ranks == {1}
    # Rank 1 goes over (95 > 90), then back to 60: above recover (50), so still busy by
    # hysteresis, while rank 0's prefill clears; rank 0 must be chosen now.
    publisher.publish(subject, active_load(wid, dp_rank=1, kv_used_blocks=95))
    publisher.flush()
    assert mon.wait_for(lambda: mon.is_busy(wid), 10)
    publisher.publish(subject, active_load(wid, dp_rank=1, kv_used_blocks=60))
    publisher.publish(subject, active_load(wid, dp_rank=0, kv_used_blocks=70, active_prefill_tokens=0))
    publisher.flush()
    assert mon.wait_for(lambda: not mon.is_busy(wid)
                        and mon.load_state(wid).busy_ranks == {1}, 10)  # type: ignore[union-attr]
    chosen = [mon.reserve() for _ in range(10)]
    assert all(r is not None and r.dp_rank == 0 for r in chosen)
    for r in chosen:
        r.release()  # type: ignore[union-attr]
    etcd.delete(_key(namespace, wid))


def test_held_reports_bounded_by_ranks_through_nats(
        make_monitor: Make, namespace: str, publisher: RawNatsPublisher) -> None:
    mon = make_monitor(limits=Limits(pending_max_ranks=2000))
    mon.start()
    assert mon.wait_ready(10)
    subject = f"namespace.{namespace}.kv_metrics"
    n = 0
    for wid in range(200):
        for rank in range(64):
            publisher.publish(subject, active_load(0x90000 + wid, dp_rank=rank, kv_used_blocks=1))
            n += 1
    publisher.flush()
    assert mon.wait_for(lambda: mon.health().reducer.get("unknown_worker", 0) == n, 20)
    h = mon.health().reducer
    assert h["pending_ranks"] <= 2000 and h["pending_workers"] <= 2000 // 64 + 1 and h["pending_dropped"] > 0


def test_turning_metrics_ttl_off_restores_the_last_report(
        make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher, changes: Changes) -> None:
    wid = 0x7900
    etcd.put(_key(namespace, wid), card_doc(total=100))
    mon = make_monitor(thresholds=Thresholds(metrics_ttl=0.3, stale_policy="ignore"))
    mon.on_busy_change(changes)
    mon.start()
    assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {wid}, 10)
    publisher.publish(f"namespace.{namespace}.kv_metrics", active_load(wid, kv_used_blocks=95))
    publisher.flush()
    assert changes.get().became_busy == {wid}
    assert changes.get().became_free == {wid}  # stale after 0.3 s: its data is not used
    mon.set_thresholds(metrics_ttl=None)
    assert mon.is_busy(wid) and dict(mon.load_state(wid).kv_active_blocks) == {0: 95}  # type: ignore[union-attr]
    etcd.delete(_key(namespace, wid))


# --- the picker's promises: select()'s contract, why() agrees with reserve(), bookings bounded ----

def _picker(*puts: CardPut, ttl: float = 300.0, strategy: str = "p2c") -> "tuple[FleetState, Any, list]":
    from workermon._picker import Picker

    s = FleetState()
    apply_all(s, puts, 0.0)
    now = [0.0]
    return s, Picker(s, lambda: tuple(sorted(s.members - s.busy)), lambda: now[0], strategy, ttl), now


def test_select_round_robin_and_least_loaded_name_the_next_reserve() -> None:
    for strategy in ("round_robin", "least_loaded"):
        s, p, _ = _picker(put(A, 1), put(B, 2), put(C, 3), strategy=strategy)
        for _ in range(7):
            chosen = p.pick(book=False)
            assert chosen is not None
            r = p.pick(book=True)
            assert r is not None and r[0] == chosen.worker_id, strategy


def test_why_marks_a_rank_full_for_reserve_as_not_pickable() -> None:
    s, p, _ = _picker(put(A, 1, total=100))
    p.overflow = "refuse"
    s.apply_load_fields(A, 0, 85, None, None, None, 0.0)
    held = [p.pick(book=True) for _ in range(5)]  # 85 + 5 = 90: full for the next one
    assert all(h is not None for h in held) and p.pick(book=True) is None
    e = s.explain(A, 0.0, p.booked, p.in_flight(A))
    assert not e.busy and not e.ranks[0].busy and e.ranks[0].pickable is False
    assert "would not choose it" in e.summary and "full for reserve()" in e.ranks[0].why


def test_expired_bookings_are_dropped_on_read_and_released_ones_leave_at_once() -> None:
    s, p, now = _picker(put(A, 1, total=10_000), ttl=5.0)
    first = p.pick(book=True)
    assert first is not None
    for _ in range(10_000):
        chosen = p.pick(book=True)
        assert chosen is not None
        chosen.reservation.release()
    assert len(p._bookings) == 1  # only the live one, however many came and went behind it
    now[0] = 6.0  # past the TTL, and nobody picks
    assert p.totals() == (0, 0) and p.in_flight(A) == 0 and p.counters["expired"] == 1


def test_making_room_for_held_ranks_keeps_arrival_order_for_expiry() -> None:

    s = FleetState(limits=Limits(pending_max_ranks=3, pending_max_age=30.0))
    s.apply_load_fields(A, 0, 1, None, None, None, 0.0)    # held since 0
    s.apply_load_fields(B, 0, 1, None, None, None, 10.0)   # held since 10
    s.apply_load_fields(C, 0, 1, None, None, None, 15.0)   # the held ranks are full
    s.apply_load_fields(A, 1, 1, None, None, None, 20.0)   # A's new rank: B, the oldest other, makes room
    assert s.pending_ranks == 3 and s.pending_workers == 2
    s.expire(31.0)  # A (since 0) is past the 30 s age, C (since 15) is not
    assert s.pending_workers == 1 and s.counters["pending_expired"] == 1
    assert s.pending_ranks == 1
