"""Test helpers that talk to real servers: a raw NATS publisher, card writers, samples."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import zmq

from workermon import WorkerMonitor
from workermon._sources.etcd import EtcdConfig, make_client

# A fixture that makes (and later stops) monitors: make_monitor, zmon.
Make = Callable[..., WorkerMonitor]

# Real traffic captured from Dynamo 0.5.1 → 1.6.1 (a copy of shared/dynamo-samples).
SAMPLES = Path(os.environ.get("WORKERMON_SAMPLES", Path(__file__).resolve().parent / "data" / "dynamo-samples"))


def etcd_client(url: str) -> Any:
    return make_client(EtcdConfig(endpoints=(url,), prefix="unused/"), url)


def card_json(total: Optional[int] = 1000, wrapped: bool = True, **runtime: Any) -> str:
    rc: Dict[str, Any] = {"max_num_seqs": 256}
    if total is not None:
        rc["total_kv_blocks"] = total
    rc.update(runtime)
    card = {"display_name": "Qwen/Qwen3-0.6B", "kv_cache_block_size": 16, "runtime_config": rc}
    if wrapped:
        return json.dumps({"type": "Model", "namespace": "dynamo", "instance_id": 1, "card_json": card})
    return json.dumps(card)


def card_key(namespace: str, lease_id: int, component: str = "backend", endpoint: str = "generate") -> str:
    return f"v1/mdc/{namespace}/{component}/{endpoint}/{lease_id:x}"


def load_event(worker_id: int, active: int, rank: Optional[int] = None, **extra: Any) -> bytes:
    msg = {
        "worker_id": worker_id,
        "data": {
            "worker_stats": {"data_parallel_rank": rank, "request_active_slots": 1,
                             "request_total_slots": 256, "num_requests_waiting": 0},
            "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": 1000,
                         "gpu_cache_usage_perc": 0.5, "gpu_prefix_cache_hit_rate": 0.0},
            "spec_decode_stats": None,
        },
    }
    msg.update(extra)
    return json.dumps(msg).encode()


def active_load(worker_id: int, **fields: Any) -> bytes:
    return json.dumps({"worker_id": worker_id, **fields}).encode()


class RawNatsPublisher:
    """A minimal synchronous NATS publisher speaking the text protocol.

    It talks to the real nats-server; ``flush()`` round-trips a PING so that
    every message before it has been processed by the server.
    """

    def __init__(self, url: str) -> None:
        host, port = url.split("://", 1)[-1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self._buf = b""
        self._read_line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"test-pub"}\r\n')
        self._out: List[bytes] = []

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("NATS closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def publish(self, subject: str, payload: bytes) -> None:
        self._out.append(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        if len(self._out) >= 256:
            self._send()

    def publish_many(self, subject: str, payloads: Iterable[bytes]) -> None:
        for p in payloads:
            self.publish(subject, p)

    def _send(self) -> None:
        if self._out:
            self.sock.sendall(b"".join(self._out))
            self._out = []

    def flush(self) -> None:
        self._send()
        self.sock.sendall(b"PING\r\n")
        while True:
            line = self._read_line()
            if line == b"PONG":
                return
            if line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.sock.close()

    def __enter__(self) -> "RawNatsPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_samples(kind: str, version: str) -> List[Dict[str, Any]]:
    path = SAMPLES / f"{kind}-{version}.{'json' if kind == 'etcd' else 'jsonl'}"
    if kind == "etcd":
        return list(json.loads(path.read_text()))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_bytes(entry: Dict[str, Any]) -> bytes:
    data = entry["data"]
    if data.startswith("HEX:"):
        return bytes.fromhex(data[4:])
    return str(data).encode("utf-8")


class RawNatsSubscriber:
    """A minimal synchronous NATS subscriber: ``next()`` returns (subject, payload)."""

    def __init__(self, url: str, subject: str) -> None:
        host, port = url.split("://", 1)[-1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self._buf = b""
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false}\r\nSUB %s 1\r\nPING\r\n' % subject.encode())
        while self._line() != b"PONG":
            pass

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("NATS closed the connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def next(self, timeout: float = 10.0) -> "tuple[str, bytes]":
        self.sock.settimeout(timeout)
        while True:
            line = self._line()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            if line.startswith(b"MSG "):
                parts = line.split()
                size = int(parts[-1])
                while len(self._buf) < size + 2:
                    self._fill()
                payload, self._buf = self._buf[:size], self._buf[size + 2:]
                return parts[1].decode(), payload

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate: "Callable[[], bool]", timeout: float = 10.0, pause: float = 0.02) -> bool:
    """Poll a condition that has no event to wait on (another process's state, a counter of a
    source thread), with a deadline; returns whether it came true."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        retry_pause(pause)
    return True


def retry_pause(seconds: float = 0.1) -> None:
    """Back off before retrying a condition that has no event to wait on.

    For example a write that fails until an etcd cluster has elected a new
    leader, or another process's HTTP port. Never used to order events:
    every retry loop that calls this has a deadline and checks the outcome.
    """
    import time

    time.sleep(seconds)


class LoopbackServer:
    """A server already bound to a free loopback port, served from a thread of its own until :meth:`close`."""

    def __init__(self, server: Any, name: str) -> None:
        import threading

        self.server = server
        self.port = int(server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=server.serve_forever, name=name)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class ZmqBroker:
    """A real XSUB/XPUB forwarder (what Dynamo's zmq_broker runs), on loopback."""

    def __init__(self, ctx: zmq.Context) -> None:  # type: ignore[type-arg]
        self.xsub = ctx.socket(zmq.XSUB)
        self.xpub = ctx.socket(zmq.XPUB)
        self.xsub_port = self.xsub.bind_to_random_port("tcp://127.0.0.1")
        self.xpub_port = self.xpub.bind_to_random_port("tcp://127.0.0.1")
        self.ctrl = ctx.socket(zmq.PAIR)
        self.ctrl.bind(f"inproc://ctrl-{id(self)}")
        self.ctrl_peer = ctx.socket(zmq.PAIR)
        self.ctrl_peer.connect(f"inproc://ctrl-{id(self)}")
        self.thread = threading.Thread(target=self._run, name="test-broker")
        self.thread.start()

    def _run(self) -> None:
        zmq.proxy_steerable(self.xsub, self.xpub, None, self.ctrl_peer)

    def close(self) -> None:
        self.ctrl.send(b"TERMINATE")
        self.thread.join(5)
        for s in (self.xsub, self.xpub, self.ctrl, self.ctrl_peer):
            s.close(linger=0)
