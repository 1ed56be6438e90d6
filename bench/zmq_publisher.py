"""A separate publisher process on Dynamo 1.6's ZMQ event plane, as fast as it can, or paced.

    python -m bench.zmq_publisher ETCD_URL NAMESPACE --workers W --count M [--rate R --times FILE --flip]

It binds a socket on loopback, registers one ``kv_metrics`` event channel for
it in etcd under a lease (as a 1.6 worker does), waits until a subscriber has
subscribed (the socket is an XPUB: a PUB's wire, and it hears subscriptions),
prints ``go``, sends the real 4-frame messages (ActiveLoad msgpack in the
envelope, ``kv_used_blocks`` only, worker ids ``BASE + i``), then the marker,
and prints ``done``.  The lease is revoked when stdin closes.
"""

from __future__ import annotations

import argparse
import array
import json
import sys
import time

import msgspec
import zmq

from bench.publisher import BASE, paced, value_for
from workermon._sources.etcd import EtcdConfig, make_client
from workermon._parse import KV_METRICS, channel_prefix

MARKER = 424242


def frames(publisher_id: int, sequence: int, worker_id: int, used: int) -> list:
    payload = msgspec.msgpack.encode({"worker_id": worker_id, "dp_rank": 0, "active_decode_blocks": None,
                                      "active_prefill_tokens": None, "kv_used_blocks": used})
    env = msgspec.msgpack.encode({"publisher_id": publisher_id, "sequence": sequence,
                                  "published_at": int(time.time() * 1000), "topic": KV_METRICS, "payload": payload})
    return [KV_METRICS.encode(), publisher_id.to_bytes(8, "big"), sequence.to_bytes(8, "big"),
            b"\x01" + len(env).to_bytes(4, "big") + env]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("etcd")
    ap.add_argument("namespace")
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--times", default=None)
    ap.add_argument("--flip", action="store_true")
    args = ap.parse_args()
    publisher_id = 0x1234_5678_9ABC
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop in the benchmark: the subscriber's pace is measured
    sock.setsockopt(zmq.LINGER, 5000)
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    client = make_client(EtcdConfig(endpoints=(args.etcd,), prefix="unused/"), args.etcd)
    lease = client.lease(60)
    key = f"{channel_prefix(args.namespace, 'backend', 'generate')}{publisher_id:x}"
    value = {"type": "EventChannel", "scope": {"kind": "endpoint", "endpoint": {
        "namespace": args.namespace, "component": "backend", "name": "generate"}},
        "topic": KV_METRICS, "instance_id": publisher_id,
        "transport": {"kind": "Zmq", "config": {"endpoint": endpoint}}}
    client.put(key, json.dumps(value), lease=lease.id)
    try:
        msg = sock.recv()  # the subscriber's subscription
        assert msg[:1] == b"\x01", msg
        w = args.workers
        batch = []
        for j in range(args.count):
            i, r = j % w, j // w
            used = (950 if r % 2 == 0 else 10) if args.flip else value_for(i, r)
            batch.append(frames(publisher_id, j, BASE + i, used))
        batch.append(frames(publisher_id, args.count, BASE, MARKER))
        times = array.array("d")
        print("go", time.time(), flush=True)
        if args.rate is None:
            for fr in batch:
                sock.send_multipart(fr)
        else:
            times = paced(batch, args.rate, sock.send_multipart)
        print("done", time.time(), flush=True)
        if args.times:
            with open(args.times, "wb") as out:
                times.tofile(out)
        # Keep the channel registered (and the socket open) until the parent
        # has seen everything: it closes our stdin then.
        sys.stdin.read()
    finally:
        client.revoke_lease(lease.id)
        client.close()
        sock.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
