"""Prometheus metrics for a WorkerMonitor or a SharedMonitor (``pip install 'workermon[prometheus]'``).

    from workermon.prometheus import register
    register(monitor)                      # the default registry; serve it as you do today

Everything is collected at scrape time from the snapshot, ``load_states()`` and
``health()``: nothing is done per load report.  A worker's series disappear
when it leaves the fleet, so cardinality is bounded by the fleet.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

__all__ = ["WorkerMonitorCollector", "register"]


class WorkerMonitorCollector(Collector):
    """Collects ``workermon_*`` families from ``monitor`` at each scrape."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def describe(self) -> List[Metric]:
        return []  # families depend on the fleet; collected (not described) at registration

    def collect(self) -> Iterator[Metric]:
        mon = self.monitor
        h = mon.health()
        members = mon.members()
        busy = mon.busy_workers()
        yield _gauge("workermon_members", "Workers with a card in etcd.", len(members))
        yield _gauge("workermon_busy_workers", "Members that are busy.", len(busy))
        yield _gauge("workermon_ready", "1 once the monitor is ready.", 1.0 if h.ready else 0.0)
        try:
            states = mon.load_states()
        except Exception:  # noqa: BLE001 - a SharedMonitor whose agent is away: the rest still scrapes
            states = {}
        w_busy = GaugeMetricFamily("workermon_worker_busy", "1 when the worker is busy.", labels=["worker_id"])
        total = GaugeMetricFamily("workermon_worker_kv_total_blocks", "KV-cache capacity per rank (the card).",
                                  labels=["worker_id"])
        used = GaugeMetricFamily("workermon_worker_kv_used_blocks", "Active KV blocks the rule acts on, per rank.",
                                 labels=["worker_id", "dp_rank"])
        util = GaugeMetricFamily("workermon_worker_kv_utilization_ratio", "Used / total KV blocks, per rank.",
                                 labels=["worker_id", "dp_rank"])
        age = GaugeMetricFamily("workermon_worker_last_report_age_seconds", "Seconds since the newest report.",
                                labels=["worker_id"])
        inflight = GaugeMetricFamily("workermon_worker_reservations_in_flight",
                                     "Reservations held on the worker (a SharedMonitor: by this process).",
                                     labels=["worker_id"])
        for wid, st in states.items():
            w = f"{wid:x}"
            w_busy.add_metric([w], 1.0 if st.busy else 0.0)
            if st.kv_total_blocks is not None:
                total.add_metric([w], float(st.kv_total_blocks))
            for rank, blocks in st.kv_active_blocks.items():
                used.add_metric([w, str(rank)], float(blocks))
                if st.kv_total_blocks:
                    util.add_metric([w, str(rank)], blocks / st.kv_total_blocks)
            if st.last_report_age is not None:
                age.add_metric([w], st.last_report_age)
            inflight.add_metric([w], float(mon.in_flight(wid)))
        yield from (w_busy, total, used, util, age, inflight)
        yield _counter("workermon_busy_set_changes", "Changes of the busy set.", mon.version)
        r = h.reducer
        yield _counter("workermon_load_reports", "Load reports applied.", r.get("load_reports", 0))
        malformed = CounterMetricFamily("workermon_malformed_input", "Malformed input, counted and dropped.",
                                        labels=["source", "reason"])
        dropped = CounterMetricFamily("workermon_dropped_messages", "Messages dropped before they were applied.",
                                      labels=["reason"])
        reconnects = CounterMetricFamily("workermon_reconnects", "Reconnects per source.", labels=["source"])
        resyncs = CounterMetricFamily("workermon_resyncs", "Fresh listings after compaction or backlog.",
                                      labels=["source"])
        up = GaugeMetricFamily("workermon_source_up", "1 when the source is connected.", labels=["source"])
        for key, n in r.items():
            if key.startswith("malformed_load_"):
                malformed.add_metric(["reducer", key[len("malformed_load_"):]], n)
        for key in ("dropped_rank_out_of_range", "dropped_rank_limit", "pending_dropped", "stale_revision"):
            if r.get(key):
                dropped.add_metric([key], r[key])
        for src in (h.etcd, h.nats, h.zmq):
            up.add_metric([src.name], 1.0 if src.state == "connected" else 0.0)
            for key, n in src.counters.items():
                if key.startswith("malformed_"):
                    malformed.add_metric([src.name, key[len("malformed_"):]], n)
                elif key in ("dropped_backlog", "dropped_slow_consumer", "duplicates"):
                    dropped.add_metric([f"{src.name}_{key}"], n)
            reconnects.add_metric([src.name], src.counters.get("reconnects", 0))
            resyncs.add_metric([src.name], src.counters.get("resyncs", 0))
        yield from (malformed, dropped, reconnects, resyncs, up)
        reservations = CounterMetricFamily("workermon_reservations", "reserve() outcomes.", labels=["result"])
        for result in ("reserved", "released", "expired", "rejected"):
            reservations.add_metric([result], h.picker.get(result, 0))
        yield reservations
        yield _gauge("workermon_reservations_in_flight", "Reservations held now.", h.picker.get("in_flight", 0))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


def register(monitor: Any, registry: Optional[CollectorRegistry] = None) -> WorkerMonitorCollector:
    """Register a collector for ``monitor`` (default: prometheus_client's global registry)."""
    collector = WorkerMonitorCollector(monitor)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector


def serve(monitor: Any, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` for ``monitor`` on ``host:port`` from a daemon thread (a registry of its own)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    register(monitor, registry)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread
