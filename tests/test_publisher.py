"""WorkerPublisher writes what real Dynamo writes, checked against the captured samples."""

from __future__ import annotations

import json
import queue
from typing import Any, Dict

import attrs
import pytest


from workermon._model import Card
from workermon._parse import parse_card, parse_load
from workermon import WorkerPublisher
from workermon._servers import EtcdServer, NatsServer

from .conftest import Changes
from .helpers import Make, RawNatsSubscriber, read_samples, sample_bytes



def shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys recursively, and type names at leaves."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def sample_card(version: str) -> Dict[str, Any]:
    entry = next(e for e in read_samples("etcd", version) if e["key"].startswith("v1/mdc/"))
    return dict(entry)


def sample_load(version: str) -> Dict[str, Any]:
    m = next(m for m in read_samples("nats", version) if m["subject"].endswith(".kv_metrics"))
    return dict(json.loads(sample_bytes(m)))


@pytest.fixture
def pub_factory(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str):  # type: ignore[no-untyped-def]
    made = []

    def make(**kw: Any) -> WorkerPublisher:
        kw.setdefault("namespace", namespace)
        pub = WorkerPublisher([etcd_server.url], [nats_server.url], **kw)
        made.append(pub)
        return pub.start()

    yield make
    for pub in made:
        pub.stop()


@pytest.mark.parametrize("card_format, version", [("wrapped", "0.7.1"), ("toplevel", "0.6.1")])
def test_card_matches_real_dynamo(pub_factory, etcd: Any, card_format: str, version: str) -> None:  # type: ignore[no-untyped-def]
    pub = pub_factory(card_format=card_format, total_kv_blocks=1024)
    value, meta = etcd.get(pub.key)
    assert meta.lease_id == pub.worker_id and pub.worker_id > 0
    assert pub.key.rsplit("/", 1)[-1] == f"{pub.worker_id:x}"
    ours = parse_card(pub.key, value, meta.lease_id)
    real = sample_card(version)
    theirs = parse_card(real["key"], real["value"].encode(), real["lease_dec"])
    # Same capacity, dp size/start, batched tokens (the served model's name is ours).
    def capacity(card: Card) -> Card:
        # (file paths are the host's: compared by the config's checksums instead)
        return attrs.evolve(card, display_name=None, worker_set=(), config=(), tokenizer_file=None,
                            tokenizer_config_file=None)

    assert capacity(ours.card) == capacity(theirs.card)
    # The fields card admission compares are all there (the namespace and the model are ours).
    assert [name for name, _ in ours.card.config] == [name for name, _ in theirs.card.config]
    assert ours.card.worker_set[2:] == theirs.card.worker_set[2:]
    assert ours.worker_id == pub.worker_id
    ours_doc, real_doc = json.loads(value), json.loads(real["value"])
    if card_format == "wrapped":
        assert set(ours_doc) == set(real_doc)
        assert {k: ours_doc[k] for k in ("type", "component", "endpoint")} == {
            k: real_doc[k] for k in ("type", "component", "endpoint")}
        assert ours_doc["instance_id"] == pub.worker_id
        ours_doc, real_doc = ours_doc["card_json"], real_doc["card_json"]
    assert shape(ours_doc["runtime_config"]) == shape(real_doc["runtime_config"])
    for field in ("display_name", "slug", "kv_cache_block_size", "context_length", "model_type", "model_input"):
        assert field in ours_doc and shape(ours_doc[field]) == shape(real_doc[field])


@pytest.mark.parametrize("load_format, version", [("load_event", "0.6.1"), ("active_load", "0.8.1")])
def test_load_messages_match_real_dynamo(pub_factory, nats_server: NatsServer, namespace: str,  # type: ignore[no-untyped-def]
                                         load_format: str, version: str) -> None:
    sub = RawNatsSubscriber(nats_server.url, f"namespace.{namespace}.kv_metrics")
    try:
        pub = pub_factory(load_format=load_format)
        pub.report(512, active_prefill_tokens=None)
        pub.flush()
        subject, payload = sub.next()
    finally:
        sub.close()
    assert subject == f"namespace.{namespace}.kv_metrics"
    ours, real = json.loads(payload), sample_load(version)
    assert shape(ours) == shape(real)
    report, real_report = parse_load(payload), parse_load(json.dumps(real).encode())
    used_or_decode = report.kv_active_blocks if report.kv_active_blocks is not None else report.active_decode_blocks
    assert report.worker_id == pub.worker_id and used_or_decode == 512 and report.dp_rank == 0
    assert (report.active_prefill_tokens, real_report.active_prefill_tokens) == (None, None)


def test_monitor_follows_publisher_and_stop_revokes(make_monitor: Make, pub_factory, changes: Changes) -> None:  # type: ignore[no-untyped-def]
    pubs = [pub_factory(total_kv_blocks=100) for _ in range(3)]
    mon = make_monitor()
    mon.on_busy_change(changes)
    mon.start()
    assert mon.wait_ready(10)
    assert mon.members() == {p.worker_id for p in pubs}
    pubs[0].report(95)
    assert changes.get().became_busy == {pubs[0].worker_id}
    pubs[0].stop()        # revokes: the card goes at once, not after the TTL
    c = changes.get()
    assert c.removed == {pubs[0].worker_id}
    assert mon.members() == {p.worker_id for p in pubs[1:]}


def test_lost_lease_reregisters(make_monitor: Make, pub_factory, etcd: Any) -> None:  # type: ignore[no-untyped-def]
    seen: "queue.Queue[tuple[int, int]]" = queue.Queue()
    pub = pub_factory(lease_ttl=1, on_reregister=lambda old, new: seen.put((old, new)))
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    old = pub.worker_id
    assert mon.members() == {old}
    etcd.revoke_lease(old)        # as if etcd lost it: the keep-alive sees TTL 0
    assert mon.wait_for(lambda: len(mon.members()) == 1 and old not in mon.members(), 10)
    assert pub.worker_id != old and mon.members() == {pub.worker_id}
    # The callback runs right after the new card is written.
    assert seen.get(timeout=10) == (old, pub.worker_id) and pub.reregistrations == 1
    pub.report(1000)
    assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)


def test_publisher_argument_errors() -> None:
    with pytest.raises(ValueError):
        WorkerPublisher(["http://127.0.0.1:1"], ["nats://127.0.0.1:2"], card_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WorkerPublisher(["http://127.0.0.1:1"], ["nats://127.0.0.1:2"], load_format="csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WorkerPublisher(["ftp://x"], ["nats://127.0.0.1:2"])
    pub = WorkerPublisher(["http://127.0.0.1:1"], ["nats://127.0.0.1:2"])
    with pytest.raises(RuntimeError):
        pub.report(1)
