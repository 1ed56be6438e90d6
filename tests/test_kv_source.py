"""The kv-events source against real etcd and a real ZMQ publisher on loopback.

A worker (card and kv_metrics channel under its lease, from ``WorkerPublisher``)
also registers a ``kv-events`` channel under the same lease, as a 1.6.1 worker
with prefix caching does, and publishes Dynamo's 4-frame messages from a pyzmq
PUB socket.  The monitor follows it into its KV index; an oversized message is
read past and counted (its loss then shows as a gap), bad payloads are counted,
and the worker's blocks leave with its lease.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator, List

import msgspec
import pytest
import zmq

from workermon import KvOptions, WorkerMonitor, WorkerPublisher, block_hashes
from workermon._kvhash import sequence_hashes
from workermon._parse import channel_prefix
from workermon._servers import EtcdServer

from .helpers import etcd_client


@pytest.fixture(autouse=True)
def no_plane_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DYN_EVENT_PLANE", "NATS_SERVER", "DYN_ZMQ_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)


class KvPublisher:
    """A worker's kv-events PUB socket and its channel key in etcd (under the worker's lease)."""

    def __init__(self, etcd_url: str, worker: WorkerPublisher, publisher_id: int = 0x51A7E) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.worker = worker
        self.publisher_id = publisher_id
        self.sequence = 0
        self.key = (f"{channel_prefix(worker.namespace, worker.component, worker.endpoint)}"
                    f"topic/kv-events/{publisher_id:x}").replace("topic/kv_metrics/", "")
        value = {"type": "EventChannel", "topic": "kv-events", "instance_id": publisher_id,
                 "transport": {"kind": "Zmq", "config": {"endpoint": f"tcp://127.0.0.1:{port}"}}}
        self.client = etcd_client(etcd_url)
        self.client.put(self.key, json.dumps(value), lease=worker.worker_id)

    def frames(self, events: List[Any]) -> List[bytes]:
        payload = msgspec.msgpack.encode([{"worker_id": self.worker.worker_id, "storage_tier": "device",
                                           "residency_domain": "worker", "event": e} for e in events])
        env = msgspec.msgpack.encode({"publisher_id": self.publisher_id, "sequence": self.sequence,
                                      "published_at": int(time.time() * 1000), "topic": "kv-events",
                                      "payload": payload})
        out = [b"kv-events", self.publisher_id.to_bytes(8, "big"), self.sequence.to_bytes(8, "big"),
               b"\x01" + len(env).to_bytes(4, "big") + env]
        self.sequence += 1
        return out

    def send(self, events: List[Any]) -> None:
        self.sock.send_multipart(self.frames(events))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.client.close()


def stored(event_id: int, local: List[int]) -> Any:
    seqs = sequence_hashes(local)
    return {"event_id": event_id, "dp_rank": 0, "data": {"stored": {
        "parent_hash": None, "start_position": None,
        "blocks": [{"block_hash": s, "tokens_hash": x, "mm_extra_info": None} for s, x in zip(seqs, local)]}}}


@pytest.fixture
def fleet(etcd_server: EtcdServer, zworkers: Callable[..., WorkerPublisher]) -> Iterator[Callable[[], Any]]:
    made: List[KvPublisher] = []

    def make() -> Any:
        worker = zworkers()
        kv = KvPublisher(etcd_server.url, worker)
        made.append(kv)
        return worker, kv

    yield make
    for kv in made:
        kv.close()


def test_kv_events_fill_the_index_bounded_and_leave_with_the_lease(etcd_server: EtcdServer, namespace: str,
                                                                    fleet: Any) -> None:
    worker, kv = fleet()
    mon = WorkerMonitor([etcd_server.url], namespace=namespace, kv_index=KvOptions(max_message_bytes=4096))
    mon.start()
    try:
        assert mon.wait_ready(10) and mon.wait_for(lambda: worker.worker_id in mon.members(), 10)
        prompt = list(range(64))
        local = block_hashes(prompt, 16)
        # ZMQ has no replay: send the first event until the subscription is through (repeats are
        # dropped as duplicates by the index).
        for _ in range(200):
            kv.send([stored(1, local)])
            if mon.wait_for(lambda: mon.prefix_overlap(prompt).get((worker.worker_id, 0)) == 4, 0.05):
                break
        assert mon.prefix_overlap(prompt) == {(worker.worker_id, 0): 4}
        view = mon._kv_routing().index.slot(worker.worker_id)
        assert view is not None and view.complete
        # Event 2 is oversized (> max_message_bytes): read past, counted; its loss is a gap.
        kv.send([stored(2, list(range(1000, 1400)))])
        other = block_hashes(list(range(500, 532)), 16)
        kv.send([stored(3, other)])
        assert mon.wait_for(lambda: mon.prefix_overlap(list(range(500, 532)))[(worker.worker_id, 0)] == 2, 10)
        health = mon.health().kv
        assert health is not None
        assert health.counters.get("malformed_oversized") == 1, health
        assert health.counters.get("index_gaps") == 1
        assert "never arrived" in str(mon.why(worker.worker_id))
        # A payload that is not a batch of events is counted and dropped; the thread lives on.
        kv.sock.send_multipart(kv.frames([])[:3] + [b"\x01\x00\x00\x00\x03abc"])
        kv.send([{"event_id": 4, "dp_rank": 0, "data": "cleared"}])
        assert mon.wait_for(lambda: mon.prefix_overlap(prompt)[(worker.worker_id, 0)] == 0, 10)
        assert mon._kv_routing().index.slot(worker.worker_id).complete  # type: ignore[union-attr]
        assert mon.health().kv.counters.get("malformed", 0) >= 1  # type: ignore[union-attr]
        kv.send([stored(5, local)])
        assert mon.wait_for(lambda: mon.prefix_overlap(prompt)[(worker.worker_id, 0)] == 4, 10)
        # The worker leaves (its lease is revoked): its blocks go with its kv-events channel.
        worker.stop()
        assert mon.wait_for(lambda: mon._kv_routing().index.slot(worker.worker_id) is None, 10)
        assert mon.health().kv.counters["index_entries"] == 0  # type: ignore[union-attr]
        assert all(t.is_alive() for t in mon._threads)
    finally:
        assert mon.stop(10)


def _envelope(publisher_id: int, sequence: int, payload: Any) -> bytes:
    return _envelope_raw(publisher_id, sequence, "kv-events", msgspec.msgpack.encode(payload))


def _item(worker_id: int, event: Any) -> Any:
    return {"worker_id": worker_id, "storage_tier": "device", "event": event}


def test_kv_events_on_the_nats_plane_in_every_layout(etcd_server: EtcdServer, nats_server: Any,
                                                     namespace: str) -> None:
    """Three workers publish as 1.6 (endpoint subject, array), 1.3 (component subject, one event) and 0.9
    (a JetStream stream's subject, JSON, ids from 0) do; the monitor follows each, bounds messages,
    counts bad ones, ignores a stranger's events and lets a departed worker's blocks go."""
    from .helpers import RawNatsPublisher

    workers = [WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=1000,
                               event_plane="nats").start() for _ in range(3)]
    new, mid, old = workers
    mon = WorkerMonitor([etcd_server.url], [nats_server.url], namespace=namespace, event_plane="nats",
                        kv_index=KvOptions(max_message_bytes=4096))
    mon.start()
    pub = RawNatsPublisher(nats_server.url)
    try:
        assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {w.worker_id for w in workers}, 10)
        assert mon.wait_for(lambda: mon.health().kv.state == "connected", 10), mon.health().kv  # type: ignore
        assert not any(t.name == "workermon-kv-events" for t in mon._threads)  # no ZMQ plane here
        ep = f"namespace.{namespace}.component.backend.endpoint.generate.kv-events"
        comp = f"namespace.{namespace}.component.backend.kv-events"
        stream = f"namespace-{namespace}-component-backend-kv-events.kv-events"
        a, b, c = (list(range(k * 100, k * 100 + 48)) for k in range(1, 4))
        pub.publish(ep, _envelope(0xA1, 0, [_item(new.worker_id, stored(1, block_hashes(a, 16)))]))
        pub.publish(comp, _envelope(0xB1, 0, _item(mid.worker_id, stored(1, block_hashes(b, 16)))))
        pub.publish(stream, json.dumps({"worker_id": old.worker_id, "event": stored(0, block_hashes(c, 16))}).encode())
        pub.flush()
        want = {(new.worker_id, 0): 3, (mid.worker_id, 0): 0, (old.worker_id, 0): 0}
        assert mon.wait_for(lambda: mon.prefix_overlap(a) == want, 10), mon.prefix_overlap(a)
        assert mon.wait_for(lambda: mon.prefix_overlap(b)[(mid.worker_id, 0)] == 3, 10)
        assert mon.wait_for(lambda: mon.prefix_overlap(c)[(old.worker_id, 0)] == 3, 10)
        assert all(v.complete for v in mon._kv_routing().index.slots())  # 0.9's ids from 0: no late start

        # A stranger (no card), an oversized message, a bad envelope and bad JSON: counted, dropped.
        pub.publish(ep, _envelope(0xC1, 0, [_item(0x5EED, stored(1, block_hashes(a, 16)))]))
        pub.publish(ep, _envelope(0xA1, 1, [_item(new.worker_id, stored(2, block_hashes(list(range(4000)), 16)))]))
        pub.publish(ep, b"\x93not an envelope")
        pub.publish(stream, b"{not json")
        pub.publish(ep, _envelope(0xA1, 2, [_item(new.worker_id, {"event_id": 3, "dp_rank": 0, "data": "cleared"})]))
        pub.flush()
        assert mon.wait_for(lambda: mon.prefix_overlap(a)[(new.worker_id, 0)] == 0, 10)

        def counted() -> Any:
            c = mon.health().kv.counters  # type: ignore[union-attr]
            return [c.get(k) for k in ("not_members", "malformed_oversized", "malformed_bad_envelope",
                                        "malformed_bad_payload")]

        # Each subject has its own subscription (and nats-py its own task): wait for all four.
        assert mon.wait_for(lambda: counted() == [1, 1, 1, 1], 10), counted()
        kv = mon.health().kv
        assert kv is not None
        assert 0x5EED not in mon._kv_routing().index.worker_ids()
        assert kv.last_error is None

        # A worker that leaves takes its blocks with it (on NATS nothing but its card says it left).
        mid.stop()
        assert mon.wait_for(lambda: mid.worker_id not in mon._kv_routing().index.worker_ids(), 10)
        assert mon.prefix_overlap(c)[(old.worker_id, 0)] == 3
        assert all(t.is_alive() for t in mon._threads)
    finally:
        pub.close()
        assert mon.stop(10)
        for w in workers:
            w.stop()


def test_kv_events_through_zmq_brokers(etcd_server: EtcdServer, namespace: str,
                                       zworkers: Callable[..., WorkerPublisher]) -> None:
    """Broker mode (workers register no channels): the monitor takes its scope's ``…kv-events`` subjects
    from both brokers, passes the workers' other topics by (not malformed), applies each event once,
    ignores a stranger, and lets a departed worker's blocks go when the member set changes."""
    from .helpers import ZmqBroker

    ctx = zmq.Context()
    brokers = [ZmqBroker(ctx), ZmqBroker(ctx)]
    out = ctx.socket(zmq.PUB)
    workers = [zworkers() for _ in range(2)]
    stay, leave = workers
    url = (f"xsub=tcp://127.0.0.1:{brokers[0].xsub_port};tcp://127.0.0.1:{brokers[1].xsub_port} , "
           f"xpub=tcp://127.0.0.1:{brokers[0].xpub_port};tcp://127.0.0.1:{brokers[1].xpub_port}")
    mon = WorkerMonitor([etcd_server.url], None, namespace=namespace, event_plane="zmq", zmq_broker_url=url,
                        kv_index=True)
    try:
        for b in brokers:
            out.connect(f"tcp://127.0.0.1:{b.xsub_port}")
        mon.start()
        assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {w.worker_id for w in workers}, 10)
        base = f"namespace.{namespace}.component.backend.endpoint.generate."
        seqs = {0xA1: 0, 0xB1: 0, 0xC1: 0}

        def send(publisher_id: int, topic: str, worker_id: int, events: List[Any]) -> None:
            payload = msgspec.msgpack.encode([_item(worker_id, e) for e in events])
            env = _envelope_raw(publisher_id, seqs[publisher_id], topic, payload)
            out.send_multipart([(base + topic).encode(), publisher_id.to_bytes(8, "big"),
                                seqs[publisher_id].to_bytes(8, "big"), b"\x01" + len(env).to_bytes(4, "big") + env])
            seqs[publisher_id] += 1

        a, b = list(range(100, 148)), list(range(200, 248))
        def counter(name: str) -> int:
            return mon.health().kv.counters.get(name, 0)  # type: ignore[union-attr]

        # No replay: resend the first events until the subscriptions are through both brokers (a copy
        # through the second broker is a duplicate; the index applies each event once).
        for _ in range(200):
            send(0xA1, "kv-events", stay.worker_id, [stored(1, block_hashes(a, 16))])
            send(0xB1, "kv-events", leave.worker_id, [stored(1, block_hashes(b, 16))])
            if mon.wait_for(lambda: mon.prefix_overlap(a)[(stay.worker_id, 0)] == 3
                            and mon.prefix_overlap(b)[(leave.worker_id, 0)] == 3
                            and counter("index_duplicates") >= 2, 0.05):
                break
        assert mon.prefix_overlap(a)[(stay.worker_id, 0)] == 3 and mon.prefix_overlap(b)[(leave.worker_id, 0)] == 3
        send(0xA1, "forward-pass-metrics", stay.worker_id, [])  # another topic of the same scope
        send(0xC1, "kv-events", 0x5EED, [stored(1, block_hashes(a, 16))])  # a stranger
        send(0xA1, "kv-events", stay.worker_id, [{"event_id": 2, "dp_rank": 0, "data": "cleared"}])
        assert mon.wait_for(lambda: mon.prefix_overlap(a)[(stay.worker_id, 0)] == 0, 10)
        assert mon.wait_for(lambda: counter("other_topics") >= 1 and counter("not_members") >= 1, 10)
        kv = mon.health().kv
        assert kv is not None and kv.last_error is None and not kv.counters.get("malformed"), kv
        assert 0x5EED not in mon._kv_routing().index.worker_ids()
        assert not mon.health().zmq.counters.get("malformed")  # the load source passes kv-events by too

        leave.stop()  # its lease goes: no longer a member, its blocks go too
        assert mon.wait_for(lambda: leave.worker_id not in mon._kv_routing().index.worker_ids(), 10)
        assert stay.worker_id in mon._kv_routing().index.worker_ids()
    finally:
        assert mon.stop(10)
        out.close(linger=0)
        for br in brokers:
            br.close()
        ctx.term()


def _envelope_raw(publisher_id: int, sequence: int, topic: str, payload: bytes) -> bytes:
    return msgspec.msgpack.encode({"publisher_id": publisher_id, "sequence": sequence,
                                   "published_at": int(time.time() * 1000), "topic": topic, "payload": payload})
