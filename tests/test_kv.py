"""KV block hashes and the KV index: golden checks on real 1.6.1 traffic, and the index's rules.

The samples (``tests/data/dynamo-samples/kv-1.6.1-*``, copied from the shared ones) come from a 1.6.1 fleet
whose tiny byte-level tokenizer lists its three special tokens first: a byte
``b`` is token ``b + 3``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Dict, List, Tuple

import msgspec
import pytest

from workermon import block_hashes
from workermon._kvhash import chain_hash, sequence_hashes
from workermon._kvindex import KvIndex, decode_kv_payload

from .helpers import SAMPLES  # the copy of shared/dynamo-samples in tests/data
W1, W2 = 7668682703455707400, 7668682703455707422


def _samples() -> Path:
    if not (SAMPLES / "kv-1.6.1-requests-phaseA-B.jsonl").exists():
        pytest.skip(f"the captured 1.6.1 samples are not at {SAMPLES}")
    return SAMPLES


def _requests() -> List[Dict[str, Any]]:
    s = _samples()
    lines = (s / "kv-1.6.1-requests-phaseA-B.jsonl").read_text().splitlines()
    lines += (s / "kv-1.6.1-requests-phaseC.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _events() -> List[Tuple[float, Dict[str, Any]]]:
    out = []
    for line in (_samples() / "kv-1.6.1-kv-events-and-active-seq.raw.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d.get("topic_frame") != "kv-events":
            continue
        body = bytes.fromhex(d["frames_hex"][3])
        assert body[0] == 1
        (n,) = struct.unpack(">I", body[1:5])
        out.append((d["t"], msgspec.msgpack.decode(body[5:5 + n])))
    return out


def tokens_of(prompt: str) -> List[int]:
    return [b + 3 for b in prompt.encode()]


def test_block_hashes_equal_the_frontends_local_hashes() -> None:
    log = (_samples() / "kv-1.6.1-kvmode-frontend-routing-debug.log").read_text()
    logged = [[int(x) for x in m.group(1).split(", ")] for m in re.finditer(r"local_hashes=\[([^\]]*)\]", log)]
    names = ["P3", "P4"] + [f"evict{i}" for i in range(5)]  # the requests the kv-mode frontend routed, in order
    routed = sorted((r for r in _requests() if r["name"] in names), key=lambda r: r["t"])
    assert len(logged) == len(routed) == 7
    for r, hashes in zip(routed, logged):
        assert block_hashes(tokens_of(r["prompt"]), 16) == hashes, r["name"]


def test_block_hashes_rules() -> None:
    toks = list(range(40))
    assert len(block_hashes(toks, 16)) == 2  # only full blocks
    assert block_hashes(toks[:15], 16) == []
    assert block_hashes(toks, 16)[0] == block_hashes(toks[:16], 16)[0]
    plain = block_hashes(toks, 16)
    assert block_hashes(toks, 16, lora_name="a") != plain != block_hashes(toks, 16, cache_salt="a")
    assert block_hashes(toks, 16, lora_name="a") != block_hashes(toks, 16, cache_salt="a")
    assert block_hashes(toks, 16, lora_name="", cache_salt="") == plain  # empty = none, as the wheel does
    assert all(0 <= h < 1 << 64 for h in block_hashes([2**32 - 1] * 32, 16))
    with pytest.raises(ValueError):
        block_hashes([-1] * 16, 16)
    with pytest.raises(ValueError):
        block_hashes(toks, 0)


def test_stored_block_hashes_follow_the_chain_rule() -> None:
    checked = 0
    for _, env in _events():
        for item in decode_kv_payload(env["payload"]):
            data = item.event.data
            if isinstance(data, dict) and "stored" in data:
                parent = data["stored"]["parent_hash"]
                for b in data["stored"]["blocks"]:
                    expected = b["tokens_hash"] if parent is None else chain_hash(parent, b["tokens_hash"])
                    assert b["block_hash"] == expected
                    parent = b["block_hash"]
                    checked += 1
    assert checked > 100


def test_overlaps_equal_what_the_frontend_computed() -> None:
    # Replay the events that had arrived before each kv-routed request: the
    # overlap of every worker equals the frontend's (13 and 10 blocks), and
    # the worker it chose reported exactly that many cached blocks.
    events = _events()
    expected = {"P3": {(W1, 0): 13, (W2, 0): 13}, "P4": {(W1, 0): 10, (W2, 0): 10}}
    for r in _requests():
        if r["name"] not in expected:
            continue
        idx = KvIndex()
        for t, env in events:
            if t < r["t"]:
                idx.apply(decode_kv_payload(env["payload"]), env["publisher_id"])
        got = idx.overlaps(block_hashes(tokens_of(r["prompt"]), 16))
        assert got == expected[r["name"]]
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 16 * got[(r["served_by"]["decode_worker_id"], 0)]
    # Removals (the eviction phase) take blocks out.
    idx = KvIndex()
    for _, env in events:
        idx.apply(decode_kv_payload(env["payload"]), env["publisher_id"])
    assert idx.counters["events"] == 13 and idx.counters.get("unknown_removals", 0) == 0
    views = {v.worker_id: v for v in idx.slots()}
    assert all(v.complete for v in views.values()) and views[W1].blocks + views[W2].blocks == idx.entries


# --- the index's rules, on synthetic events ----------------------------------------------------


def item(wid: int, eid: int, data: Any, rank: int = 0, tier: str = "device") -> Any:
    raw = msgspec.msgpack.encode([{"worker_id": wid, "storage_tier": tier, "residency_domain": "worker",
                                   "event": {"event_id": eid, "data": data, "dp_rank": rank}}])
    return decode_kv_payload(raw)


def stored(local: List[int], parent: Any = None, engine_names: bool = False) -> Dict[str, Any]:
    blocks = []
    seq_parent = parent
    for x in local:
        seq = x if seq_parent is None else chain_hash(seq_parent, x)
        bh = (seq ^ 0x5555) if engine_names else seq
        blocks.append({"block_hash": bh, "tokens_hash": x, "mm_extra_info": None})
        seq_parent = seq
    return {"stored": {"parent_hash": parent, "start_position": None, "blocks": blocks}}


@pytest.mark.parametrize("release", ["0.9.1", "1.0.2", "1.1.1", "1.3.1", "1.4.2", "1.6.1"])
def test_kv_events_on_nats_in_every_layout(release: str) -> None:
    """What releases publish on NATS (``DYN_EVENT_PLANE=nats``), captured: 0.9 one JSON event per message
    on a JetStream stream's subject (ids from 0); 1.0-1.3 an envelope holding one event on the component's
    subject (ids from 0 in 1.0, from 1 after); 1.4 on an envelope holding an array on the endpoint's subject."""
    from workermon._sources.kvevents import decode_nats_kv

    path = SAMPLES / f"kv-nats-{release}.jsonl"
    if not path.exists():
        pytest.skip(f"no capture at {path}")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    index = KvIndex()
    first_stored: Dict[int, List[int]] = {}
    events = 0
    for line in lines:
        decoded = decode_nats_kv(line["subject"], bytes.fromhex(line["hex"]), "namespace-dynamo-component-backend")
        assert decoded is not None, line["subject"]
        publisher_id, items = decoded
        assert (publisher_id is None) == (release == "0.9.1")
        index.apply(items, publisher_id)
        for item in items:
            events += 1
            stored = item.event.data.get("stored") if isinstance(item.event.data, dict) else None
            if stored is not None:
                local = [b["tokens_hash"] for b in stored["blocks"]]
                if stored["parent_hash"] is None:
                    first_stored.setdefault(item.worker_id, local)
                    # The mocker names a block by its sequence hash: the chain rule, checked on each layout.
                    assert [b["block_hash"] for b in stored["blocks"]] == sequence_hashes(local)
    counts = index.counters
    assert counts["events"] == events > 0
    for name in ("gaps", "late_starts", "publisher_changes", "unknown_parents", "unplaced_blocks", "malformed",
                 "unknown_tier", "duplicates"):
        assert counts.get(name, 0) == 0, (name, counts)
    assert first_stored and all(v.complete for v in index.slots())
    for worker_id, local in first_stored.items():
        assert index.overlaps(local)[(worker_id, 0)] == len(local)
    # Another component's stream is not this monitor's.
    other = decode_nats_kv("namespace-dynamo-component-prefill-kv-events.kv-events", b"{}",
                           "namespace-dynamo-component-backend-kv-events")
    assert other is None


