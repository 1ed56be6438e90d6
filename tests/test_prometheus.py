"""Prometheus metrics: scraped over HTTP and parsed with prometheus_client's own parser; and a real
Prometheus server scraping `workermon agent` (skipped with its reason where Debian's package is absent)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Dict, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from workermon import Limits, WorkerPublisher
from workermon._servers import EtcdServer, NatsServer, free_port
from workermon.prometheus import serve

from .helpers import Make, retry_pause



def scrape(port: int) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_follow_the_fleet(make_monitor: Make, etcd_server: EtcdServer, nats_server: NatsServer,
                                  namespace: str) -> None:
    pubs = [WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100,
                            load_format="active_load").start() for _ in range(2)]
    mon = make_monitor()
    mon.start()
    port = free_port()
    server, thread = serve(mon, port)
    try:
        assert mon.wait_ready(10) and mon.wait_for(lambda: len(mon.members()) == 2, 10)
        pubs[0].report(95)
        pubs[1].report(40)
        assert mon.wait_for(lambda: mon.busy_workers() == {pubs[0].worker_id}, 10)
        with mon.reserve(exclude=(pubs[0].worker_id,)) as r:  # type: ignore[union-attr]
            m = scrape(port)
            assert r.worker_id == pubs[1].worker_id
        states = mon.load_states()
        assert m[("workermon_members", ())] == 2 and m[("workermon_busy_workers", ())] == 1
        for pub in pubs:
            w = f"{pub.worker_id:x}"
            st = states[pub.worker_id]
            assert m[("workermon_worker_busy", (("worker_id", w),))] == (1.0 if st.busy else 0.0)
            assert m[("workermon_worker_kv_total_blocks", (("worker_id", w),))] == st.kv_total_blocks
            assert m[("workermon_worker_kv_used_blocks", (("dp_rank", "0"), ("worker_id", w)))] == \
                st.kv_active_blocks[0]
            assert m[("workermon_worker_kv_utilization_ratio", (("dp_rank", "0"), ("worker_id", w)))] == \
                pytest.approx(st.kv_active_blocks[0] / 100)
            assert ("workermon_worker_last_report_age_seconds", (("worker_id", w),)) in m
        assert m[("workermon_worker_reservations_in_flight", (("worker_id", f"{pubs[1].worker_id:x}"),))] == 1
        assert m[("workermon_reservations_total", (("result", "reserved"),))] == 1
        assert m[("workermon_busy_set_changes_total", ())] == mon.version
        assert m[("workermon_load_reports_total", ())] >= 2
        assert m[("workermon_source_up", (("source", "etcd"),))] == 1
        # A worker that leaves the fleet takes its series with it.
        gone = f"{pubs[0].worker_id:x}"
        pubs[0].stop()
        assert mon.wait_for(lambda: len(mon.members()) == 1, 10)
        m = scrape(port)
        assert not [k for k in m if dict(k[1]).get("worker_id") == gone]
        assert m[("workermon_members", ())] == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        for pub in pubs[1:]:
            pub.stop()


def test_watch_serves_metrics_on_loopback(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workermon", "watch", "--etcd", etcd_server.url, "--nats",
                             nats_server.url, "--namespace", namespace, "--json", "--metrics-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                m = scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline
                retry_pause(0.1)
        assert m[("workermon_members", ())] == 0 and m[("workermon_ready", ())] in (0.0, 1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


def _prometheus_bin() -> str:
    path = os.environ.get("WORKERMON_PROMETHEUS_BIN") or shutil.which("prometheus")
    if not path:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus; or set WORKERMON_PROMETHEUS_BIN)")
    return path


def test_real_prometheus_scrapes_the_agent(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    binary = _prometheus_bin()
    work = tempfile.mkdtemp(prefix="wm-prom-")
    metrics_port, prom_port = free_port(), free_port()
    config = os.path.join(work, "prometheus.yml")
    with open(config, "w") as f:
        f.write(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: workermon\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    agent = subprocess.Popen([sys.executable, "-m", "workermon", "agent", "--etcd", etcd_server.url, "--nats",
                              nats_server.url, "--namespace", namespace, "--socket", os.path.join(work, "s", "a.sock"),
                              "--metrics-port", str(metrics_port)], stderr=subprocess.DEVNULL)
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={work}/data",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100,
                          load_format="active_load").start()

    def query() -> Any:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": "workermon_busy_workers"})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                result = json.loads(r.read())["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    def until(value: float, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if query() == value:
                return True
            retry_pause(0.5)  # Prometheus scrapes once a second: poll its API
        return False

    try:
        assert until(0.0), "Prometheus never saw workermon_busy_workers"
        pub.report(95)
        assert until(1.0), "workermon_busy_workers did not follow the worker going busy"
        pub.report(5)
        assert until(0.0), "workermon_busy_workers did not follow the worker going free"
    finally:
        pub.stop()
        for p in (prom, agent):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


def test_one_oversized_message_is_counted_once(make_monitor: Make, nats_server: NatsServer, namespace: str) -> None:
    from .helpers import RawNatsPublisher, active_load

    mon = make_monitor(limits=Limits(max_load_bytes=1024))
    mon.start()
    port = free_port()
    server, thread = serve(mon, port)
    try:
        assert mon.wait_ready(10)
        with RawNatsPublisher(nats_server.url) as pub:
            pub.publish(f"namespace.{namespace}.kv_metrics", active_load(0x1234, kv_used_blocks=1, pad="x" * 4096))
            pub.publish(f"namespace.{namespace}.kv_metrics", b"{not json")
        assert mon.wait_for(lambda: mon.health().nats.counters.get("malformed_oversized", 0) == 1
                            and mon.health().reducer.get("malformed_load", 0) == 1, 10)
        m = scrape(port)
        malformed = {labels: v for (name, labels), v in m.items() if name == "workermon_malformed_input_total"}
        assert sum(malformed.values()) == 2, malformed
        assert malformed[(("reason", "oversized"), ("source", "nats"))] == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
