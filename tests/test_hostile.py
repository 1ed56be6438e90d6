"""Property-based tests: hostile bytes and hostile update sequences never break workermon."""

from __future__ import annotations

import json
from typing import Any, List

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workermon._model import Card, CardDelete, CardListing, CardPut, FeedStatus, LoadReport, Thresholds
from workermon._parse import Malformed, parse_card, parse_load
from workermon._reduce import FleetState, Limits

from .helpers import read_samples, sample_bytes

U64 = 1 << 64
LOAD_SAMPLES = [sample_bytes(m) for v in ("0.6.1", "0.8.1", "1.0.2", "1.6.1")
                for m in read_samples("nats", v) if m["subject"].endswith(".kv_metrics")]
CARD_SAMPLES = [e["value"].encode() for v in ("0.6.1", "0.7.1") for e in read_samples("etcd", v)
                if e["key"].startswith("v1/mdc/")]

extreme_ints = st.one_of(st.integers(), st.sampled_from([0, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
                                                           U64 - 1, U64, 10**40, -(10**40)]))
json_leaf = st.one_of(st.none(), st.booleans(), extreme_ints, st.floats(allow_nan=False),
                      st.text(max_size=50), st.just("x" * 100_000))
json_values = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=20)
load_like = st.fixed_dictionaries(
    {"worker_id": st.one_of(extreme_ints, json_values)},
    optional={"dp_rank": st.one_of(extreme_ints, json_values), "active_decode_blocks": st.one_of(extreme_ints, json_values),
              "kv_used_blocks": st.one_of(extreme_ints, json_values), "active_prefill_tokens": extreme_ints,
              "load_report_revision": extreme_ints,
              "data": st.one_of(json_values, st.fixed_dictionaries({"kv_stats": st.dictionaries(
                  st.sampled_from(["kv_active_blocks", "kv_total_blocks"]), st.one_of(extreme_ints, json_values)),
                  "worker_stats": st.dictionaries(st.just("data_parallel_rank"), st.one_of(extreme_ints, json_values))}))})


def _check_report(r: LoadReport) -> None:
    assert 0 <= r.worker_id < U64
    assert 0 <= r.dp_rank < 2**31
    for v in (r.kv_active_blocks, r.active_prefill_tokens, r.revision):
        assert v is None or (type(v) is int and 0 <= v < 2**63)


def _parse_or_reject(raw: bytes) -> None:
    try:
        _check_report(parse_load(raw))
    except Malformed:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes(raw: bytes) -> None:
    _parse_or_reject(raw)
    try:
        put = parse_card("v1/mdc/ns/c/e/1", raw, 1)
        assert isinstance(put.card, Card)
    except Malformed:
        pass


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(LOAD_SAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                                                         st.sampled_from(["flip", "insert", "delete"])), max_size=6))
def test_mutated_real_samples(raw: bytes, edits: List[Any]) -> None:
    data = bytearray(raw)
    for pos, byte, op in edits:
        if not data:
            break
        i = pos % len(data)
        if op == "flip":
            data[i] = byte
        elif op == "insert":
            data.insert(i, byte)
        else:
            del data[i]
    _parse_or_reject(bytes(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(load_like)
def test_structured_hostile_json(doc: Any) -> None:
    _parse_or_reject(json.dumps(doc).encode())
    # The same document inside a msgpack envelope (Dynamo 0.9+).
    try:
        inner = msgspec.msgpack.encode(doc)
    except (OverflowError, TypeError):
        return
    _parse_or_reject(msgspec.msgpack.encode({"publisher_id": 1, "payload": inner}))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CARD_SAMPLES), st.integers(0, 100_000), st.binary(max_size=8))
def test_mutated_cards(raw: bytes, pos: int, junk: bytes) -> None:
    i = pos % len(raw)
    data = raw[:i] + junk + raw[i + len(junk):]
    try:
        put = parse_card("v1/mdc/ns/c/e/1", data, 1)
        c = put.card
        assert c.total_kv_blocks is None or 0 <= c.total_kv_blocks < 2**63
        assert c.data_parallel_size >= 1
    except Malformed:
        pass


# --- the reducer under random update sequences ----------------------------------------------------

wids = st.sampled_from([1, 2, 3, 2**64 - 1])
keys = st.sampled_from(["v1/mdc/n/c/e/a", "v1/mdc/n/c/e/b", "v1/mdc/n/c/e/c", "v1/mdc/n/c/e/a/lora"])
cards = st.builds(Card, st.one_of(st.none(), st.integers(0, 2000)), st.integers(1, 4), st.integers(0, 4),
                  st.one_of(st.none(), st.integers(0, 10_000)))
