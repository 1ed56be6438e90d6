"""The KV-events source threads: what each worker caches, for ``WorkerMonitor(kv_index=True)``.

``workermon-kv-events`` follows the ``kv-events`` event channels the etcd
source finds (Dynamo 1.6's ZMQ plane) exactly as the ZMQ
source follows ``kv_metrics``: one ZMTP subscriber, connected to each
channel's endpoint while its key exists (through a ZMQ broker: to the
brokers, taking the ``…kv-events`` subjects).  Each message is checked against the
4-frame layout, its payload decoded and applied to the :class:`KvIndex` in
arrival order (the index has its own lock; the busy rule's reducer is not
involved).  A channel whose key goes (lease expiry, deregistration) takes its
worker's blocks out of the index.  Bad messages are counted and dropped.

``workermon-kv-events-nats`` follows them where a fleet publishes them on NATS
(``DYN_EVENT_PLANE=nats``; before 1.3 there was no other plane), on its own
connection and loop, in each layout Dynamo has used (measured on 0.9.1 and
1.0.2–1.6.1): the endpoint-scoped subject with an envelope holding an array
of events (1.4 on), the component-scoped subject with an envelope holding one
event (1.0–1.3), and, in 0.9, one JSON event per message on the subject of a
JetStream stream (read as a plain subscriber: nothing is created on the
server, and what was published before it connected is not replayed — those
workers' views start incomplete).  Only members' events are applied (a late
message of a worker that left cannot bring its blocks back), and when the
member set changes the index lets go of workers that are no longer members:
on NATS (and through a ZMQ broker) nothing else says a worker left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Collection, List, NamedTuple, Optional, Tuple, Union

import msgspec

from .._health import SourceStatus
from .._kvindex import KvIndex, KvItem, decode_kv_json, decode_kv_payload
from .._parse import KV_EVENTS, Malformed, parse_kv_envelope
from .backlog import Backlog
from .nats import NatsConfig, NatsSource
from .zmq import ZmqConfig, ZmqSource
from .zmtp import Subscriber

log = logging.getLogger(__name__)

__all__ = ["KvEventsSource", "KvMessage", "KvNatsSource", "KvSource", "decode_nats_kv", "members_only", "prune_departed"]


class KvEventsSource(ZmqSource):
    """``workermon-kv-events``: applies every worker's KV events to ``index``.

    In direct mode it follows the ``kv-events`` channels; through a broker
    (which registers no channels) it takes the ``…kv-events`` subjects of its
    scope, applies only members' events (``members()``, any thread) and lets
    departed workers' blocks go when the member set changes.
    """

    def __init__(self, cfg: ZmqConfig, index: KvIndex, stopping: threading.Event, on_ready: Callable[[], None],
                 status: SourceStatus, on_change: Callable[[], None] = lambda: None,
                 members: Optional[Callable[[], Collection[int]]] = None) -> None:
        super().__init__(cfg, lambda _item: None, Backlog(1), stopping, on_ready, status)
        self.name = "workermon-kv-events"
        self.index = index
        self._on_change = on_change  # the index changed: wakes the monitor's wait_for()
        self._members = members if cfg.broker else None
        self._prune_wanted = False

    def members_changed(self) -> None:
        """The monitor's member set changed (any thread; never blocks)."""
        if self._members is not None:
            self._prune_wanted = True
            self._poke()

    def _apply_inbox(self, sub: Subscriber) -> None:
        if self._prune_wanted and self._members is not None:
            self._prune_wanted = False  # before reading the members: a later change pokes again
            if prune_departed(self.index, self._members()):
                self._on_change()
        super()._apply_inbox(sub)

    def _drop_channel(self, sub: Subscriber, key: str) -> None:
        channel = self._channels.get(key)
        super()._drop_channel(sub, key)
        if channel is not None and not any(c.worker_id == channel.worker_id for c in self._channels.values()):
            self.index.drop_worker(channel.worker_id)  # the worker left: its blocks go with it
            self._on_change()

    def _accept(self, messages: List[List[bytes]], errors: List[str]) -> None:
        status = self.status
        members = self._members() if self._members is not None else None
        for msg in self._checked(messages, errors):
            try:
                items = decode_kv_payload(msg.payload)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                self._malformed(Malformed("bad_payload", str(exc)[:200]))
                continue
            if members is not None:
                items = members_only(items, members, status)
            if items:
                # Through several brokers a message comes once per broker: the index drops the
                # repeats by event id (``index_duplicates``).
                self.index.apply(items, msg.publisher_id)
        received = len(messages) + len(errors)
        if received:
            status.inc("messages", received)
            status.event()
            self._on_change()


def members_only(items: List[KvItem], members: Collection[int], status: SourceStatus) -> List[KvItem]:
    """The events of workers that are members (a late message of a worker that left cannot bring its
    blocks back); the rest counted as ``not_members``."""
    kept = [item for item in items if item.worker_id in members]
    if len(kept) < len(items):
        status.inc("not_members", len(items) - len(kept))
    return kept


def prune_departed(index: KvIndex, members: Collection[int]) -> bool:
    """Let go of the blocks of workers that are no longer members; whether any went."""
    gone = [w for w in index.worker_ids() if w not in members]
    for worker_id in gone:
        index.drop_worker(worker_id)
    return bool(gone)


class KvMessage(NamedTuple):
    """One kv-events message's events, and its publisher (None in 0.9's layout, which names none)."""

    publisher_id: Optional[int]
    items: List[KvItem]


def decode_nats_kv(subject: str, data: bytes, stream_prefix: str) -> Optional[KvMessage]:
    """One kv-events message from NATS, in the layout its subject names; None
    for a stream subject outside ``stream_prefix`` (another namespace or component).  Raises
    :class:`Malformed` on a bad message."""
    try:
        if subject.startswith("namespace."):  # 1.0 on: the event-plane envelope
            env = parse_kv_envelope(data, KV_EVENTS)
            return KvMessage(env.publisher_id, decode_kv_payload(env.payload))
        if subject.startswith(stream_prefix):  # 0.9: one JSON event, no publisher
            return KvMessage(None, decode_kv_json(data))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise Malformed("bad_payload", str(exc)[:200]) from None
    return None


class KvNatsSource(NatsSource):
    """``workermon-kv-events-nats``: applies the KV events published on NATS to ``index``.

    ``members()`` is the monitor's member set now (any thread); ``stream_prefix``
    is what the JetStream-era subject's first token starts with for this scope.
    """

    def __init__(self, cfg: NatsConfig, index: KvIndex, members: Callable[[], Collection[int]],
                 stream_prefix: str, stopping: threading.Event, status: SourceStatus, max_bytes: int,
                 report_errors: bool, on_change: Callable[[], None] = lambda: None) -> None:
        # Subscribed is a change too: a wait_for() on health().kv then wakes.
        super().__init__(cfg, lambda _item: None, Backlog(1), stopping, on_change, status, max_bytes,
                         report_feed=report_errors)
        self.name = "workermon-kv-events-nats"
        self.index = index
        self._members = members
        self._on_change = on_change
        self._stream_prefix = stream_prefix
        self._pending: List[Tuple[str, bytes]] = []

    async def _on_msg(self, msg: Any) -> None:
        data = msg.data
        if len(data) > self._max_load_bytes:
            self.status.inc("malformed_oversized")
            return
        self._pending.append((msg.subject, data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        status = self.status
        members = self._members()
        for subject, data in pending:
            try:
                decoded = decode_nats_kv(subject, data, self._stream_prefix)
            except Malformed as exc:
                self._malformed(exc)
                continue
            if decoded is None:
                status.inc("other_streams")  # a *.kv-events subject of another scope
                continue
            publisher_id, items = decoded
            kept = members_only(items, members, status)
            if kept:
                self.index.apply(kept, publisher_id)
        status.inc("messages", len(pending))
        status.event()
        self._on_change()

    def members_changed(self) -> None:
        """The monitor's member set changed (any thread; never blocks): prune on the loop."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._prune)
            except RuntimeError:
                pass  # the loop is closed: stopping

    def _prune(self) -> None:
        if prune_departed(self.index, self._members()):
            self._on_change()

    def _malformed(self, exc: Malformed) -> None:
        self.count_malformed(exc, log, "kv-events message on NATS")


KvSource = Union[KvEventsSource, KvNatsSource]  # either plane's KV-events thread
