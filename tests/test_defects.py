"""Regression tests for the defects of issue 9, one (or more) per item.

Each failed before its fix.  Pure reducer cases first, then real etcd and
nats-server (started by the fixtures on loopback).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any, List

import pytest

from workermon import BusyChange, EtcdOptions, Limits, Reconnect, WorkerMonitor
from workermon._sources.etcd import EtcdSource
from workermon._model import Card, CardListing, CardPut, LoadReport, Thresholds
from workermon._reduce import FleetState, apply_all
from workermon._servers import EtcdServer, NatsServer, free_port

from .helpers import (
    Make,
    RawNatsPublisher,
    active_load,
    card_json,
    card_key,
    etcd_client,
    retry_pause,
    wait_until,
)
from .proxy import CuttableProxy

W1, W2 = 0x694D967CA5EFD804, 0x694D967CA5EFD806


def _put(wid: int, total: int = 1000, key: str = "") -> CardPut:
    return CardPut(key or f"v1/mdc/ns/c/e/{wid:x}", wid, Card(total_kv_blocks=total))


# --- 1. staleness re-derived when the TTL or the policy changes ------------------------------

def test_ttl_off_releases_ranks_already_stale() -> None:
    s = FleetState(Thresholds(metrics_ttl=5.0, stale_policy="busy"))
    apply_all(s, [_put(W1), LoadReport(W1, 0, 10)], 0.0)
    apply_all(s, [], 6.0)
    assert s.is_busy(W1)  # stale, fail closed
    s.set_thresholds(Thresholds(metrics_ttl=None, stale_policy="busy"), 7.0)
    c = s.commit()
    assert c is not None and c.became_free == {W1}
    assert s.load_state(W1, 7.0).stale_ranks == frozenset()
    assert dict(s.load_state(W1, 7.0).kv_active_blocks) == {0: 10}  # the last report stands
    assert apply_all(s, [], 1000.0) is None and not s.is_busy(W1)


def test_busy_to_ignore_policy_drops_stale_data() -> None:
    s = FleetState(Thresholds(metrics_ttl=5.0, stale_policy="busy"))
    apply_all(s, [_put(W1), _put(W2), LoadReport(W1, 0, 10), LoadReport(W2, 0, 10)], 0.0)
    apply_all(s, [LoadReport(W2, 0, 20)], 4.0)
    apply_all(s, [], 6.0)
    assert s.busy == {W1}
    s.set_thresholds(Thresholds(metrics_ttl=5.0, stale_policy="ignore"), 6.0)
    assert s.busy == frozenset()
    assert dict(s.load_state(W1, 6.0).kv_active_blocks) == {}  # dropped, as if never reported
    assert dict(s.load_state(W2, 6.0).kv_active_blocks) == {0: 20}  # still fresh
    apply_all(s, [], 9.5)
    assert dict(s.load_state(W2, 9.5).kv_active_blocks) == {}  # and it expires in turn


# --- 2. hysteresis memory survives unrelated threshold changes -------------------------------

def test_hysteresis_survives_an_unrelated_threshold_change() -> None:
    s = FleetState(Thresholds(busy_threshold=0.9, recover_threshold=0.8))
    apply_all(s, [_put(W1), LoadReport(W1, 0, 950), LoadReport(W1, 0, 850)], 0.0)
    assert s.is_busy(W1)  # between recover and busy: still busy
    s.set_thresholds(Thresholds(busy_threshold=0.9, recover_threshold=0.8, outage_grace=1.0), 0.0)
    assert s.commit() is None and s.is_busy(W1)
    s.set_thresholds(Thresholds(busy_threshold=0.9, recover_threshold=0.8, metrics_ttl=60.0), 0.0)
    assert s.is_busy(W1)
    # A change of the thresholds the memory depends on starts afresh.
    s.set_thresholds(Thresholds(busy_threshold=0.9, recover_threshold=0.7), 0.0)
    assert not s.is_busy(W1)


# --- 3. a listing keeps the previous card of a key whose value is malformed -----------------

def test_listing_keeps_previous_card_of_a_malformed_key() -> None:
    s = FleetState()
    key = f"v1/mdc/ns/c/e/{W1:x}"
    apply_all(s, [_put(W1, 1000, key), _put(W2)], 0.0)
    c = apply_all(s, [CardListing(cards=(_put(W2),), revision=9, malformed_keys=(key,))], 1.0)
    assert c is None
    assert s.members == {W1, W2}
    assert s.load_state(W1, 1.0).kv_total_blocks == 1000
    assert s.counters["listing_kept_malformed"] == 1
    # A malformed key without a previous card creates nothing.
    apply_all(s, [CardListing(cards=(), revision=10, malformed_keys=("v1/mdc/ns/c/e/77",))], 1.0)
    assert s.members == frozenset()


def test_etcd_listing_reports_malformed_keys(etcd_server: EtcdServer, etcd: Any, namespace: str) -> None:
    good, bad = card_key(namespace, 0xA1), card_key(namespace, 0xA2)
    etcd.put(good, card_json(10))
    etcd.put(bad, "{not json")
    try:
        from workermon._sources.etcd import EtcdConfig
        from workermon._health import SourceStatus

        out: "queue.Queue[object]" = queue.Queue()
        src = EtcdSource(EtcdConfig((etcd_server.url,), f"v1/mdc/{namespace}/"), out.put, threading.Event(),
                         SourceStatus("etcd"))
        src._list(etcd_client(etcd_server.url))
        listing = out.get_nowait()
        assert isinstance(listing, CardListing)
        assert [p.key for p in listing.cards] == [good] and listing.malformed_keys == (bad,)
    finally:
        etcd.delete(good)
        etcd.delete(bad)


# --- 4. stop() wakes every waiter ----------------------------------------------------------

def test_waiters_return_after_stop(make_monitor: Make) -> None:
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    results: "queue.Queue[object]" = queue.Queue()
    waiter = threading.Thread(target=lambda: results.put(mon.wait_for(lambda: False, timeout=None)))
    waiter.start()
    assert mon.stop(timeout=5)
    waiter.join(5)
    assert not waiter.is_alive() and results.get_nowait() is False
    # Started after stop(): return at once.
    assert mon.wait_for(lambda: False, timeout=None) is False
    assert mon.wait_for(lambda: True, timeout=None) is True
    assert mon.wait_ready(timeout=None) is False


def test_wait_ready_wakes_when_stopped_from_a_callback(make_monitor: Make) -> None:
    from workermon._servers import free_port as _free

    mon = make_monitor(nats_servers=[f"nats://127.0.0.1:{_free()}"])  # never ready: NATS is unreachable
    results: "queue.Queue[object]" = queue.Queue()
    mon.start()
    waiter = threading.Thread(target=lambda: results.put(mon.wait_ready(timeout=None)))
    waiter.start()
    # A callback registered while running is called at once, on the reducer thread: it stops the monitor.
    mon.on_busy_change(lambda change: mon.stop())
    waiter.join(10)
    assert not waiter.is_alive() and results.get_nowait() is False


# --- 5. a forked child never takes the lock ------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_does_not_hang_on_the_lock(make_monitor: Make) -> None:
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with mon._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: the lock is held by a thread that does not exist here
        code = 0
        try:
            signal.alarm(5)
            h = mon.health()
            if h.alive:
                code = 3
            for call in (lambda: mon.set_thresholds(busy_threshold=0.5), lambda: mon.on_busy_change(print)):
                try:
                    call()
                    code = 4
                except RuntimeError:
                    pass
        except BaseException:  # noqa: BLE001
            code = 5
        os._exit(code)
    release.set()
    holder.join(5)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child did not exit normally (status {status}): it hung on the lock"
    assert os.WEXITSTATUS(status) == 0


# --- 6. etcd authentication is cancellable -------------------------------------------------

def test_stop_cancels_etcd_authentication(fresh_etcd: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    fresh_etcd.pause()  # accepts connections, answers nothing: Authenticate blocks
    try:
        mon = WorkerMonitor([fresh_etcd.url], [nats_server.url], namespace=namespace,
                            etcd=EtcdOptions(user="root", password="secret", timeout=30.0))
        mon.start()
        assert not mon.wait_ready(0.5)
        started = time.monotonic()
        assert mon.stop(timeout=2)
        assert time.monotonic() - started < 2.5
    finally:
        fresh_etcd.resume()


# --- 7. stop() during the first NATS subscribe ---------------------------------------------

def test_stop_during_first_nats_subscribe(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    proxy = CuttableProxy(int(nats_server.url.rsplit(":", 1)[1]))
    proxy.stall_after(b"SUB ")  # the server hangs right after the client subscribes
    try:
        mon = WorkerMonitor([etcd_server.url], [f"nats://127.0.0.1:{proxy.port}"], namespace=namespace)
        mon.start()
        assert proxy.stalled.wait(10)
        started = time.monotonic()
        assert mon.stop(timeout=1)
        assert time.monotonic() - started < 1.5
    finally:
        proxy.close()


# --- a reducer held in a callback (for the bounds below) -------------------------------------

def _block_the_reducer(mon: WorkerMonitor, etcd: Any, namespace: str,
                       publisher: RawNatsPublisher) -> "tuple[Any, threading.Event]":
    """Start ``mon`` with one worker and hold its reducer inside a callback (the worker went busy).

    Returns the worker's lease and the event that lets the callback return.
    """
    lease = etcd.lease(60)
    etcd.put(card_key(namespace, lease.id), card_json(1000), lease=lease)
    mon.start()
    assert mon.wait_ready(10)
    assert mon.wait_for(lambda: mon.members() == {lease.id}, 10)
    entered, release = threading.Event(), threading.Event()

    def block(change: BusyChange) -> None:
        if change.became_busy:
            entered.set()
            release.wait(30)

    mon.on_busy_change(block)
    publisher.publish(f"namespace.{namespace}.kv_metrics", active_load(lease.id, kv_used_blocks=990))
    publisher.flush()
    assert entered.wait(10)
    return lease, release


# --- 8. etcd events and wake-ups are bounded while a callback blocks ------------------------

def test_queue_bounded_while_a_callback_blocks(
    make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher
) -> None:
    mon = make_monitor(limits=Limits(max_queued_messages=10))
    lease, release = _block_the_reducer(mon, etcd, namespace, publisher)
    try:
        keys = [card_key(namespace, 0x100000 + i) for i in range(3000)]
        for key in keys:
            etcd.put(key, card_json(10))
        for i in range(5000):
            mon.set_thresholds(busy_threshold=0.5 + (i % 2) / 10)
        # Everything etcd sent has reached the source (it waits for room, or resyncs).
        peak = mon.health().reducer["queued_items"]
        assert peak <= 10 + 2, (peak, [type(x).__name__ for x in list(mon._queue.queue)], mon.health())
    finally:
        release.set()
    assert mon.wait_for(lambda: len(mon.members()) == 3001, 30)
    assert mon.health().etcd.counters.get("backlog_resyncs", 0) >= 1
    for key in keys:
        etcd.delete(key)
    lease.revoke()


# --- 9. oversized payloads never wait in memory; queued bytes are bounded -------------------

def test_oversized_dropped_before_queueing_and_bytes_bounded(
    make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher
) -> None:
    mon = make_monitor(limits=Limits(max_load_bytes=60_000, max_queued_bytes=200_000))
    lease, release = _block_the_reducer(mon, etcd, namespace, publisher)
    subject = f"namespace.{namespace}.kv_metrics"
    try:
        big = active_load(lease.id, kv_used_blocks=5, pad="x" * 900_000)
        for _ in range(30):
            publisher.publish(subject, big)
        fill = active_load(lease.id, kv_used_blocks=5, pad="y" * 50_000)
        for _ in range(20):
            publisher.publish(subject, fill)
        publisher.flush()
        assert wait_until(lambda: mon.health().nats.counters.get("dropped_backlog", 0) > 0)
        h = mon.health()
        assert h.reducer["queued_bytes"] <= 200_000
        assert h.nats.counters["malformed_oversized"] == 30
        assert "malformed_load_oversized" not in h.reducer  # counted once, where it was dropped
    finally:
        release.set()
    lease.revoke()




# --- 10. compaction between pages is a resync; last_error is cleared -------------------------

def test_compaction_between_listing_pages_is_a_resync(
    make_monitor: Make, etcd: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workermon._sources.etcd as etcd_mod

    keys = [card_key(namespace, 0x200 + i) for i in range(7)]
    for key in keys:
        etcd.put(key, card_json(10))
    compacted = threading.Event()

    def compact_once(self: EtcdSource) -> None:
        if not compacted.is_set():
            compacted.set()
            etcd.put(f"v1/other/{namespace}", "x")
            etcd.compact(etcd.get(f"v1/other/{namespace}")[1].mod_revision)

    monkeypatch.setattr(etcd_mod, "_PAGE", 2)
    monkeypatch.setattr(EtcdSource, "_between_pages", compact_once)
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    assert compacted.is_set()
    assert mon.members() == {0x200 + i for i in range(7)}
    h = mon.health().etcd
    assert h.counters.get("errors", 0) == 0 and h.counters["resyncs"] == 1 and h.last_error is None
    for key in keys:
        etcd.delete(key)


def test_last_error_cleared_after_recovery(fresh_etcd: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    fresh_etcd.kill()
    mon = WorkerMonitor([fresh_etcd.url], [nats_server.url], namespace=namespace, reconnect=Reconnect(cap=0.3))
    mon.start()
    try:
        assert wait_until(lambda: mon.health().etcd.last_error is not None)
        fresh_etcd.restart()
        assert mon.wait_ready(15)
        assert mon.health().etcd.last_error is None
    finally:
        assert mon.stop(5)


# --- 11. the first NATS connect is counted and backs off ------------------------------------

def test_first_nats_connect_failures_are_counted(etcd_server: EtcdServer, namespace: str) -> None:
    mon = WorkerMonitor([etcd_server.url], [f"nats://127.0.0.1:{free_port()}"], namespace=namespace,
                        reconnect=Reconnect(initial=0.05, cap=0.2))
    mon.start()
    try:
        assert wait_until(lambda: mon.health().nats.counters.get("connect_failures", 0) >= 3)
        assert mon.health().nats.state == "connecting"
    finally:
        assert mon.stop(5)


# --- also: stop() applies everything queued before its sentinel ----------------------------

def test_stop_applies_everything_queued_before_it(
    make_monitor: Make, etcd: Any, namespace: str, publisher: RawNatsPublisher
) -> None:
    mon = make_monitor()
    lease, release = _block_the_reducer(mon, etcd, namespace, publisher)
    keys = [card_key(namespace, 0x300000 + i) for i in range(700)]
    for key in keys:
        etcd.put(key, card_json(10))
    try:
        assert wait_until(lambda: mon.health().reducer["queued_card_events"] == 700), mon.health()
        stopper = threading.Thread(target=mon.stop, kwargs={"timeout": 10})
        stopper.start()
        assert wait_until(lambda: mon._stopping.is_set())
    finally:
        release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert len(mon.members()) == 701
    for key in keys:
        etcd.delete(key)
    lease.revoke()


# --- also: static-mode callbacks run one at a time ------------------------------------------

def test_static_mode_callbacks_never_run_concurrently() -> None:
    mon = WorkerMonitor(etcd_endpoints=None).start()
    inside: List[int] = [0]
    peak: List[int] = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def callback(change: BusyChange) -> None:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        retry_pause(0.02)  # widen the window in which a second one could overlap
        with lock:
            inside[0] -= 1

    def register() -> None:
        barrier.wait(5)
        mon.on_busy_change(callback)

    threads = [threading.Thread(target=register) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 1
    mon.stop()


def test_set_thresholds_after_stop_queues_nothing(make_monitor: Make) -> None:
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    assert mon.stop(5)
    for _ in range(1000):
        mon.set_thresholds(busy_threshold=0.8)
        mon.on_busy_change(lambda c: None)
    assert mon._queue.qsize() <= 1



