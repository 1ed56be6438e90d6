from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from workermon import BusyChange, WorkerMonitor, WorkerPublisher
from workermon._servers import EtcdServer, NatsServer
from workermon.testing import Servers

from .helpers import Make, RawNatsPublisher, etcd_client

# Threads owned by libraries that are process-wide and not ours to stop.
_FOREIGN_THREAD_PREFIXES = ("ThreadPoolExecutor", "asyncio_", "grpc_")


def _ours(t: threading.Thread) -> bool:
    return not t.name.startswith(_FOREIGN_THREAD_PREFIXES)


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    leaked: List[threading.Thread] = []
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and _ours(t)]
        if not leaked:
            return
        # gRPC's request-iterator threads end right after their call is
        # cancelled; join each with a bound instead of sleeping.
        for t in leaked:
            t.join(0.05)
    pytest.fail(f"threads leaked by this test: {[t.name for t in leaked]}")


@pytest.fixture(scope="session")
def etcd_server(workermon_servers: Servers) -> EtcdServer:
    """The session's etcd: the one the package's own pytest plugin starts (workermon.testing)."""
    return workermon_servers.etcd


@pytest.fixture(scope="session")
def nats_server(workermon_servers: Servers) -> NatsServer:
    """The session's nats-server, from the same plugin."""
    return workermon_servers.nats


@pytest.fixture
def fresh_etcd() -> Iterator[EtcdServer]:
    """An etcd of the test's own, for tests that kill, stop or reconfigure it."""
    server = EtcdServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def fresh_nats() -> Iterator[NatsServer]:
    """A nats-server of the test's own, for tests that kill or restart it."""
    server = NatsServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def namespace() -> str:
    """Each test gets its own namespace: its own key prefix and subjects."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[Any]:
    client = etcd_client(etcd_server.url)
    yield client
    client.close()


@pytest.fixture
def publisher(nats_server: NatsServer) -> Iterator[RawNatsPublisher]:
    pub = RawNatsPublisher(nats_server.url)
    yield pub
    pub.close()


class Changes:
    """Collects BusyChange callbacks into a queue the test waits on."""

    def __init__(self) -> None:
        self.q: "queue.Queue[BusyChange]" = queue.Queue()
        # The monitor watched, so that a wait that times out says where a report stopped.
        self.monitor: Optional[Any] = None

    def __call__(self, change: BusyChange) -> None:
        self.q.put(change)

    def get(self, timeout: float = 10.0) -> BusyChange:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no BusyChange within {timeout} s{self._where()}") from None

    def _where(self) -> str:
        mon = self.monitor
        if mon is None:
            return ""
        h = mon.health()
        return (f"; nats: {h.nats.state} {dict(h.nats.counters)}; zmq: {h.zmq.state}; reducer: {dict(h.reducer)}; "
                f"busy {sorted(mon.busy_workers())} of {sorted(mon.members())}; version {mon.version}")

    def drain(self) -> List[BusyChange]:
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def make_monitor(
    etcd_server: EtcdServer, nats_server: NatsServer, namespace: str
) -> Iterator[Make]:
    made: List[WorkerMonitor] = []

    def make(**kwargs: Any) -> WorkerMonitor:
        kwargs.setdefault("etcd_endpoints", [etcd_server.url])
        kwargs.setdefault("nats_servers", [nats_server.url])
        kwargs.setdefault("namespace", namespace)
        mon = WorkerMonitor(**kwargs)
        made.append(mon)
        return mon

    yield make
    for mon in made:
        assert mon.stop(timeout=10.0), "monitor threads did not stop"


@pytest.fixture
def zworkers(etcd_server: EtcdServer, namespace: str) -> Iterator[Callable[..., WorkerPublisher]]:
    """Simulated 1.6 workers on the ZMQ event plane (card and kv_metrics channel under their lease),
    started on request, stopped (their leases revoked) after the test."""
    made: List[WorkerPublisher] = []

    def make(**kwargs: Any) -> WorkerPublisher:
        kwargs.setdefault("namespace", namespace)
        kwargs.setdefault("total_kv_blocks", 1000)
        pub = WorkerPublisher([etcd_server.url], event_plane="zmq", **kwargs).start()
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.stop()


_ids = itertools.count(1)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by the test."""
    from .certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_etcd(certs: Dict[str, str]) -> Iterator[EtcdServer]:
    """etcd over TLS that requires a client certificate (mutual TLS)."""
    server = EtcdServer(scheme="https", extra_args=[
        "--cert-file", certs["server"], "--key-file", certs["server_key"],
        "--trusted-ca-file", certs["ca"], "--client-cert-auth"])
    server.start()
    yield server
    server.close()


# Fixtures that start a real server (or a process that does): every test using one is an
# integration test, so `pytest -m "not integration"` runs the pure suite alone.
_SERVER_FIXTURES = frozenset({
    "etcd_server", "nats_server", "fresh_etcd", "fresh_nats", "etcd", "publisher", "make_monitor",
    "workermon_servers", "workermon_fleet", "workermon_monitor", "agent", "agent_at", "shared", "zmon",
    "zworkers", "tls_etcd", "fleet",
})


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        starts = getattr(item.module, "STARTS_SERVERS", False) if getattr(item, "module", None) else False
        if names & _SERVER_FIXTURES or starts or item.get_closest_marker("dynamo") or item.get_closest_marker("soak"):
            item.add_marker(pytest.mark.integration)