def test_kv_events_through_a_zmq_broker() -> None:
    """1.6.1 through a broker: the topic frame is the full subject, which the source's pattern takes."""
    from workermon._parse import KV_EVENTS, parse_zmq_frames
    from workermon._sources.zmq import ZmqConfig

    path = SAMPLES / "kv-broker-1.6.1.jsonl"
    if not path.exists():
        pytest.skip(f"no capture at {path}")
    cfg = ZmqConfig(namespace="dynamo", broker=("tcp://127.0.0.1:1",), topic=KV_EVENTS)
    assert cfg.subscription == b"namespace.dynamo.component."
    index = KvIndex()
    for line in path.read_text().splitlines():
        frames = [bytes.fromhex(h) for h in json.loads(line)["frames"]]
        assert cfg.subject_pattern().fullmatch(frames[0]), frames[0]
        assert frames[0].startswith(cfg.subscription)
        publisher_id, _seq, payload = parse_zmq_frames(frames, frames[0])
        index.apply(decode_kv_payload(payload), publisher_id)
    assert index.counters["events"] == 8 and index.counters["stored_blocks"] > 0
    assert all(v.complete for v in index.slots()) and not index.counters.get("gaps")
    assert not ZmqConfig(namespace="dynamo", broker=("tcp://h:1",)).subject_pattern().fullmatch(frames[0])


