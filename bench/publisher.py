"""A separate publisher process: raw NATS protocol, as fast as it can, or paced.

    python -m bench.publisher URL SUBJECT --workers W --count M [--rate R --times FILE]

Prints ``go`` before the first message and ``done`` after the server has
acknowledged the last one (PING/PONG).  Worker ids are ``BASE + i``.
"""

from __future__ import annotations

import argparse
import array
import json
import socket
import sys
import time
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

BASE = 0x7000_0000_0000


def payload(worker_id: int, active: int, total: int = 1000, **extra: object) -> bytes:
    # Shaped like a real Dynamo 0.6/0.7 LoadEvent (~330 bytes).
    msg = {"worker_id": worker_id,
           "data": {"worker_stats": {"data_parallel_rank": 0, "request_active_slots": 3,
                                     "request_total_slots": 256, "num_requests_waiting": 0},
                    "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": total,
                                 "gpu_cache_usage_perc": active / total, "gpu_prefix_cache_hit_rate": 0.4},
                    "spec_decode_stats": None}}
    msg.update(extra)
    return json.dumps(msg, separators=(",", ":")).encode()


def paced(items: Sequence[T], rate: float, send: Callable[[T], object]) -> "array.array[float]":
    """Send ``items`` at ``rate`` per second; each one's send time (wall clock, float64)."""
    times = array.array("d")
    start = time.perf_counter()
    wall0 = time.time() - start
    interval = 1.0 / rate
    for j, item in enumerate(items):
        due = start + j * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        send(item)
        times.append(wall0 + time.perf_counter())
    return times


def value_for(i: int, r: int) -> int:
    return (i * 37 + r * 101) % 1100


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("subject")
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    ap.add_argument("--times", default=None, help="write each message's send time (float64 array) here")
    ap.add_argument("--flip", action="store_true", help="alternate each worker between 950 and 10 blocks")
    args = ap.parse_args()
    host, port = args.url.split("://", 1)[-1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
    assert f.readline().strip() == b"PONG"
    subj = args.subject.encode()
    w = args.workers

    def frame(j: int) -> bytes:
        i, r = j % w, j // w
        active = (950 if r % 2 == 0 else 10) if args.flip else value_for(i, r)
        body = payload(BASE + i, active)
        return b"PUB %s %d\r\n%s\r\n" % (subj, len(body), body)

    frames = [frame(j) for j in range(args.count)]
    # The marker: a value no other report carries, last, for worker 0 (its
    # card declares rank 0 only), applied only after everything before it.
    marker = payload(BASE, 424242)
    frames.append(b"PUB %s %d\r\n%s\r\n" % (subj, len(marker), marker))
    times = array.array("d")
    print("go", time.time(), flush=True)
    if args.rate is None:
        chunk = 512
        for k in range(0, len(frames), chunk):
            sock.sendall(b"".join(frames[k:k + chunk]))
    else:
        times = paced(frames, args.rate, sock.sendall)
    sock.sendall(b"PING\r\n")
    while f.readline().strip() != b"PONG":
        pass
    print("done", time.time(), flush=True)
    if args.times:
        with open(args.times, "wb") as out:
            times.tofile(out)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
