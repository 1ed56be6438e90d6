"""WorkerMonitor against real etcd and nats-server processes."""

from __future__ import annotations

import json
import threading
import tracemalloc
from typing import Any

import pytest

from workermon import BusyChange, WorkerLoadState, WorkerMonitor

from .conftest import Changes
from .helpers import Make, RawNatsPublisher, active_load, card_json, card_key, load_event



def subject(ns: str) -> str:
    return f"namespace.{ns}.kv_metrics"


def started(make: Make, changes: Changes | None = None, **kw: Any) -> WorkerMonitor:
    mon = make(**kw)
    if changes is not None:
        mon.on_busy_change(changes)
    mon.start()
    assert mon.wait_ready(10)
    return mon


def applied(mon: WorkerMonitor, wid: int, rank: int, value: int, timeout: float = 10.0) -> bool:
    """Wait until the monitor has applied ``value`` for the worker's rank."""

    def check() -> bool:
        st = mon.load_state(wid)
        return st is not None and st.kv_active_blocks.get(rank) == value

    return mon.wait_for(check, timeout)


# 3 -------------------------------------------------------------------------------------

def test_card_then_metrics_busy_then_free(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                          namespace: str, changes: Changes) -> None:
    lease = etcd.lease(10)
    etcd.put(card_key(namespace, lease.id), card_json(1000), lease=lease)
    mon = started(make_monitor, changes)
    wid = lease.id
    assert mon.members() == {wid} and mon.free_workers() == {wid}

    publisher.publish(subject(namespace), load_event(wid, 950))
    publisher.flush()
    c = changes.get()
    assert c == BusyChange(frozenset({wid}), frozenset({wid}), frozenset(), frozenset(), 1)
    assert mon.is_busy(wid) and mon.busy_workers() == {wid} and mon.free_workers() == frozenset()

    # A report that keeps it busy is no change: after it is applied, nothing more came.
    publisher.publish(subject(namespace), load_event(wid, 960))
    publisher.flush()
    assert applied(mon, wid, 0, 960)
    assert changes.drain() == []

    publisher.publish(subject(namespace), active_load(wid, dp_rank=0, kv_used_blocks=100))
    publisher.flush()
    c = changes.get()
    assert c == BusyChange(frozenset(), frozenset(), frozenset({wid}), frozenset(), 2)
    st = mon.load_states()[wid]
    assert st.kv_total_blocks == 1000 and dict(st.kv_active_blocks) == {0: 100} and not st.busy
    assert st.last_report_age is not None and st.last_report_age >= 0
    lease.revoke()


# 4 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["revoke", "expire", "delete"])
def test_lease_revoked_or_expired_removes_worker(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                                 namespace: str, changes: Changes, how: str) -> None:
    lease = etcd.lease(1 if how == "expire" else 30)
    key = card_key(namespace, lease.id)
    etcd.put(key, card_json(100), lease=lease)
    mon = started(make_monitor, changes)
    publisher.publish(subject(namespace), load_event(lease.id, 99))
    publisher.flush()
    assert changes.get().became_busy == {lease.id}
    if how == "revoke":
        lease.revoke()
    elif how == "delete":
        etcd.delete(key)
    # "expire": the lease is never refreshed; etcd expires it after ~1 s.
    c = changes.get(timeout=15)
    assert c.removed == {lease.id} and c.busy == frozenset() and c.became_free == frozenset()
    assert mon.members() == frozenset() and mon.load_states() == {}
    assert mon.load_state(lease.id) is None
    if how == "delete":
        lease.revoke()


# 5 -------------------------------------------------------------------------------------

def test_capacity_change_recomputes_without_metric(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                                   namespace: str, changes: Changes) -> None:
    lease = etcd.lease(30)
    key = card_key(namespace, lease.id)
    etcd.put(key, card_json(1000), lease=lease)
    mon = started(make_monitor, changes)
    publisher.publish(subject(namespace), load_event(lease.id, 950))
    publisher.flush()
    assert changes.get().became_busy == {lease.id}
    etcd.put(key, card_json(2000), lease=lease)
    assert changes.get().became_free == {lease.id}
    assert mon.load_states()[lease.id].kv_total_blocks == 2000
    etcd.put(key, card_json(1000, wrapped=False), lease=lease)
    assert changes.get().became_busy == {lease.id}
    lease.revoke()


# 6 -------------------------------------------------------------------------------------