def test_a_departing_worker_takes_the_blocks_of_every_rank_and_only_its_own() -> None:
    idx = KvIndex()
    idx.apply(item(1, 1, stored([10, 11, 12]), rank=0))
    idx.apply(item(1, 1, stored([10, 11]), rank=1, tier="host_pinned"))
    idx.apply(item(2, 1, stored([10, 11])))  # shares the first two blocks with worker 1
    assert idx.entries == 7 and idx.worker_ids() == {1, 2}
    idx.drop_worker(1)
    assert idx.entries == 2 and idx.worker_ids() == {2} and idx.counters["workers_dropped"] == 1
    assert idx.overlaps([10, 11, 12]) == {(2, 0): 2} and idx.overlaps([10], "host_pinned") == {}
    idx.apply(item(3, 1, stored([10])))  # a freed slot bit is reused without ghosts
    assert idx.overlaps([10, 11]) == {(2, 0): 2, (3, 0): 1}
    idx.drop_worker(1)  # again: nothing to do, nothing counted
    assert idx.counters["workers_dropped"] == 1


def test_gap_late_start_and_new_publisher_mark_a_view_incomplete() -> None:
    idx = KvIndex()
    idx.apply(item(1, 1, stored([10, 11, 12])), publisher_id=7)
    assert idx.slot(1).complete and idx.overlaps([10, 11, 12, 13]) == {(1, 0): 3}
    idx.apply(item(1, 3, stored([20])), publisher_id=7)  # event 2 never arrived
    v = idx.slot(1)
    assert v is not None and not v.complete and "never arrived" in (v.why_incomplete or "")
    assert idx.counters["gaps"] == 1
    idx.apply(item(2, 5, stored([10])), publisher_id=8)  # started late
    assert idx.counters["late_starts"] == 1 and not idx.slot(2).complete  # type: ignore[union-attr]
    idx.apply(item(1, 1, stored([30])), publisher_id=9)  # the worker restarted: new publisher
    assert idx.counters["publisher_changes"] == 1
    assert idx.overlaps([10, 11]) == {(2, 0): 1}  # worker 1's old blocks are gone with its old life
    idx.apply(item(3, 0, stored([50])))  # up to Dynamo 1.0 a life counts its events from 0
    idx.apply(item(3, 1, stored([51])))
    assert idx.slot(3).complete and idx.counters["late_starts"] == 1  # type: ignore[union-attr]
    assert idx.overlaps([30]) == {(1, 0): 1}


