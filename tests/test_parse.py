"""Golden tests of the parser on real Dynamo traffic, and its rejections."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import attrs
import msgspec
import pytest

from workermon._model import Card, LoadReport
from workermon._parse import Malformed, parse_card, parse_load, worker_id_from_key

from .helpers import SAMPLES, read_samples, sample_bytes

CARD_VERSIONS = ["0.6.1", "0.7.1", "0.8.1", "0.9.1", "1.0.2", "1.6.1"]
JSON_LOAD_VERSIONS = ["0.5.1", "0.6.1", "0.7.1", "0.8.1"]
MSGPACK_LOAD_VERSIONS = ["0.9.1", "1.0.2", "1.6.1"]



def test_samples_are_present() -> None:
    assert (SAMPLES / "README.md").is_file(), f"Dynamo samples missing at {SAMPLES}"


def _expected_kv(payload: Dict[str, Any]) -> Optional[int]:
    """The worker's own count, read with the json module, not the parser."""
    if payload.get("kv_used_blocks") is not None:
        return int(payload["kv_used_blocks"])
    data = payload.get("data")
    if data is not None:
        return int(data["kv_stats"]["kv_active_blocks"])
    return None


@pytest.mark.parametrize("version", CARD_VERSIONS)
def test_real_cards_parse(version: str) -> None:
    cards = [e for e in read_samples("etcd", version) if e["key"].startswith("v1/mdc/")]
    assert cards, "the sample holds no cards"
    for entry in cards:
        put = parse_card(entry["key"].encode(), entry["value"].encode(), entry["lease_dec"])
        assert put.worker_id == entry["lease_dec"]
        assert put.worker_id == int(entry["lease_hex"], 16)
        # The key ends in the lease in hex: the fallback agrees with the lease.
        assert worker_id_from_key(entry["key"], 0) == entry["lease_dec"]
        doc = json.loads(entry["value"])
        body = doc.get("card_json", doc)
        rc = body["runtime_config"]
        def file_ref(value: Any, kind: str) -> Any:
            ref = (value or {}).get(kind)
            return (ref["path"], ref.get("checksum") or "") if ref else None

        assert attrs.evolve(put.card, worker_set=(), config=()) == Card(
            total_kv_blocks=rc["total_kv_blocks"],
            data_parallel_size=rc.get("data_parallel_size", 1),
            data_parallel_start_rank=rc.get("data_parallel_start_rank", 0),
            max_num_batched_tokens=rc["max_num_batched_tokens"],
            display_name=body["display_name"],
            worker_type=body.get("worker_type"),
            kv_cache_block_size=body.get("kv_cache_block_size"),
            tokenizer_file=file_ref(body.get("tokenizer"), "hf_tokenizer_json"),
            tokenizer_config_file=file_ref(body.get("prompt_formatter"), "hf_tokenizer_config_json"),
        )
        assert put.card.kv_cache_block_size == 16 and put.card.tokenizer_file is not None
        assert put.card.total_kv_blocks == 1024
        # Card admission: the worker set from the card (or its key), the
        # checksummed fields with file artifacts by checksum, never by path.
        ns, component, endpoint = entry["key"].split("/")[2:5]
        assert put.card.worker_set == (body["display_name"], ns, component, endpoint, body.get("model_type", ""),
                                       body.get("model_input", ""), body.get("worker_type") or "")
        config = dict(put.card.config)
        assert json.loads(config["kv_cache_block_size"]) == body["kv_cache_block_size"] == 16
        tokenizer = json.loads(config["tokenizer"])
        assert tokenizer == {"hf_tokenizer_json": {"checksum": body["tokenizer"]["hf_tokenizer_json"]["checksum"]}}
        assert "path" not in config["model_info"] and "blake3:" in config["model_info"]
        assert "runtime_config" not in config


def test_older_models_prefix_card_parses() -> None:
    # Dynamo 0.5.1 kept cards under models/<uuid> with a lease.
    entries = [e for e in read_samples("etcd", "0.5.1") if e["key"].startswith("models/")]
    assert entries
    for entry in entries:
        put = parse_card(entry["key"], entry["value"].encode(), entry["lease_dec"])
        assert put.worker_id == entry["lease_dec"] and put.card.total_kv_blocks == 1024