def test_malformed_input_is_counted_and_harmless(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                                 namespace: str, changes: Changes) -> None:
    good = etcd.lease(30)
    etcd.put(card_key(namespace, good.id), card_json(1000), lease=good)
    other = etcd.lease(30)
    other_key = card_key(namespace, other.id)
    etcd.put(other_key, card_json(1000), lease=other)
    mon = started(make_monitor, changes)
    subj = subject(namespace)

    bad_loads = [
        b"{not json", b"\xff\xfe", json.dumps({"worker_id": True, "kv_used_blocks": 1}).encode(),
        json.dumps({"worker_id": good.id, "kv_used_blocks": -1}).encode(),
        json.dumps({"worker_id": str(good.id), "kv_used_blocks": 999}).encode(),
        json.dumps({"worker_id": good.id, "kv_used_blocks": 999.0}).encode(),
        json.dumps({"worker_id": good.id, "kv_used_blocks": 999, "pad": "x" * 100_000}).encode(),
        b"",
    ]
    for raw in bad_loads:
        publisher.publish(subj, raw)
    # Malformed cards: bad JSON and wrong types keep the previous valid card.
    etcd.put(other_key, "{oops", lease=other)
    etcd.put(other_key, json.dumps({"runtime_config": {"total_kv_blocks": "1000"}}), lease=other)
    bad = etcd.lease(30)
    etcd.put(card_key(namespace, bad.id), b"\xff\xfe", lease=bad)   # never a member
    # 100k made-up worker ids: held, capped, never members.
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    publisher.publish_many(subj, (active_load(10**12 + i, kv_used_blocks=1) for i in range(100_000)))
    publisher.publish(subj, load_event(good.id, 950))
    publisher.flush()
    assert changes.get(timeout=30).became_busy == {good.id}
    held_growth = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()

    assert mon.members() == {good.id, other.id}
    assert mon.load_states()[other.id].kv_total_blocks == 1000
    h = mon.health()
    # The oversized one is dropped (and counted) by the NATS source, the others by the reducer.
    assert h.reducer["malformed_load"] == len(bad_loads) - 1
    assert h.nats.counters["malformed_oversized"] == 1 and "malformed_load_oversized" not in h.reducer
    assert h.etcd.counters["malformed"] == 3
    assert h.reducer["pending_workers"] == 10_000
    assert h.reducer["pending_dropped"] == 90_000
    # 10,000 held workers at well under 2 KB each, whatever was sent.
    assert held_growth < 10_000 * 2048, held_growth
    assert h.alive and all(t.is_alive() for t in mon._threads)
    for lease in (good, other, bad):
        lease.revoke()


# 7 -------------------------------------------------------------------------------------

def test_raising_callback_isolated(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                   namespace: str, changes: Changes) -> None:
    lease = etcd.lease(30)
    etcd.put(card_key(namespace, lease.id), card_json(100), lease=lease)
    mon = make_monitor()

    def boom(change: BusyChange) -> None:
        raise RuntimeError("callback bug")

    mon.on_busy_change(boom)
    mon.on_busy_change(changes)
    changes.monitor = mon  # a timeout then says where the report stopped
    mon.start()
    assert mon.wait_ready(10)
    for value in (99, 1, 99):
        publisher.publish(subject(namespace), load_event(lease.id, value))
        publisher.flush()
        changes.get()
    assert mon.health().reducer["callback_errors"] == 3
    assert all(t.is_alive() for t in mon._threads)
    lease.revoke()


def test_callback_can_stop_the_monitor(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                       namespace: str) -> None:
    lease = etcd.lease(30)
    etcd.put(card_key(namespace, lease.id), card_json(100), lease=lease)
    mon = make_monitor()
    stopped = threading.Event()
    results = []

    @mon.on_busy_change
    def stop_it(change: BusyChange) -> None:
        results.append(mon.stop(timeout=5))
        stopped.set()

    mon.start()
    assert mon.wait_ready(10)
    publisher.publish(subject(namespace), load_event(lease.id, 99))
    publisher.flush()
    assert stopped.wait(10)
    for t in mon._threads:
        t.join(10)
    assert not any(t.is_alive() for t in mon._threads)
    assert results == [True]
    assert mon.stop() is True     # twice is fine
    with pytest.raises(RuntimeError):
        mon.start()
    lease.revoke()


def test_start_twice_and_after_stop(make_monitor: Make) -> None:
    mon = make_monitor()
    mon.start()
    with pytest.raises(RuntimeError):
        mon.start()
    assert mon.stop()
    assert mon.stop()
    with pytest.raises(RuntimeError):
        mon.start()
    assert not any(t.is_alive() for t in mon._threads)