def test_unknown_parent_is_not_indexed_and_cleared_restores_exactness() -> None:
    idx = KvIndex()
    idx.apply(item(1, 1, stored([5, 6], parent=0xABCDEF)))
    assert idx.counters["unknown_parents"] == 1 and idx.entries == 0 and not idx.slot(1).complete  # type: ignore
    idx.apply(item(1, 2, stored([5, 6])))
    assert idx.overlaps([5, 6]) == {(1, 0): 2}
    idx.apply(item(1, 3, "cleared"))
    assert idx.entries == 0 and idx.overlaps([5, 6]) == {} and idx.slot(1).complete  # type: ignore[union-attr]


def test_engine_block_names_removal_ranks_and_tiers() -> None:
    idx = KvIndex()
    idx.apply(item(1, 1, stored([1, 2, 3], engine_names=True)))
    seqs = sequence_hashes([1, 2, 3])
    idx.apply(item(1, 2, stored([4], parent=seqs[2] ^ 0x5555, engine_names=True)))  # chained by engine name
    assert idx.overlaps([1, 2, 3, 4]) == {(1, 0): 4}
    idx.apply(item(1, 3, {"removed": {"block_hashes": [seqs[1] ^ 0x5555]}}))
    assert idx.overlaps([1, 2, 3, 4]) == {(1, 0): 1}  # a hole ends the prefix
    idx.apply(item(1, 1, stored([1, 2]), rank=1))
    idx.apply(item(1, 4, stored([1]), tier="host_pinned"))  # rank 1 counts its own events; tiers share
    assert idx.overlaps([1, 2]) == {(1, 0): 1, (1, 1): 2}
    assert idx.overlaps([1, 2], tier="host_pinned") == {(1, 0): 1}
    idx.drop_worker(1)
    assert idx.entries == 0 and idx.slots() == []


def test_bound_drops_new_blocks_counts_them_and_frees_on_removal() -> None:
    idx = KvIndex(max_blocks=3)
    idx.apply(item(1, 1, stored([1, 2, 3, 4, 5])))
    assert idx.entries == 3 and idx.counters["dropped_blocks"] == 1
    v = idx.slot(1)
    assert v is not None and not v.complete and "full" in (v.why_incomplete or "")
    idx.apply(item(1, 2, {"removed": {"block_hashes": [sequence_hashes([1, 2, 3])[2]]}}))
    idx.apply(item(2, 1, stored([9])))
    assert idx.entries == 3 and idx.overlaps([9]) == {(2, 0): 1}


def test_malformed_events_are_counted_and_dropped() -> None:
    idx = KvIndex()
    idx.apply(item(1, 1, {"stored": {"blocks": "nope"}}))
    idx.apply(item(1, 2, stored([1]), tier="tape"))
    idx.apply(item(1, 3, stored([1])))
    assert idx.counters["malformed"] == 1 and idx.counters["unknown_tier"] == 1
    assert idx.overlaps([1]) == {(1, 0): 1}
    with pytest.raises(msgspec.DecodeError):
        decode_kv_payload(b"\xc1")


# --- picking by the KV router's cost (pure: a fleet state, a picker, an index) -------------------


def _kv_fleet(*totals: int) -> Any:
    from workermon._kvroute import KvRouting
    from workermon._model import Card, CardPut, Thresholds
    from workermon._picker import Picker
    from workermon._reduce import FleetState, apply_all
    from workermon.options import KvOptions

    s = FleetState(Thresholds(busy_threshold=0.9))
    apply_all(s, [CardPut(f"v1/mdc/ns/c/e/{i:x}", i, Card(total_kv_blocks=t, display_name="m", kv_cache_block_size=4))
                  for i, t in enumerate(totals, start=1)], 0.0)
    picker = Picker(s, lambda: tuple(sorted(s.members - s.busy)), lambda: 0.0)
    return s, picker, KvRouting(KvOptions(), s, picker, lambda: frozenset(s.members))


def _pick(kv: Any, picker: Any, tokens: List[int]) -> Any:
    import math

    local = block_hashes(tokens, 4)
    choose = kv.chooser(local, len(tokens), 4, (), "m", None)
    return picker.pick(book=True, blocks=math.ceil(len(tokens) / 4), choose_fn=choose)