@pytest.mark.parametrize("version", JSON_LOAD_VERSIONS)
def test_real_json_load_reports_parse(version: str) -> None:
    msgs = [m for m in read_samples("nats", version) if m["subject"].endswith(".kv_metrics")]
    assert msgs
    for m in msgs:
        payload = json.loads(m["data"])
        report = parse_load(sample_bytes(m))
        assert report.worker_id == payload["worker_id"]
        assert report.kv_active_blocks == _expected_kv(payload)
        assert report.active_decode_blocks == payload.get("active_decode_blocks")
        assert report.dp_rank == 0


@pytest.mark.parametrize("version", MSGPACK_LOAD_VERSIONS)
def test_real_msgpack_envelopes_parse(version: str) -> None:
    raw = [m for m in read_samples("nats", version) if m["subject"].endswith(".kv_metrics")]
    decoded = [m for m in read_samples("nats", f"{version}.decoded") if m["subject"].endswith(".kv_metrics")]
    assert raw and len(raw) == len(decoded)
    for m, d in zip(raw, decoded):
        payload = d["decoded"]["payload"]
        report = parse_load(sample_bytes(m))
        assert report.worker_id == payload["worker_id"]
        assert report.kv_active_blocks == _expected_kv(payload)
        assert report.active_decode_blocks == payload.get("active_decode_blocks")
        assert report.active_prefill_tokens == payload["active_prefill_tokens"]
        assert report.dp_rank == payload["dp_rank"]


def test_known_sample_values() -> None:
    # Literal values read off the capture files by hand.
    first_081 = [m for m in read_samples("nats", "0.8.1") if m["subject"] == "namespace.dynamo.kv_metrics"][0]
    assert parse_load(sample_bytes(first_081)) == LoadReport(7668682509542194228, 0, None, None, None, 1)
    second_161 = [m for m in read_samples("nats", "1.6.1") if m["subject"].endswith(".kv_metrics")][1]
    assert parse_load(sample_bytes(second_161)) == LoadReport(7668682509961986573, 0, 339, None, None)


def test_other_subjects_in_samples_are_rejected_not_misread() -> None:
    # kv-events on other subjects must never be taken for load reports.
    for version in ("0.8.1",):
        for m in read_samples("nats", version):
            if "kv-events" in m["subject"]:
                with pytest.raises(Malformed):
                    report = parse_load(sample_bytes(m))
                    # A kv-event has worker_id but no load fields at all.
                    assert report.kv_active_blocks is None
                    raise Malformed("no_load")


# --- load report shapes and rejections ---------------------------------------------


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"worker_id": 5, "dp_rank": 2, "active_decode_blocks": 7}, LoadReport(5, 2, None, None, None, 7)),
        ({"worker_id": 5, "active_decode_blocks": 7, "kv_used_blocks": 9}, LoadReport(5, 0, 9, None, None, 7)),
        ({"worker_id": 5, "dp_rank": None, "active_prefill_tokens": 120}, LoadReport(5, 0, None, 120)),
        ({"worker_id": 5, "load_report_revision": 42, "kv_used_blocks": 1}, LoadReport(5, 0, 1, None, 42)),
        ({"worker_id": -1, "kv_used_blocks": 1}, LoadReport(2**64 - 1, 0, 1)),
        ({"worker_id": 2**64 - 1, "kv_used_blocks": 1}, LoadReport(2**64 - 1, 0, 1)),
        ({"worker_id": -(2**63), "kv_used_blocks": 1}, LoadReport(2**63, 0, 1)),
        ({"worker_id": 5, "data": {"worker_stats": {"data_parallel_rank": 3},
                                   "kv_stats": {"kv_active_blocks": 950}}}, LoadReport(5, 3, 950)),
        ({"worker_id": 5, "data": {"worker_stats": {"data_parallel_rank": None},
                                   "kv_stats": {"kv_active_blocks": 0}}}, LoadReport(5, 0, 0)),
        ({"worker_id": 5, "unknown": {"deep": [1, 2, {"x": None}]}, "kv_used_blocks": 3}, LoadReport(5, 0, 3)),
        ({"worker_id": 5}, LoadReport(5, 0)),
    ],
)
def test_load_shapes(payload: Dict[str, Any], expected: LoadReport) -> None:
    assert parse_load(json.dumps(payload).encode()) == expected


