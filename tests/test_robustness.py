"""Fork, blocking callbacks, stop bounds and thread supervision, with real servers."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, List

import pytest

from workermon import BusyChange, Thresholds, WorkerMonitor
from workermon._servers import EtcdServer, NatsServer

from .conftest import Changes
from .helpers import Make, RawNatsPublisher, active_load, card_json, card_key



def subject(ns: str) -> str:
    return f"namespace.{ns}.kv_metrics"


def test_forked_child_does_not_pretend(make_monitor: Make, etcd: Any, namespace: str) -> None:
    etcd.put(card_key(namespace, 0xF1), card_json(10))
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    assert mon.members() == {0xF1}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the monitor has no threads
        code = 0
        try:
            try:
                mon.busy_workers()
                code = 10
            except RuntimeError as exc:
                code = 0 if "post_fork" in str(exc) and "fork()" in str(exc) else 11
            try:
                mon.load_states()
                code = code or 12
            except RuntimeError:
                pass
            if mon.health().alive:
                code = code or 13
            if mon.stop(timeout=1) is not True:   # e.g. an atexit hook in the child
                code = code or 14
            os.write(w, b"ok")
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 2) == b"ok"
    os.close(r)
    assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)
    # The parent is unaffected.
    assert mon.members() == {0xF1} and mon.health().alive
    etcd.delete(card_key(namespace, 0xF1))


def test_blocking_callback_does_not_stall_reads(make_monitor: Make, etcd: Any, publisher: RawNatsPublisher,
                                                namespace: str) -> None:
    etcd.put(card_key(namespace, 0xF2), card_json(100))
    etcd.put(card_key(namespace, 0xF3), card_json(100))
    mon = make_monitor()
    entered = threading.Event()
    release = threading.Event()

    @mon.on_busy_change
    def slow(change: BusyChange) -> None:
        entered.set()
        release.wait(1.0)   # blocks the reducer for a second

    mon.start()
    assert mon.wait_ready(10)
    publisher.publish(subject(namespace), active_load(0xF2, kv_used_blocks=99))
    publisher.flush()
    assert entered.wait(10)
    # While the callback blocks: reads answer at once from the snapshot...
    worst = 0.0
    for _ in range(2000):
        t0 = time.perf_counter()
        mon.is_busy(0xF2)
        mon.free_workers()
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05, worst
    assert mon.is_busy(0xF2)
    # ...and updates that arrive meanwhile wait in the bounded queue, then apply.
    publisher.publish(subject(namespace), active_load(0xF3, kv_used_blocks=99))
    publisher.flush()
    release.set()
    assert mon.wait_for(lambda: mon.is_busy(0xF3), 5)
    # stop() from another thread returns within its timeout even mid-callback.
    release.clear()
    entered.clear()
    publisher.publish(subject(namespace), active_load(0xF3, kv_used_blocks=1))
    publisher.flush()
    assert entered.wait(10)
    t0 = time.monotonic()
    mon.stop(timeout=0.3)
    assert time.monotonic() - t0 < 0.6
    release.set()
    for t in mon._threads:
        t.join(5)
    etcd.delete(card_key(namespace, 0xF2))
    etcd.delete(card_key(namespace, 0xF3))


def test_stop_within_timeout_while_servers_are_down(namespace: str) -> None:
    etcd, nats = EtcdServer(), NatsServer()
    etcd.start()
    nats.start()
    mon = WorkerMonitor([etcd.url], [nats.url], namespace=namespace)
    try:
        mon.start()
        assert mon.wait_ready(10)
        etcd.kill()
        nats.kill()
        assert mon.wait_for(lambda: mon.health().nats.state != "connected"
                            and mon.health().etcd.state != "connected", 10)
        for timeout in (0.5,):
            t0 = time.monotonic()
            assert mon.stop(timeout=timeout)
            assert time.monotonic() - t0 < timeout + 0.5
    finally:
        mon.stop()
        etcd.close()
        nats.close()


def test_unexpected_source_failure_is_restarted(make_monitor: Make, etcd: Any, namespace: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    import workermon._sources.etcd as etcd_mod

    real = etcd_mod.parse_card
    failures: List[int] = []

    def flaky(*args: Any, **kw: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected bug")
        return real(*args, **kw)

    monkeypatch.setattr(etcd_mod, "parse_card", flaky)
    etcd.put(card_key(namespace, 0xF4), card_json(10))
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    assert mon.members() == {0xF4}
    h = mon.health()
    assert h.etcd.counters.get("restarts") == 1 and h.alive
    assert any("restarting" in r.message and r.levelname == "ERROR" for r in caplog.records)
    etcd.delete(card_key(namespace, 0xF4))


def test_reducer_failure_on_one_update_keeps_the_rest(make_monitor: Make, etcd: Any, namespace: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from workermon._reduce import FleetState

    real = FleetState.apply_card_put

    def flaky(self: FleetState, put: Any, now: float) -> None:
        if put.worker_id == 0xF5:
            raise RuntimeError("injected bug")
        real(self, put, now)

    monkeypatch.setattr(FleetState, "apply_card_put", flaky)
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    etcd.put(card_key(namespace, 0xF5), card_json(10))
    etcd.put(card_key(namespace, 0xF6), card_json(10))
    assert mon.wait_for(lambda: mon.members() == {0xF6}, 10)
    assert mon.health().reducer["reducer_errors"] == 1 and mon.health().alive
    etcd.delete(card_key(namespace, 0xF5))
    etcd.delete(card_key(namespace, 0xF6))


def test_outage_policy_with_real_nats(etcd_server: EtcdServer, namespace: str, changes: Changes) -> None:
    nats = NatsServer()
    nats.start()
    from .helpers import etcd_client

    client = etcd_client(etcd_server.url)
    client.put(card_key(namespace, 0xF7), card_json(100))
    mon = WorkerMonitor([etcd_server.url], [nats.url], namespace=namespace,
                        thresholds=Thresholds(outage_policy="busy", outage_grace=0.5))
    mon.on_busy_change(changes)
    try:
        mon.start()
        assert mon.wait_ready(10)
        nats.kill()
        c = changes.get(timeout=10)          # fail closed after the grace
        assert c.became_busy == {0xF7}
        nats.start()
        c = changes.get(timeout=10)          # the rule again as soon as the feed is back
        assert c.became_free == {0xF7}
    finally:
        mon.stop()
        nats.close()
        client.delete(card_key(namespace, 0xF7))
        client.close()
