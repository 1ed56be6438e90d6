"""Table-driven tests of the pure reducer: no threads, no servers, an explicit clock."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pytest

from workermon._model import BusyChange, Card, CardDelete, CardListing, CardPut, LoadReport, Thresholds
from workermon._reduce import FleetState, Limits, apply_all

W1, W2, W3 = 0x694D967CA5EFD804, 0x694D967CA5EFD806, 7


def put(wid: int, total: Optional[int] = 1000, key: Optional[str] = None, **card: int) -> CardPut:
    return CardPut(key or f"v1/mdc/ns/c/e/{wid:x}", wid, Card(total_kv_blocks=total, **card))


def load(wid: int, kv: Optional[int] = None, rank: int = 0, prefill: Optional[int] = None,
         rev: Optional[int] = None) -> LoadReport:
    return LoadReport(wid, rank, kv, prefill, rev)


def state_with(*updates: object, now: float = 0.0, **th: object) -> FleetState:
    s = FleetState(Thresholds(**th))  # type: ignore[arg-type]
    apply_all(s, updates, now)
    return s


# --- the seed's KV rule ----------------------------------------------------------------

@pytest.mark.parametrize(
    "total, active, threshold, busy",
    [
        (1000, 900, 0.9, False),   # equal to threshold × total is not busy (strictly greater)
        (1000, 901, 0.9, True),
        (1000, 899, 0.9, False),
        (1000, 1000, 1.0, False),
        (1000, 1001, 1.0, True),   # over capacity (a worker can report more than its card)
        (1000, 1, 0.0, True),
        (1000, 0, 0.0, False),
        (0, 5, 0.9, False),        # total 0: the rule cannot be over
        (None, 10**9, 0.9, False),  # unknown capacity
        (10, 9, 0.85, True),       # 9 > 8.5
        (3, 2, 2 / 3, False),      # float boundary: 2 > 2.0 is False
    ],
)
def test_kv_rule_boundary(total: Optional[int], active: int, threshold: float, busy: bool) -> None:
    s = state_with(put(W1, total), load(W1, active), busy_threshold=threshold)
    assert s.is_busy(W1) is busy
    assert s.busy == (frozenset({W1}) if busy else frozenset())


def test_no_data_is_not_busy_and_members_without_cards_do_not_exist() -> None:
    s = state_with(put(W1))
    assert s.members == {W1} and s.busy == frozenset()
    st = s.load_state(W1, 0.0)
    assert st.kv_total_blocks == 1000 and dict(st.kv_active_blocks) == {} and st.last_report_age is None


# --- data-parallel ranks, as the 1.6 frontend counts them -----------------------------------

@pytest.mark.parametrize(
    "size, start, ranks, busy",
    [
        (1, 0, [(0, 950)], True),
        (2, 0, [(0, 950), (1, 950)], True),
        (2, 0, [(0, 950), (1, 10)], False),
        (2, 0, [(0, 10), (1, 950)], False),
        (2, 0, [(1, 200 * 1000 // 256)], False),          # 1.6.1 probe: rank 0 never reported → accepted
        (2, 0, [(0, 950)], False),                        # a declared rank with no report counts as free
        (4, 0, [(0, 950), (1, 950), (2, 901), (3, 999)], True),
        (4, 0, [(0, 950), (1, 950), (2, 900), (3, 999)], False),
        (2, 4, [(4, 950), (5, 950)], True),               # start rank 4: ranks 4 and 5
    ],
)
def test_ranks(size: int, start: int, ranks: Sequence[Tuple[int, int]], busy: bool) -> None:
    s = state_with(put(W1, 1000, data_parallel_size=size, data_parallel_start_rank=start),
                   *[load(W1, kv, rank=r) for r, kv in ranks])
    assert s.is_busy(W1) is busy
    st = s.load_state(W1, 0.0)
    assert dict(st.kv_active_blocks) == dict(ranks)
    assert st.busy_ranks == {r for r, kv in ranks if kv > 900}
    assert list(st.declared_ranks) == list(range(start, start + size))


def test_reports_outside_the_declared_ranks_are_dropped() -> None:
    s = state_with(put(W1, 1000, data_parallel_size=2), load(W1, 950, rank=0), load(W1, 950, rank=2),
                   load(W1, 950, rank=7))
    assert not s.is_busy(W1)
    assert dict(s.load_state(W1, 0.0).kv_active_blocks) == {0: 950}
    assert s.counters["dropped_rank_out_of_range"] == 2


def test_card_without_dp_fields_declares_rank_zero_only() -> None:
    s = state_with(put(W1, 1000), load(W1, 950, rank=1))
    assert dict(s.load_state(W1, 0.0).kv_active_blocks) == {} and not s.is_busy(W1)
    apply_all(s, [load(W1, 950, rank=0)], 0.0)
    assert s.is_busy(W1)


def test_range_change_drops_ranks_that_left() -> None:
    s = state_with(put(W1, 1000, data_parallel_size=3), load(W1, 950, rank=0), load(W1, 10, rank=1),
                   load(W1, 950, rank=2))
    assert not s.is_busy(W1)
    c = apply_all(s, [put(W1, 1000, data_parallel_size=1)], 0.0)   # now rank 0 only
    assert c is not None and c.became_busy == {W1}
    assert dict(s.load_state(W1, 0.0).kv_active_blocks) == {0: 950}
    apply_all(s, [put(W1, 1000, data_parallel_size=3)], 0.0)        # ranks 1, 2 back, with no data
    assert not s.is_busy(W1)


def test_held_reports_outside_the_range_are_dropped_when_the_card_arrives() -> None:
    s = state_with(load(W1, 950, rank=0), load(W1, 950, rank=5))
    apply_all(s, [put(W1, 1000)], 1.0)
    assert s.is_busy(W1) and dict(s.load_state(W1, 1.0).kv_active_blocks) == {0: 950}
    assert s.counters["dropped_rank_out_of_range"] == 1


def test_old_release_reports_keep_their_results() -> None:
    # ≤ 0.7: LoadEvent with data_parallel_rank null (rank 0) on a card with data_parallel_size 1.
    s = state_with(put(W1, 1024, data_parallel_size=1), load(W1, 1000, rank=0))
    assert s.is_busy(W1)


def test_rank_with_no_data_for_any_rule_counts_as_free() -> None:
    # Rank 1 reported only prefill tokens and no prefill rule is configured: no
    # data for any configured rule, so it counts as free (as an unreported rank).
    s = state_with(put(W1, data_parallel_size=2), load(W1, 950, rank=0), load(W1, None, rank=1, prefill=5))
    assert not s.is_busy(W1)


# --- two KV signals, never one overwriting the other ------------------------------------------

def sig(wid: int, used: Optional[int] = None, decode: Optional[int] = None, rank: int = 0) -> LoadReport:
    return LoadReport(wid, rank, used, None, None, decode)


@pytest.mark.parametrize(
    "reports, busy",
    [
        ([sig(W1, used=950)], True),
        ([sig(W1, decode=950)], True),
        ([sig(W1, used=10, decode=950)], True),          # either over: over
        ([sig(W1, used=950, decode=10)], True),
        ([sig(W1, used=10, decode=10)], False),
        ([sig(W1, used=950), sig(W1, decode=10)], True),  # a decode-only report leaves used in place
        ([sig(W1, decode=950), sig(W1, used=10)], True),  # and the other way round
        ([sig(W1, used=950, decode=950), sig(W1, used=10), sig(W1, decode=10)], False),
    ],
)
def test_two_signals(reports: Sequence[LoadReport], busy: bool) -> None:
    s = state_with(put(W1), *reports)
    assert s.is_busy(W1) is busy


def test_two_signals_shown_apart() -> None:
    s = state_with(put(W1), sig(W1, used=300), sig(W1, decode=700))
    st = s.load_state(W1, 0.0)
    assert dict(st.kv_used_blocks) == {0: 300} and dict(st.active_decode_blocks) == {0: 700}
    assert dict(st.kv_active_blocks) == {0: 700}


# --- every threshold opt-in ------------------------------------------------------------------

def test_kv_rule_off() -> None:
    s = state_with(put(W1), load(W1, 1000), busy_threshold=None)
    assert not s.is_busy(W1)
    s2 = state_with(put(W1, max_num_batched_tokens=8192), load(W1, 1000, prefill=101), busy_threshold=None,
                    prefill_tokens_threshold=100)
    assert s2.is_busy(W1)


def test_prefill_frac_must_be_finite() -> None:
    with pytest.raises(ValueError):
        Thresholds(prefill_tokens_threshold_frac=float("inf"))
    with pytest.raises(ValueError):
        Thresholds(busy_threshold=None, recover_threshold=0.5)


# --- prefill rules ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "th, kv, prefill, busy",
    [
        ({"prefill_tokens_threshold": 100}, None, 101, True),
        ({"prefill_tokens_threshold": 100}, None, 100, False),
        ({"prefill_tokens_threshold": 100}, 10, 101, True),     # any configured rule over
        ({"prefill_tokens_threshold": 100}, 950, 0, True),
        ({"prefill_tokens_threshold_frac": 0.5}, None, 4097, True),   # 0.5 × 8192 = 4096
        ({"prefill_tokens_threshold_frac": 0.5}, None, 4096, False),
        ({}, None, 10**6, False),                                # prefill rules off by default
    ],
)
def test_prefill_rules(th: dict, kv: Optional[int], prefill: int, busy: bool) -> None:
    s = state_with(put(W1, 1000, max_num_batched_tokens=8192), load(W1, kv, prefill=prefill), **th)
    assert s.is_busy(W1) is busy


def test_prefill_frac_without_max_batched_tokens_has_no_data() -> None:
    s = state_with(put(W1, 1000), load(W1, None, prefill=10**6), prefill_tokens_threshold_frac=0.1)
    assert not s.is_busy(W1)


# --- hysteresis -----------------------------------------------------------------------------------

def test_recover_threshold_hysteresis() -> None:
    s = FleetState(Thresholds(busy_threshold=0.9, recover_threshold=0.7))
    steps = [(850, False), (950, True), (850, True), (701, True), (700, False), (850, False), (901, True)]
    apply_all(s, [put(W1)], 0.0)
    for kv, busy in steps:
        apply_all(s, [load(W1, kv)], 0.0)
        assert s.is_busy(W1) is busy, (kv, busy)


def test_without_recover_threshold_seed_behaviour() -> None:
    s = FleetState(Thresholds(busy_threshold=0.9))
    apply_all(s, [put(W1), load(W1, 950)], 0.0)
    apply_all(s, [load(W1, 850)], 0.0)
    assert not s.is_busy(W1)


# --- changes, versions, coalescing ----------------------------------------------------------

def test_busy_change_contents_and_versions() -> None:
    s = FleetState()
    assert apply_all(s, [put(W1), put(W2)], 0.0) is None
    c1 = apply_all(s, [load(W1, 950), load(W2, 950)], 0.0)
    assert c1 == BusyChange(frozenset({W1, W2}), frozenset({W1, W2}), frozenset(), frozenset(), 1)
    c2 = apply_all(s, [load(W1, 10), CardDelete(put(W2).key)], 0.0)
    assert c2 == BusyChange(frozenset(), frozenset(), frozenset({W1}), frozenset({W2}), 2)
    assert s.members == {W1}


def test_flip_and_flip_back_in_one_batch_is_no_change() -> None:
    s = FleetState()
    apply_all(s, [put(W1), load(W1, 950)], 0.0)
    assert apply_all(s, [load(W1, 10), load(W1, 950)], 0.0) is None
    assert apply_all(s, [load(W1, 10), load(W1, 950), load(W1, 10)], 0.0) is not None
    assert s.version == 2 and not s.is_busy(W1)


def test_threshold_change_recomputes_at_once() -> None:
    s = FleetState()
    apply_all(s, [put(W1), put(W2), load(W1, 850), load(W2, 950)], 0.0)
    assert s.busy == {W2}
    s.set_thresholds(Thresholds(busy_threshold=0.8), 0.0)
    c = s.commit()
    assert c is not None and c.busy == {W1, W2} and c.became_busy == {W1}
    s.set_thresholds(Thresholds(busy_threshold=0.99), 0.0)
    c = s.commit()
    assert c is not None and c.busy == frozenset() and c.became_free == {W1, W2}


def test_card_capacity_change_recomputes_without_a_metric() -> None:
    s = state_with(put(W1, 1000), load(W1, 950))
    assert s.is_busy(W1)
    c = apply_all(s, [put(W1, 2000)], 0.0)
    assert c is not None and c.became_free == {W1}
    c = apply_all(s, [put(W1, 1000)], 0.0)
    assert c is not None and c.became_busy == {W1}
    c = apply_all(s, [put(W1, None)], 0.0)   # capacity unknown again
    assert c is not None and c.became_free == {W1}


# --- several cards per worker ----------------------------------------------------------------

def test_worker_with_several_cards() -> None:
    a, b = "v1/mdc/ns/c/e/1", "v1/mdc/ns/c/e/1/lora"
    s = state_with(CardPut(b, W1, Card(500)), CardPut(a, W1, Card(None)), load(W1, 600))
    # Capacity comes from the smallest key that carries one: only b has one.
    assert s.load_state(W1, 0).kv_total_blocks == 500 and s.is_busy(W1)
    apply_all(s, [CardPut(a, W1, Card(1000))], 0.0)
    assert s.load_state(W1, 0).kv_total_blocks == 1000 and not s.is_busy(W1)
    apply_all(s, [CardDelete(a)], 0.0)
    assert s.members == {W1} and s.is_busy(W1)
    c = apply_all(s, [CardDelete(b)], 0.0)
    assert s.members == frozenset() and c is not None and c.removed == {W1}


def test_removed_worker_loses_its_load_data() -> None:
    s = state_with(put(W1), load(W1, 950))
    apply_all(s, [CardDelete(put(W1).key)], 0.0)
    apply_all(s, [put(W1)], 0.0)
    assert not s.is_busy(W1) and dict(s.load_state(W1, 0).kv_active_blocks) == {}


def test_listing_reconciles_adds_changes_and_deletes() -> None:
    s = state_with(put(W1), put(W2), put(W3), load(W2, 950), load(W3, 950))
    assert s.busy == {W2, W3}
    listing = CardListing((put(W1, 1000), put(W2, 2000)), revision=9)   # W3 gone, W2 changed
    c = apply_all(s, [listing], 0.0)
    assert s.members == {W1, W2}
    assert c is not None and c.removed == {W3} and c.became_free == {W2}
    assert apply_all(s, [listing], 0.0) is None   # the same listing again changes nothing
    # Three puts, then only W2's changed card: unchanged cards are not re-applied.
    assert s.counters["card_puts"] == 4


def test_key_moving_to_another_lease() -> None:
    key = "v1/mdc/ns/c/e/shared"
    s = state_with(CardPut(key, W1, Card(10)))
    apply_all(s, [CardPut(key, W2, Card(10))], 0.0)
    assert s.members == {W2}


# --- metrics before the card ---------------------------------------------------------------

def test_metrics_held_until_the_card_arrives() -> None:
    s = state_with(load(W1, 950), load(W1, 960, rank=1))
    assert s.members == frozenset() and s.pending_workers == 1
    c = apply_all(s, [put(W1, data_parallel_size=2)], 1.0)
    assert c is not None and c.became_busy == {W1}
    assert dict(s.load_state(W1, 1.0).kv_active_blocks) == {0: 950, 1: 960}
    assert s.pending_workers == 0


def test_held_metrics_expire_and_are_bounded() -> None:
    s = FleetState(limits=Limits(pending_max_workers=3, pending_max_age=30.0))
    apply_all(s, [load(i, 5) for i in range(1, 11)], 0.0)
    assert s.pending_workers == 3 and s.counters["pending_dropped"] == 7
    assert s.next_deadline() == 30.0
    apply_all(s, [], 30.0)
    assert s.pending_workers == 0 and s.counters["pending_expired"] == 3
    apply_all(s, [put(10)], 31.0)
    assert dict(s.load_state(10, 31.0).kv_active_blocks) == {}


def test_flood_of_unknown_ids_keeps_memory_bounded() -> None:
    s = FleetState()
    apply_all(s, [load(i, 1) for i in range(100_000)], 0.0)
    assert s.pending_workers == 10_000 and s.members == frozenset()
    assert s.counters["pending_dropped"] == 90_000


def test_rank_count_is_capped() -> None:
    s = FleetState(limits=Limits(max_ranks_per_worker=4))
    apply_all(s, [put(W1, data_parallel_size=100)] + [load(W1, 1, rank=r) for r in range(100)], 0.0)
    assert len(s.load_state(W1, 0).kv_active_blocks) == 4
    assert s.counters["dropped_rank_limit"] == 96


# --- ordering and revisions ---------------------------------------------------------------------

def test_stale_revision_is_ignored() -> None:
    s = state_with(put(W1, data_parallel_size=2), load(W1, 950, rev=10))
    apply_all(s, [load(W1, 10, rev=9)], 0.0)
    assert s.load_state(W1, 0).kv_active_blocks[0] == 950 and s.counters["stale_revision"] == 1
    apply_all(s, [load(W1, 10, rev=10)], 0.0)   # equal is not stale
    assert s.load_state(W1, 0).kv_active_blocks[0] == 10
    apply_all(s, [load(W1, 950, rank=1, rev=1)], 0.0)   # revisions are per rank
    assert s.load_state(W1, 0).kv_active_blocks[1] == 950


def test_null_fields_keep_previous_values() -> None:
    s = state_with(put(W1), load(W1, 950, prefill=7))
    apply_all(s, [load(W1, None, prefill=None)], 0.0)
    st = s.load_state(W1, 0)
    assert st.kv_active_blocks[0] == 950 and st.active_prefill_tokens[0] == 7 and st.busy


# --- staleness ------------------------------------------------------------------------------------

def test_ttl_ignore_policy() -> None:
    s = FleetState(Thresholds(metrics_ttl=10.0, stale_policy="ignore"))
    apply_all(s, [put(W1), load(W1, 950)], 0.0)
    assert s.is_busy(W1) and s.next_deadline() == 10.0
    assert apply_all(s, [], 9.9) is None
    c = apply_all(s, [], 10.0)
    assert c is not None and c.became_free == {W1}
    assert dict(s.load_state(W1, 10.0).kv_active_blocks) == {}
    apply_all(s, [load(W1, 950)], 11.0)
    assert s.is_busy(W1)


def test_ttl_busy_policy_fails_closed() -> None:
    s = FleetState(Thresholds(metrics_ttl=5.0, stale_policy="busy"))
    apply_all(s, [put(W1), load(W1, 10)], 0.0)
    assert not s.is_busy(W1)
    c = apply_all(s, [], 5.0)
    assert c is not None and c.became_busy == {W1}
    assert s.load_state(W1, 5.0).stale_ranks == {0}
    c = apply_all(s, [load(W1, 10)], 6.0)
    assert c is not None and c.became_free == {W1}


def test_ttl_refreshed_by_new_reports() -> None:
    s = FleetState(Thresholds(metrics_ttl=10.0))
    apply_all(s, [put(W1), load(W1, 950)], 0.0)
    apply_all(s, [load(W1, 951)], 8.0)
    assert apply_all(s, [], 12.0) is None and s.is_busy(W1)
    assert apply_all(s, [], 18.0) is not None and not s.is_busy(W1)


def test_ttl_turned_on_at_run_time() -> None:
    s = FleetState()
    apply_all(s, [put(W1), load(W1, 950)], 0.0)
    s.set_thresholds(Thresholds(metrics_ttl=1.0), 0.0)
    s.expire(100.0)
    c = s.commit()
    assert c is not None and c.became_free == {W1}


# --- thresholds validation ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [
        {"busy_threshold": 1.5}, {"busy_threshold": -0.1}, {"busy_threshold": float("nan")},
        {"busy_threshold": True}, {"busy_threshold": "0.9"},
        {"recover_threshold": 0.95}, {"recover_threshold": 0.9}, {"recover_threshold": -1},
        {"prefill_tokens_threshold": -1}, {"prefill_tokens_threshold": 1.5},
        {"prefill_tokens_threshold_frac": -0.5}, {"metrics_ttl": 0}, {"metrics_ttl": -1},
        {"stale_policy": "drop"},
    ],
)
def test_invalid_thresholds(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Thresholds(**kwargs)


def test_unknown_update_type() -> None:
    with pytest.raises(TypeError):
        FleetState().apply(object(), 0.0)


# --- metrics-feed outage policy ---------------------------------------------------------------------

@pytest.mark.parametrize("policy, busy_during", [("keep", {W1}), ("ignore", set()), ("busy", {W1, W2})])
def test_outage_policy(policy: str, busy_during: set) -> None:
    from workermon._model import FeedStatus

    s = FleetState(Thresholds(outage_policy=policy, outage_grace=5.0))  # type: ignore[arg-type]
    apply_all(s, [FeedStatus(True, 0.0), put(W1), put(W2), load(W1, 950), load(W2, 10)], 0.0)
    assert s.busy == {W1}
    apply_all(s, [FeedStatus(False, 10.0)], 10.0)
    assert s.busy == {W1} and s.next_deadline() == 15.0     # within the grace nothing changes
    apply_all(s, [], 15.0)
    assert s.busy == busy_during
    assert s.load_state(W2, 15.0).kv_active_blocks[0] == 10  # data is kept either way
    apply_all(s, [FeedStatus(True, 20.0)], 20.0)
    assert s.busy == {W1}                                    # back to the rule at once


def test_ttl_bookkeeping_does_not_grow_with_the_message_rate() -> None:
    s = FleetState(Thresholds(metrics_ttl=30.0))
    apply_all(s, [put(W1, data_parallel_size=3), put(W2, data_parallel_size=3)], 0.0)
    for i in range(100_000):
        s.apply_load(load(W1 if i % 2 else W2, i % 1000, rank=i % 3), i * 0.0001)
    assert len(s._ttl_heap) <= 6          # one deadline per rank, not one per report
    apply_all(s, [], 10.0 + 30.0)           # everything expired since its last report
    assert dict(s.load_state(W1, 40.0).kv_active_blocks) == {} and s.counters["stale_expired"] == 6