def test_msgpack_envelope_with_json_payload_and_plain() -> None:
    inner = msgspec.msgpack.encode({"worker_id": 9, "dp_rank": 1, "kv_used_blocks": 4})
    env = msgspec.msgpack.encode({"publisher_id": 1, "sequence": 0, "published_at": 0, "topic": "kv_metrics",
                                  "payload": inner})
    assert parse_load(env) == LoadReport(9, 1, 4)
    env_json = msgspec.msgpack.encode({"payload": b'{"worker_id": 9, "active_decode_blocks": 2}'})
    assert parse_load(env_json) == LoadReport(9, 0, None, None, None, 2)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty"),
        (b"{not json", "bad_encoding"),
        (b"\xff\xfe\x00", "bad_encoding"),
        (b'{"worker_id": 1, "x": "\xff"}', "bad_encoding"),
        (b"[1, 2]", "bad_field"),
        (b'"str"', "bad_field"),
        (b'{"worker_id": true, "kv_used_blocks": 1}', "bad_field"),
        (b'{"worker_id": 5.0, "kv_used_blocks": 1}', "bad_field"),
        (b'{"worker_id": "5", "kv_used_blocks": 1}', "bad_field"),
        (b'{"worker_id": null}', "bad_field"),
        (b'{"kv_used_blocks": 1}', "bad_field"),
        (b'{"worker_id": 18446744073709551616}', "bad_field"),
        (b'{"worker_id": -9223372036854775809}', "bad_field"),
        (b'{"worker_id": 1, "kv_used_blocks": -1}', "bad_field"),
        (b'{"worker_id": 1, "active_decode_blocks": 1.5}', "bad_field"),
        (b'{"worker_id": 1, "active_prefill_tokens": "7"}', "bad_field"),
        (b'{"worker_id": 1, "dp_rank": -1}', "bad_field"),
        (b'{"worker_id": 1, "dp_rank": true}', "bad_field"),
        (b'{"worker_id": 1, "load_report_revision": false}', "bad_field"),
        (b'{"worker_id": 1, "data": {"kv_stats": {"kv_active_blocks": "9"}}}', "bad_field"),
        (b'{"worker_id": 1, "data": {"kv_stats": []}}', "bad_field"),
        (b'{"worker_id": 1, "data": 3}', "bad_field"),
        (b'{"worker_id": 1} trailing', "bad_encoding"),
        (b"\x85\xa7payload\xc4\x03abc", "bad_encoding"),
        (b"\x81\xa7payload\xc4\x00", "bad_envelope"),
        (b"\x81\xa7payload\x05", "bad_field"),
        (b" " + b"[" * 50_000, "bad_field"),
        (b'{"worker_id": 1, "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "bad_encoding"),
    ],
)
def test_load_rejections(raw: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_load(raw)
    assert info.value.reason == reason


def test_oversized_load_is_rejected_before_decoding() -> None:
    raw = json.dumps({"worker_id": 1, "kv_used_blocks": 1, "pad": "x" * 70_000}).encode()
    with pytest.raises(Malformed) as info:
        parse_load(raw)
    assert info.value.reason == "oversized"
    assert parse_load(raw, max_bytes=len(raw)) == LoadReport(1, 0, 1)


# --- cards -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, card",
    [
        (b'{"runtime_config": {"total_kv_blocks": 10}}', Card(10)),
        (b'{"card_json": {"runtime_config": {"total_kv_blocks": 10, "data_parallel_size": 4,'
         b' "data_parallel_start_rank": 8, "max_num_batched_tokens": 8192}}}', Card(10, 4, 8, 8192)),
        (b'{"display_name": "x"}', Card(display_name="x")),
        (b'{"runtime_config": null}', Card()),
        (b'{"runtime_config": {"total_kv_blocks": null}}', Card()),
        (b'{"card_json": {"display_name": "x", "worker_type": "prefill"}}',
         Card(display_name="x", worker_type="prefill")),
        (b'{"type": "Model", "card_json": {"runtime_config": {"total_kv_blocks": 0}}}', Card(0)),
    ],
)
def test_card_shapes(value: bytes, card: Card) -> None:
    put = parse_card("v1/mdc/ns/c/e/a", value, lease=0xA)
    assert attrs.evolve(put.card, worker_set=(), config=()) == card and put.worker_id == 0xA
    # The worker set comes from the key when the card does not name its endpoint.
    assert put.card.worker_set[1:4] == ("ns", "c", "e")


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"not json", "bad_encoding"),
        (b"\xff", "bad_encoding"),
        (b"[]", "bad_field"),
        (b'{"runtime_config": {"total_kv_blocks": "1000"}}', "bad_field"),
        (b'{"runtime_config": {"total_kv_blocks": -1}}', "bad_field"),
        (b'{"runtime_config": {"total_kv_blocks": 1.0}}', "bad_field"),
        (b'{"runtime_config": {"total_kv_blocks": true}}', "bad_field"),
        (b'{"runtime_config": {"data_parallel_size": 0}}', "bad_field"),
        (b'{"runtime_config": []}', "bad_field"),
        (b'{"card_json": "x"}', "bad_field"),
    ],
)
def test_card_rejections(value: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_card("v1/mdc/ns/c/e/a", value, lease=5)
    assert info.value.reason == reason


def test_card_size_limit_and_key_fallbacks() -> None:
    big = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    with pytest.raises(Malformed) as info:
        parse_card("v1/mdc/ns/c/e/a", big, lease=5)
    assert info.value.reason == "oversized"
    assert worker_id_from_key("v1/mdc/ns/c/e/694d967ca5efd804", 0) == 0x694D967CA5EFD804
    assert worker_id_from_key("v1/mdc/ns/c/e/whatever", 77) == 77
    for key in ("v1/mdc/ns/c/e/not-hex", "v1/mdc/ns/c/e/", "v1/mdc/ns/c/e/-5", "v1/mdc/ns/c/e/1_0",
                "v1/mdc/ns/c/e/1" + "0" * 16):
        with pytest.raises(Malformed):
            worker_id_from_key(key, 0)
    with pytest.raises(Malformed):
        parse_card(b"v1/mdc/\xff/a", b"{}", lease=5)


# --- Dynamo 1.6.1 captures: data-parallel cards and reports, KV-router mode ------------------


def _jsonl(name: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


def test_real_dp2_cards_declare_two_ranks() -> None:
    dump = json.loads((SAMPLES / "1.6.1-dp2-etcd.json").read_text())
    cards = [e for e in dump["keys"] if e["key"].startswith("v1/mdc/")]
    assert len(cards) == 2
    for e in cards:
        put = parse_card(e["key"], json.dumps(e["value"]).encode(), e["lease_dec"])
        assert put.worker_id == e["lease_dec"]
        assert (put.card.data_parallel_start_rank, put.card.data_parallel_size) == (0, 2)
        assert put.card.total_kv_blocks == 256 and put.card.worker_type == e["value"]["card_json"]["worker_type"]


def test_real_dp2_reports_and_the_frontend_rule() -> None:
    from workermon._reduce import FleetState, apply_all
    from workermon._model import Thresholds

    dump = json.loads((SAMPLES / "1.6.1-dp2-etcd.json").read_text())
    puts = [parse_card(e["key"], json.dumps(e["value"]).encode(), e["lease_dec"])
            for e in dump["keys"] if e["key"].startswith("v1/mdc/")]
    reports = []
    for m in _jsonl("1.6.1-dp2-kv_metrics.jsonl"):
        env = dict(m["decoded"])
        env["payload"] = msgspec.msgpack.encode(env["payload"])
        r = parse_load(msgspec.msgpack.encode(env))
        assert r.worker_id == m["decoded"]["payload"]["worker_id"]
        assert r.dp_rank == m["decoded"]["payload"]["dp_rank"]
        assert r.kv_active_blocks == m["decoded"]["payload"]["kv_used_blocks"]
        reports.append(r)
    assert {r.dp_rank for r in reports} == {0, 1}
    # The 1.6.1 frontend probed live (threshold 0.5 of 256; samples 1.6.1-direct-probe-*): rank 1 at 200 with rank 0 never
    # reported → free; both at 200 → busy; rank 0 at 10, rank 1 at 200 → free.
    wid = puts[0].worker_id
    s = FleetState(Thresholds(busy_threshold=0.5))
    apply_all(s, puts + [LoadReport(wid, 1, 200)], 0.0)
    assert not s.is_busy(wid)
    apply_all(s, [LoadReport(wid, 0, 200)], 0.0)
    assert s.is_busy(wid)
    apply_all(s, [LoadReport(wid, 0, 10)], 0.0)
    assert not s.is_busy(wid)


def test_real_kv_router_mode_reports_parse() -> None:
    msgs = _jsonl("1.6.1-kvmode-nats-kv_metrics.jsonl")
    assert msgs
    for m in msgs:
        if "hex" in m:
            raw = bytes.fromhex(m["hex"])
        else:  # (some lines keep only the decoded form)
            env = dict(m["decoded"])
            env["payload"] = msgspec.msgpack.encode(env["payload"])
            raw = msgspec.msgpack.encode(env)
        r = parse_load(raw)
        p = m["decoded"]["payload"]
        assert (r.worker_id, r.dp_rank, r.kv_active_blocks, r.active_decode_blocks) == (
            p["worker_id"], p["dp_rank"], p["kv_used_blocks"], p["active_decode_blocks"])