def test_kv_cost_prefers_the_cached_prefix_until_load_outweighs_it() -> None:
    from workermon._model import LoadReport
    from workermon._reduce import apply_all

    s, picker, kv = _kv_fleet(1000, 1000)
    prompt = list(range(40))  # 10 blocks of 4
    kv.index.apply(item(1, 1, stored(block_hashes(prompt, 4)[:8])))  # worker 1 holds 8 of them
    assert kv.prefix_overlap(block_hashes(prompt, 4), "m") == {(1, 0): 8, (2, 0): 0}
    chosen = _pick(kv, picker, prompt)
    assert chosen is not None and chosen.worker_id == 1 and "holds 8" in chosen.reason()
    # cost(1) = (10 - 8) + 0 + 10 booked + 10 = 22 ; cost(2) = 10 + 0 + 10 = 20: the booking tips it.
    second = _pick(kv, picker, prompt)
    assert second is not None and second[0] == 2
    assert kv.last_pick.costs == {(1, 0): (8, 22.0), (2, 0): (0, 20.0)}
    # A report replaces the bookings: worker 1 reports 100 blocks in use, worker 2 none.
    apply_all(s, [LoadReport(1, 0, 100), LoadReport(2, 0, 0)], 1.0)
    third = _pick(kv, picker, prompt)
    assert third is not None and third[0] == 2
    # Busy workers are never candidates, whatever their overlap.
    apply_all(s, [LoadReport(2, 0, 950)], 2.0)
    assert s.busy == {2}
    fourth = _pick(kv, picker, prompt)
    assert fourth is not None and fourth[0] == 1
    lines = kv.describe(1, [0])
    assert "8 cached block(s)" in lines[0] and "last kv pick" in lines[0]


def test_kv_prefix_affinity_never_overfills_a_small_worker_while_a_roomy_one_can_serve() -> None:
    s, picker, kv = _kv_fleet(100, 1000)  # worker 1 small, worker 2 large
    prompt = list(range(160))  # 40 blocks of 4
    kv.index.apply(item(1, 1, stored(block_hashes(prompt, 4))))  # the small worker holds all 40
    first = _pick(kv, picker, prompt)
    assert first is not None and first[0] == 1  # 0 + 40 ≤ 90: room, and the cheapest
    chosen = []
    for _ in range(6):
        r = _pick(kv, picker, prompt)
        assert r is not None
        chosen.append(r[0])
        assert picker.live_blocks(1, 0) <= 90, kv.last_pick.costs  # never past the small worker's room
    assert chosen.count(2) >= 5
    kv.index.apply(item(2, 1, stored([999])))
    picker.overflow = "refuse"
    while True:  # fill the large worker too: with overflow="refuse" the KV mode then refuses
        r = _pick(kv, picker, prompt)
        if r is None:
            break
    assert picker.counters["rejected"] == 1


def test_prompts_are_tokenized_by_the_cards_tokenizer_or_a_clear_error(tmp_path: Path) -> None:
    import attrs

    from workermon import TokenizerUnavailable

    from .dynamo.model import write_tiny_model

    s, picker, kv = _kv_fleet(1000)
    w = s.workers[1]
    model_dir = write_tiny_model(tmp_path / "m")
    missing = ("/nowhere/tokenizer.json", "blake3:00")
    w.card = attrs.evolve(w.card, tokenizer_file=missing)
    with pytest.raises(TokenizerUnavailable, match="/nowhere/tokenizer.json.*tokenizer="):
        kv.tokens(None, "hello", "m")
    ids, _ = kv.tokens(None, "hello", "m", tokenizer=str(model_dir))  # the files, copied here
    assert ids == list(b"hello")  # the tiny model's byte tokens
    w.card = attrs.evolve(w.card, tokenizer_file=(str(model_dir / "tokenizer.json"), "blake3:11"),
                          tokenizer_config_file=(str(model_dir / "tokenizer_config.json"), "blake3:22"))
    chat, _ = kv.tokens(None, [{"role": "user", "content": "hi"}], "m")
    assert bytes(chat) == b"user: hi\nassistant:"  # rendered with the card's chat template
    with pytest.raises(TypeError):
        kv.tokens([1, 2], "both", "m")
    with pytest.raises(LookupError):
        kv.tokens([1, 2], None, "another-model")