def test_context_manager_and_late_registration(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                               namespace: str, changes: Changes) -> None:
    lease = etcd.lease(30)
    etcd.put(card_key(namespace, lease.id), card_json(100), lease=lease)
    with make_monitor() as mon:
        assert mon.wait_ready(10)
        publisher.publish(subject(namespace), load_event(lease.id, 99))
        publisher.flush()
        assert mon.wait_for(lambda: mon.is_busy(lease.id), 10)
        handle = mon.on_busy_change(changes)
        first = changes.get()
        assert first == BusyChange(frozenset({lease.id}), frozenset({lease.id}), frozenset(), frozenset(),
                                   mon.version)
        publisher.publish(subject(namespace), load_event(lease.id, 1))
        publisher.flush()
        assert changes.get().became_free == {lease.id}
        handle.cancel()
        publisher.publish(subject(namespace), load_event(lease.id, 99))
        publisher.flush()
        assert mon.wait_for(lambda: mon.is_busy(lease.id), 10)
        assert changes.drain() == []
    assert not any(t.is_alive() for t in mon._threads)
    lease.revoke()


def test_set_thresholds_from_callback_and_thread(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                                 namespace: str, changes: Changes) -> None:
    lease = etcd.lease(30)
    etcd.put(card_key(namespace, lease.id), card_json(1000), lease=lease)
    mon = started(make_monitor, changes)
    publisher.publish(subject(namespace), load_event(lease.id, 850))
    publisher.flush()
    assert applied(mon, lease.id, 0, 850)
    mon.set_thresholds(busy_threshold=0.8)
    assert mon.is_busy(lease.id)   # reflected when set_thresholds returns
    assert changes.get().became_busy == {lease.id}

    lowered = threading.Event()

    def raise_threshold(change: BusyChange) -> None:
        if change.became_busy:
            mon.set_thresholds(busy_threshold=0.95)
            lowered.set()

    mon.on_busy_change(raise_threshold)   # called at once with the current (busy) state
    assert lowered.wait(10)
    assert not mon.is_busy(lease.id)
    assert changes.get().became_free == {lease.id}
    assert mon.thresholds.busy_threshold == 0.95
    with pytest.raises(ValueError):
        mon.set_thresholds(busy_threshold=2)
    assert mon.thresholds.busy_threshold == 0.95
    lease.revoke()


# 8 -------------------------------------------------------------------------------------

def test_wait_ready_reflects_existing_cards(make_monitor: Make, etcd: Any, namespace: str) -> None:
    leases = [etcd.lease(30) for _ in range(5)]
    for lease in leases:
        etcd.put(card_key(namespace, lease.id), card_json(1000), lease=lease)
    # A key without a lease: its id comes from the key's hex suffix.
    etcd.put(card_key(namespace, 0xABC), card_json(10))
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    assert mon.members() == {lease.id for lease in leases} | {0xABC}
    assert mon.free_workers() == mon.members() and mon.busy_workers() == frozenset()
    etcd.delete(card_key(namespace, 0xABC))
    for lease in leases:
        lease.revoke()


def test_wait_ready_false_while_servers_unreachable(namespace: str) -> None:
    from workermon._servers import free_port

    mon = WorkerMonitor([f"http://127.0.0.1:{free_port()}"], [f"nats://127.0.0.1:{free_port()}"],
                        namespace=namespace)
    mon.start()
    try:
        assert mon.wait_ready(1.0) is False
        h = mon.health()
        assert h.etcd.state == "connecting" and h.nats.state == "connecting"
    finally:
        assert mon.stop(timeout=5)


# 9 -------------------------------------------------------------------------------------

def test_thousand_workers_twenty_updates_final_state(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                                     namespace: str) -> None:
    n, rounds = 1000, 20
    lease = etcd.lease(60)
    # Cards under one lease, ids from each key's suffix (lease 0 would be the
    # fallback); to keep distinct workers we put them without a lease.
    ids = [0x1000 + i for i in range(n)]
    for wid in ids:
        etcd.put(card_key(namespace, wid), card_json(1000))
    mon = started(make_monitor)
    assert len(mon.members()) == n
    last = {}
    for r in range(rounds):
        for i, wid in enumerate(ids):
            value = (i * 37 + r * 101) % 1100
            last[wid] = value
            publisher.publish(subject(namespace), active_load(wid, kv_used_blocks=value))
    # The marker: a report that only carries the other signal (active_decode_blocks),
    # last; it leaves the worker's own count in place.
    marker = ids[0]
    publisher.publish(subject(namespace), active_load(marker, active_decode_blocks=12345))
    publisher.flush()
    assert mon.wait_for(lambda: (mon.load_state(marker) or WorkerLoadState(0, None)).active_decode_blocks.get(0)
                        == 12345, 30)
    states = mon.load_states()
    assert {wid: states[wid].kv_used_blocks[0] for wid in ids} == last
    expected_busy = {wid for wid, v in last.items() if v > 900} | {marker}  # 12345 > 900: over
    assert mon.busy_workers() == expected_busy
    assert mon.free_workers() == set(ids) - expected_busy
    etcd.delete_prefix(f"v1/mdc/{namespace}/")
    lease.revoke()
