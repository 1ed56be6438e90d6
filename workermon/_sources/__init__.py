"""The source threads, side by side behind one declared shape: etcd (cards and event channels),
NATS and ZMQ (load reports), and the backlog that bounds what each hands the reducer.

Every source is a :class:`Source`: a daemon thread named ``workermon-<name>``
that runs until the monitor's stop event is set, can be woken from any thread
(:meth:`Source.wake`), keeps its :class:`~workermon._health.SourceStatus`,
reports a failure once per distinct error (:meth:`Source.note_error`), and
answers its own :meth:`Source.health` — its counters together with what
waits in its backlog.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Collection, Dict, Optional, Tuple

import attrs

from .._health import SourceHealth, SourceStatus
from .._parse import Malformed
from .backlog import Backlog

__all__ = ["Source", "SourceConfigs", "Sources", "build_sources", "source_configs"]


class Source(threading.Thread):
    """One source thread (see the package docstring)."""

    def __init__(self, name: str, stopping: threading.Event, status: SourceStatus, backlog: Backlog) -> None:
        super().__init__(name=f"workermon-{name}", daemon=True)
        self._stopping = stopping
        self.status = status
        self.backlog = backlog
        self._last_error_logged: Optional[str] = None
        self._malformed_warned: set[str] = set()

    def wake(self, deadline: Optional[float] = None) -> None:
        """Make the thread notice the stop event soon (any thread; never blocks)."""
        raise NotImplementedError

    def health(self) -> SourceHealth:
        """Its status, with the load waiting in its backlog (``queued_items``, ``queued_bytes``)."""
        view = self.status.view()
        return attrs.evolve(view, counters={**view.counters, "queued_items": self.backlog.items,
                                            "queued_bytes": self.backlog.nbytes})

    def note_error(self, text: str, log: logging.Logger, level: int = logging.WARNING,
                   exc: Optional[BaseException] = None, message: Optional[str] = None) -> None:
        """Count a failure and keep ``text`` as ``last_error``; log ``message`` (default ``text``) once
        per distinct error, not once per retry."""
        self.status.inc("errors")
        self.status.last_error = text
        if text != self._last_error_logged:
            self._last_error_logged = text
            log.log(level, "%s", message or text, exc_info=exc)

    def count_malformed(self, exc: Malformed, log: logging.Logger, what: str) -> None:
        """Count a dropped message (``malformed``, ``malformed_<reason>``); warn once per reason."""
        self.status.inc("malformed")
        self.status.inc(f"malformed_{exc.reason}")
        if exc.reason not in self._malformed_warned:
            self._malformed_warned.add(exc.reason)
            log.warning("dropping a malformed %s (%s); further ones are only counted", what, exc)

    def recovered(self) -> None:
        """Connected again: the next error is logged even if it is the last one again."""
        self.status.state = "connected"
        self.status.last_error = None
        self._last_error_logged = None


@attrs.frozen
class SourceConfigs:
    """Each source's own configuration, derived from a resolved ``MonitorConfig`` (None: not used)."""

    etcd: Optional[Any]
    nats: Optional[Any]
    zmq: Optional[Any]
    # The KV events on NATS (kv_index=True): the same connection settings, their own subjects.
    nats_kv: Optional[Any] = None
    kv_stream_prefix: str = ""


def source_configs(cfg: Any) -> SourceConfigs:
    """What each source needs of a resolved :class:`~workermon._config.MonitorConfig`."""
    from .etcd import EtcdConfig
    from .nats import NatsConfig
    from .zmq import ZmqConfig

    lim = cfg.limits
    zmq = None
    if cfg.zmq:
        zmq = ZmqConfig(namespace=cfg.namespace, component=cfg.component, endpoint=cfg.endpoint,
                        broker=cfg.zmq_broker, max_load_bytes=lim.max_load_bytes)
    if cfg.static:
        return SourceConfigs(None, None, zmq)
    e, tls = cfg.etcd, cfg.etcd.tls
    etcd = EtcdConfig(
        endpoints=cfg.etcd_endpoints, prefix=cfg.card_prefix,
        ca_cert=tls.ca if tls else None, cert_key=tls.key if tls else None, cert_cert=tls.cert if tls else None,
        user=e.user, password=e.password, timeout=e.timeout, max_card_bytes=lim.max_card_bytes,
        backoff_initial=cfg.reconnect.initial, backoff_cap=cfg.reconnect.cap,
    )
    nats = None
    if cfg.nats_servers is not None:
        n, tls = cfg.nats, cfg.nats.tls
        auth = n.auth  # one way, in Dynamo's order
        nats = NatsConfig(
            servers=cfg.nats_servers, subjects=cfg.subjects,
            user=n.user if auth == "user" else None, password=n.password if auth == "user" else None,
            token=n.token if auth == "token" else None, nkey=n.nkey if auth == "nkey" else None,
            credentials_file=n.credentials if auth == "credentials" else None,
            tls_ca=tls.ca if tls else None, tls_cert=tls.cert if tls else None, tls_key=tls.key if tls else None,
            pending_msgs_limit=n.pending_msgs_limit, backoff_initial=cfg.reconnect.initial,
            backoff_cap=cfg.reconnect.cap,
        )
    nats_kv = None if nats is None else attrs.evolve(nats, subjects=cfg.kv_subjects)
    return SourceConfigs(etcd, nats, zmq, nats_kv, cfg.kv_stream_prefix)


@attrs.frozen
class Sources:
    """The source threads of one monitor (not started)."""

    etcd: Any
    nats: Optional[Any]
    zmq: Optional[Any]
    kv: Optional[Any] = None
    kv_nats: Optional[Any] = None

    def all(self) -> Tuple[Source, ...]:
        return tuple(s for s in (self.etcd, self.nats, self.zmq, self.kv, self.kv_nats) if s is not None)


def build_sources(cfgs: SourceConfigs, put: Callable[[object], None], stopping: threading.Event,
                  statuses: Dict[str, SourceStatus], on_ready: Dict[str, Callable[[], None]], limits: Any,
                  nats_required: bool, kv_index: Any = None, kv_max_bytes: int = 4 << 20,
                  kv_members: Optional[Callable[[], Collection[int]]] = None,
                  kv_changed: Callable[[], None] = lambda: None) -> Sources:
    """Make the source threads for one monitor: each hands its updates to ``put`` through a backlog of its own.

    With the ZMQ plane in direct mode the etcd source also lists and watches
    the ``kv_metrics`` event channels, which it hands to the ZMQ source; with
    ``kv_index`` also the ``kv-events`` channels, for the KV-events source
    (which writes ``kv_index``; status ``statuses["kv"]``).  With NATS and
    ``kv_index`` a second KV-events source follows them on NATS (status
    ``statuses["kv-nats"]``; ``kv_members`` says who is a member now).  Both
    call ``kv_changed`` after they change the index.
    """
    from .._model import ChannelDelete, ChannelListing
    from .._parse import parse_channel
    from .etcd import EtcdSource, Watched
    from .nats import NatsSource
    from .zmq import ZmqSource
    from .._parse import EVENT_CHANNELS

    assert cfgs.etcd is not None
    extra = []
    zmq = None
    if cfgs.zmq is not None:
        z = cfgs.zmq
        zmq = ZmqSource(z, put, Backlog(limits.max_queued_messages, limits.max_queued_bytes), stopping,
                        on_ready["zmq"], statuses["zmq"])
        if not z.broker:
            max_bytes = cfgs.etcd.max_card_bytes
            # Every layout Dynamo has used (1.3's and 1.4+'s) is under one prefix; the parser
            # keeps this scope's kv_metrics channels and names a layout it does not know.
            extra.append(Watched(
                name="channel",
                prefix=EVENT_CHANNELS,
                parse=lambda k, v, lease, _created: parse_channel(k, v, lease, max_bytes, z.namespace, z.component,
                                                                 z.endpoint),
                delete=lambda key: ChannelDelete(key=key),
                listing=lambda items, rev, bad: ChannelListing(channels=items, revision=rev, malformed_keys=bad),
                emit=zmq.channel_update,
                backlogged=False,
            ))
    kv = None
    if kv_index is not None and cfgs.zmq is not None:
        from .._parse import KV_EVENTS
        from .kvevents import KvEventsSource

        kz = attrs.evolve(cfgs.zmq, topic=KV_EVENTS, max_load_bytes=kv_max_bytes)
        kv = KvEventsSource(kz, kv_index, stopping, on_ready.get("kv", lambda: None), statuses["kv"], kv_changed,
                            kv_members)
        if not kz.broker:  # direct mode: the kv-events channels say where to connect
            max_bytes_kv = cfgs.etcd.max_card_bytes
            extra.append(Watched(
                name="kv-channel",
                prefix=EVENT_CHANNELS,
                parse=lambda k, v, lease, _created: parse_channel(k, v, lease, max_bytes_kv, kz.namespace,
                                                                 kz.component, kz.endpoint, topic_name=KV_EVENTS),
                delete=lambda key: ChannelDelete(key=key),
                listing=lambda items, rev, bad: ChannelListing(channels=items, revision=rev, malformed_keys=bad),
                emit=kv.channel_update,
                backlogged=False,
            ))
    etcd = EtcdSource(cfgs.etcd, put, stopping, statuses["etcd"], Backlog(limits.max_queued_messages), extra)
    nats = None
    if cfgs.nats is not None:
        nats = NatsSource(cfgs.nats, put, Backlog(limits.max_queued_messages, limits.max_queued_bytes), stopping,
                          on_ready["nats"], statuses["nats"], limits.max_load_bytes, report_feed=nats_required)
    kv_nats = None
    if kv_index is not None and cfgs.nats_kv is not None:
        from .kvevents import KvNatsSource

        assert kv_members is not None
        kv_nats = KvNatsSource(cfgs.nats_kv, kv_index, kv_members, cfgs.kv_stream_prefix, stopping,
                               statuses["kv-nats"], kv_max_bytes, report_errors=nats_required, on_change=kv_changed)
    return Sources(etcd, nats, zmq, kv, kv_nats)
