"""Faults against real server processes: restarts, partitions, compaction, clusters, hangs."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Set

import pytest

from workermon import BusyChange, NatsOptions, WorkerMonitor
from workermon._servers import EtcdServer, NatsServer, free_port

from .conftest import Changes
from .helpers import RawNatsPublisher, active_load, card_json, card_key, etcd_client, retry_pause
from .proxy import CuttableProxy


def subject(ns: str) -> str:
    return f"namespace.{ns}.kv_metrics"


def etcd_cards(url: str, ns: str) -> Dict[int, int]:
    """What etcd holds now: lease (worker id) → total."""
    import json

    client = etcd_client(url)
    try:
        out = {}
        for value, meta in client.get_prefix(f"v1/mdc/{ns}/"):
            out[meta.lease_id] = json.loads(value)["card_json"]["runtime_config"]["total_kv_blocks"]
        return out
    finally:
        client.close()


def view(mon: WorkerMonitor) -> Dict[int, Any]:
    return {wid: st.kv_total_blocks for wid, st in mon.load_states().items()}


# --- etcd ---------------------------------------------------------------------------------------


def _close_quietly(*closables: Any) -> None:
    """Close clients whose server may be gone (closing a dead connection can raise)."""
    for closable in closables:
        if closable is not None:
            try:
                closable.close()
            except Exception:  # noqa: BLE001
                pass


def _churn_under_restarts(etcd: EtcdServer, nats: NatsServer, namespace: str, restarts: int,
                          restart_nats: bool = False) -> None:
    """Card churn (adds, changes, deletes, lease expiries) with busy metrics while
    the servers are killed with -9 and restarted; then the view must converge."""
    mon = WorkerMonitor([etcd.url], [nats.url], namespace=namespace, busy_threshold=0.9)
    removed: Counter = Counter()
    ever_busy: Set[int] = set()

    @mon.on_busy_change
    def track(change: BusyChange) -> None:
        removed.update(change.removed)
        ever_busy.update(change.became_busy)

    mon.start()
    assert mon.wait_ready(10)
    stop = threading.Event()
    rng = random.Random(4)
    ops = Counter()

    def churn() -> None:
        client = None
        pub = None
        leases: List[Any] = []
        while not stop.is_set():
            try:
                if client is None:
                    client = etcd_client(etcd.url)
                if pub is None:
                    pub = RawNatsPublisher(nats.url)
                r = rng.random()
                if r < 0.45 or not leases:
                    lease = client.lease(2 if rng.random() < 0.3 else 60)   # some expire on their own
                    client.put(card_key(namespace, lease.id), card_json(100), lease=lease)
                    leases.append(lease)
                    pub.publish(subject(namespace), active_load(lease.id, kv_used_blocks=99))
                    pub.flush()
                    ops["add"] += 1
                elif r < 0.75:
                    lease = rng.choice(leases)
                    client.put(card_key(namespace, lease.id), card_json(100 + rng.randrange(10)), lease=lease)
                    ops["change"] += 1
                else:
                    lease = leases.pop(rng.randrange(len(leases)))
                    client.revoke_lease(lease.id)
                    ops["delete"] += 1
            except Exception:  # noqa: BLE001 - a server is down part of the time: retry
                ops["failed"] += 1
                _close_quietly(client, pub)
                client = pub = None
                stop.wait(0.05)
        _close_quietly(client, pub)

    t = threading.Thread(target=churn, name="test-churn")
    t.start()
    try:
        for i in range(restarts):
            stop.wait(0.3)
            if restart_nats and i % 2:
                nats.restart()
            else:
                etcd.restart()      # kill -9, then start on the same ports and data
    finally:
        stop.set()
        t.join(30)
    assert ops["add"] > 10 and ops["delete"] > 3, ops
    # Converges: members and totals equal what etcd holds (expiries included).
    deadline = time.monotonic() + 30
    while True:
        truth = etcd_cards(etcd.url, namespace)
        if mon.wait_for(lambda: view(mon) == truth, 3):
            break
        assert time.monotonic() < deadline, (view(mon), truth)
    assert mon.health().etcd.counters.get("reconnects", 0) + mon.health().etcd.counters.get("errors", 0) >= 1
    # Each removal was reported exactly once; every busy worker that left was reported.
    assert all(n == 1 for n in removed.values()), [w for w, n in removed.items() if n != 1]
    gone_busy = {w for w in ever_busy if w not in truth}
    assert gone_busy <= set(removed), gone_busy - set(removed)
    assert mon.health().alive
    mon.stop()


def test_etcd_kill9_restart_20_times_during_churn(fresh_etcd: EtcdServer, nats_server: NatsServer,
                                                  namespace: str) -> None:
    _churn_under_restarts(fresh_etcd, nats_server, namespace, restarts=20)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_etcd_and_nats_restarts(fresh_etcd: EtcdServer, fresh_nats: NatsServer, namespace: str) -> None:
    """Opt in with ``pytest -m soak``; WORKERMON_SOAK_RESTARTS sets the length (default 300, ~2 min)."""
    import os

    _churn_under_restarts(fresh_etcd, fresh_nats, namespace,
                          restarts=int(os.environ.get("WORKERMON_SOAK_RESTARTS", "300")), restart_nats=True)


def test_compaction_while_cut_off_relists_and_reconciles(fresh_etcd: EtcdServer, nats_server: NatsServer,
                                                         namespace: str, changes: Changes) -> None:
    proxy = CuttableProxy(fresh_etcd.client_port)
    client = etcd_client(fresh_etcd.url)
    pub = RawNatsPublisher(nats_server.url)
    try:
        leases = [client.lease(60) for _ in range(4)]
        for lease in leases:
            client.put(card_key(namespace, lease.id), card_json(100), lease=lease)
        mon = WorkerMonitor([proxy.url], [nats_server.url], namespace=namespace)
        mon.on_busy_change(changes)
        mon.start()
        assert mon.wait_ready(10)
        for lease in leases:
            pub.publish(subject(namespace), active_load(lease.id, kv_used_blocks=99))
        pub.flush()
        assert mon.wait_for(lambda: mon.busy_workers() == {le.id for le in leases}, 10)
        changes.drain()

        proxy.cut()
        assert mon.wait_for(lambda: mon.health().etcd.state != "connected", 10)
        client.revoke_lease(leases[0].id)                                   # deleted meanwhile
        client.put(card_key(namespace, leases[1].id), card_json(1000), lease=leases[1])   # changed: now free
        new = client.lease(60)
        client.put(card_key(namespace, new.id), card_json(100), lease=new)  # added
        for _ in range(20):                                                 # churn past the watch revision
            client.put(f"v1/mdc/{namespace}-other/x", "{}")
        _, meta = client.get(card_key(namespace, new.id))
        client.compact(meta.response_header.revision)
        proxy.restore()

        c = changes.get(timeout=20)
        assert c.removed == {leases[0].id} and c.became_free == {leases[1].id}
        assert mon.wait_for(lambda: mon.members() == {leases[1].id, leases[2].id, leases[3].id, new.id}, 10)
        assert view(mon)[leases[1].id] == 1000
        assert mon.health().etcd.counters.get("resyncs", 0) >= 1
        assert changes.drain() == []        # the deletion was reported once, not twice
        mon.stop()
        for lease in [*leases[1:], new]:
            client.revoke_lease(lease.id)
    finally:
        pub.close()
        client.close()
        proxy.close()


def _start_cluster(n: int = 3) -> List[EtcdServer]:
    names = [f"m{i}" for i in range(n)]
    peer_ports = [free_port() for _ in names]
    initial = ",".join(f"{name}=http://127.0.0.1:{p}" for name, p in zip(names, peer_ports))
    members = [EtcdServer(member_name=name, peer_port=p, initial_cluster=initial,
                          extra_args=["--initial-cluster-state", "new"]) for name, p in zip(names, peer_ports)]
    errors: List[BaseException] = []

    def boot(m: EtcdServer) -> None:
        try:
            m.start(timeout=30)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(m,)) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for m in members:
            m.close()
        raise errors[0]
    return members


@pytest.fixture
def etcd_cluster() -> Iterator[List[EtcdServer]]:
    members = _start_cluster()
    yield members
    for m in members:
        m.close()


def _leader(members: List[EtcdServer]) -> EtcdServer:
    for m in members:
        if m.running:
            client = etcd_client(m.url)
            try:
                name = client.status().leader.name
            finally:
                client.close()
            return next(x for x in members if x.member_name == name)
    raise AssertionError("no member running")


def test_etcd_cluster_leader_killed(etcd_cluster: List[EtcdServer], nats_server: NatsServer,
                                    namespace: str) -> None:
    leader = _leader(etcd_cluster)
    others = [m for m in etcd_cluster if m is not leader]
    # The monitor starts on the leader: killing it forces a fail-over.
    mon = WorkerMonitor([leader.url] + [m.url for m in others], [nats_server.url], namespace=namespace)
    mon.start()
    assert mon.wait_ready(10)
    client = etcd_client(others[0].url)
    try:
        client.put(card_key(namespace, 0xA1), card_json(10))
        assert mon.wait_for(lambda: mon.members() == {0xA1}, 10)
        leader.kill()
        for wid in (0xA2, 0xA3):
            deadline = time.monotonic() + 30
            while True:   # the survivors elect a new leader; writes succeed after that
                try:
                    client.put(card_key(namespace, wid), card_json(10))
                    break
                except Exception:  # noqa: BLE001
                    assert time.monotonic() < deadline
                    retry_pause()
        assert mon.wait_for(lambda: mon.members() == {0xA1, 0xA2, 0xA3}, 20), mon.health().etcd
        assert mon.health().etcd.endpoint != leader.url
    finally:
        client.close()
        mon.stop()


def test_hung_etcd_detected_by_keepalive(etcd_cluster: List[EtcdServer], nats_server: NatsServer,
                                         namespace: str) -> None:
    first, *others = etcd_cluster
    mon = WorkerMonitor([first.url] + [m.url for m in others], [nats_server.url], namespace=namespace)
    mon.start()
    assert mon.wait_ready(10)
    assert mon.health().etcd.endpoint == first.url
    client = etcd_client(others[0].url)
    try:
        first.pause()              # SIGSTOP: sockets stay open, nothing answers
        paused_at = time.monotonic()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.put(card_key(namespace, 0xB1), card_json(10))
                break
            except Exception:  # noqa: BLE001 - a new leader may be needed first
                assert time.monotonic() < deadline
                retry_pause()
        # gRPC keepalive (10 s ping, 5 s ack) finds the hang; the monitor moves on.
        assert mon.wait_for(lambda: 0xB1 in mon.members(), 25), mon.health().etcd
        detected = time.monotonic() - paused_at
        assert detected < 25
        assert mon.health().etcd.endpoint != first.url
    finally:
        first.resume()
        client.close()
        mon.stop()


# --- NATS ---------------------------------------------------------------------------------------


def test_nats_first_connection_is_retried(etcd_server: EtcdServer, namespace: str) -> None:
    port = free_port()
    mon = WorkerMonitor([etcd_server.url], [f"nats://127.0.0.1:{port}"], namespace=namespace)
    mon.start()
    server = NatsServer(port=port)
    try:
        assert mon.wait_ready(1.0) is False
        server.start()
        assert mon.wait_ready(10)
        assert mon.health().nats.state == "connected"
    finally:
        mon.stop()
        server.close()


def test_nats_restart_20_times_under_load(etcd_server: EtcdServer, fresh_nats: NatsServer, namespace: str) -> None:
    client = etcd_client(etcd_server.url)
    client.put(card_key(namespace, 0xC1), card_json(1000))
    mon = WorkerMonitor([etcd_server.url], [fresh_nats.url], namespace=namespace)
    mon.start()
    assert mon.wait_ready(10)
    recoveries: List[float] = []
    try:
        for i in range(20):
            fresh_nats.restart()
            back = time.monotonic()
            marker = 10_000 + i
            pub = RawNatsPublisher(fresh_nats.url)
            try:
                # Load keeps flowing; the marker shows when updates arrive again.
                def arrived() -> bool:
                    st = mon.load_state(0xC1)
                    return st is not None and st.kv_active_blocks.get(0) == marker

                deadline = time.monotonic() + 10
                while not arrived():
                    assert time.monotonic() < deadline, mon.health().nats
                    for v in range(50):
                        pub.publish(subject(namespace), active_load(0xC1, kv_used_blocks=v))
                    pub.publish(subject(namespace), active_load(0xC1, kv_used_blocks=marker))
                    pub.flush()
                    mon.wait_for(arrived, 0.1)
                recoveries.append(time.monotonic() - back)
            finally:
                pub.close()
        recoveries.sort()
        median = recoveries[len(recoveries) // 2]
        assert median < 1.5, recoveries
        assert max(recoveries) < 5, recoveries
        assert mon.health().nats.counters.get("reconnects", 0) >= 20
    finally:
        mon.stop()
        client.delete(card_key(namespace, 0xC1))
        client.close()


def _start_nats_cluster(n: int = 3) -> List[NatsServer]:
    cports = [free_port() for _ in range(n)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in cports)
    nodes = [NatsServer(extra_args=["--cluster_name", "wm", "--cluster", f"nats://127.0.0.1:{p}", "--routes", routes])
             for p in cports]
    for node in nodes:
        node.start()
    return nodes


def test_nats_cluster_failover(etcd_server: EtcdServer, namespace: str) -> None:
    nodes = _start_nats_cluster()
    client = etcd_client(etcd_server.url)
    client.put(card_key(namespace, 0xD1), card_json(1000))
    mon = WorkerMonitor([etcd_server.url], [n.url for n in nodes], namespace=namespace)
    try:
        mon.start()
        assert mon.wait_ready(10)
        connected = mon.health().nats.endpoint
        victim = next(n for n in nodes if n.url == connected)
        survivor = next(n for n in nodes if n is not victim)
        victim.kill()
        pub = RawNatsPublisher(survivor.url)
        try:
            def arrived() -> bool:
                st = mon.load_state(0xD1)
                return st is not None and st.kv_active_blocks.get(0) == 777

            deadline = time.monotonic() + 15
            while not arrived():
                assert time.monotonic() < deadline, mon.health().nats
                pub.publish(subject(namespace), active_load(0xD1, kv_used_blocks=777))
                pub.flush()
                mon.wait_for(arrived, 0.2)
        finally:
            pub.close()
        assert mon.health().nats.endpoint != connected
    finally:
        mon.stop()
        client.delete(card_key(namespace, 0xD1))
        client.close()
        for n in nodes:
            n.close()


def test_slow_consumer_drops_are_counted(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    mon = WorkerMonitor([etcd_server.url], [nats_server.url], namespace=namespace,
                        nats=NatsOptions(pending_msgs_limit=5))
    mon.start()
    assert mon.wait_ready(10)
    try:
        with RawNatsPublisher(nats_server.url) as pub:
            pub.publish_many(subject(namespace), (active_load(1, kv_used_blocks=i) for i in range(20_000)))
            pub.flush()
        assert mon.wait_for(lambda: mon.health().nats.counters.get("dropped_slow_consumer", 0) > 0, 10)
        assert mon.health().alive
    finally:
        mon.stop()