updates = st.one_of(
    st.builds(CardPut, keys, wids, cards),
    st.builds(CardDelete, keys),
    st.builds(LoadReport, st.one_of(wids, st.integers(10, 10**6)), st.integers(0, 3),
              st.one_of(st.none(), st.integers(0, 3000)), st.one_of(st.none(), st.integers(0, 20_000)),
              st.one_of(st.none(), st.integers(0, 5)), st.one_of(st.none(), st.integers(0, 3000))),
    st.builds(CardListing, st.lists(st.builds(CardPut, keys, wids, cards), max_size=4).map(tuple), st.just(1),
              st.lists(keys, max_size=2).map(tuple)),
    st.builds(FeedStatus, st.booleans(), st.floats(0, 100)),
)


def _brute_force_busy(s: FleetState) -> set:
    """The rule recomputed from scratch (KV and prefill-count rules; no hysteresis or TTL).

    A worker is busy when every rank its card declares is busy; a declared
    rank with no report, or no data for any configured rule, counts as free.
    """
    th = s.thresholds
    out = set()
    if s.outage_active and th.outage_policy != "keep":
        return set(s.workers) if th.outage_policy == "busy" else set()
    for wid, w in s.workers.items():
        start, size = w.card.data_parallel_start_rank, w.card.data_parallel_size
        verdicts = []
        for rank_id in range(start, start + size):
            r = w.ranks.get(rank_id)
            if r is None:
                verdicts.append(False)
                continue
            if r.stale:               # "busy": fails closed; "ignore": kept, but no data
                verdicts.append(th.stale_policy == "busy")
                continue
            has, over = False, False
            total = w.card.total_kv_blocks
            for signal in (r.kv, r.decode):
                if signal is not None and th.busy_threshold is not None:
                    has = True
                    over = over or (bool(total) and signal > th.busy_threshold * total)
            if r.prefill is not None and th.prefill_tokens_threshold is not None:
                has = True
                over = over or r.prefill > th.prefill_tokens_threshold
            verdicts.append(has and over)
        assert set(w.ranks) <= set(range(start, start + size)), "a rank outside the declared range kept data"
        if all(verdicts):
            out.add(wid)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(updates, max_size=8), max_size=8), st.one_of(st.none(), st.floats(0.0, 1.0)),
       st.one_of(st.none(), st.integers(0, 5000)), st.sampled_from(["keep", "ignore", "busy"]),
       st.one_of(st.none(), st.sampled_from([0.5, 1.5])), st.sampled_from(["ignore", "busy"]))
def test_reducer_invariants(batches: List[List[Any]], threshold: float, prefill: Any, policy: str,
                            ttl: Any, stale_policy: str) -> None:
    s = FleetState(Thresholds(busy_threshold=threshold, prefill_tokens_threshold=prefill,
                              outage_policy=policy, outage_grace=1.0, metrics_ttl=ttl,
                              stale_policy=stale_policy),  # type: ignore[arg-type]
                   Limits(pending_max_workers=3, pending_max_age=30.0, max_ranks_per_worker=2))
    seen_busy: set = set()
    version = 0
    now = 0.0
    for batch in batches:
        now += 0.7
        for u in batch:
            s.apply(u, now)
        s.expire(now)
        change = s.commit()
        assert s.busy <= s.members
        assert s.pending_workers <= 3
        assert all(len(w.ranks) <= 2 and w.cards for w in s.workers.values())
        assert len(s._ttl_heap) <= sum(len(w.ranks) for w in s.workers.values()) + 2 * 8 * 8
        if ttl is not None:       # nothing older than the TTL survives an expire()
            assert all(r.stale or now - r.time < ttl for w in s.workers.values() for r in w.ranks.values())
        assert s.busy == _brute_force_busy(s)
        if change is not None:
            version += 1
            assert change.version == version
            assert change.busy == s.busy
            assert not (change.became_busy & (change.became_free | change.removed))
            assert change.became_busy <= change.busy
            assert (seen_busy - change.busy) == (change.became_free | change.removed)
            assert not (change.removed & s.members)
            seen_busy = set(change.busy)
        else:
            assert s.busy == seen_busy


# --- ZMQ frames: any bytes are a Malformed or a valid message, never anything else ---------

@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_zmq_frames_never_raise_anything_but_malformed(frames: List[bytes]) -> None:
    from workermon._parse import parse_zmq_frames

    try:
        pid, seq, payload = parse_zmq_frames(frames, b"kv_metrics")
    except Malformed:
        return
    assert 0 <= pid < 2**64 and 0 <= seq < 2**64 and payload


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1))
def test_event_channel_values_never_raise_anything_but_malformed(value: bytes, lease: int) -> None:
    from workermon._parse import parse_channel

    key = "v1/event_channels/namespace/d/component/c/endpoint/e/topic/kv_metrics/1f"
    try:
        parse_channel(key, value, lease)
    except Malformed:
        pass
