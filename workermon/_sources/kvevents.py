"""The KV-events source thread: what each worker caches, for ``WorkerMonitor(kv_index=True)``.

``workermon-kv-events`` follows the ``kv-events`` event channels the etcd
source finds (Dynamo 1.6's ZMQ plane, DYNAMO-KV.md §1–2) exactly as the ZMQ
source follows ``kv_metrics``: one ZMTP subscriber, connected to each
channel's endpoint while its key exists.  Each message is checked against the
4-frame layout, its payload decoded and applied to the :class:`KvIndex` in
arrival order (the index has its own lock; the busy rule's reducer is not
involved).  A channel whose key goes (lease expiry, deregistration) takes its
worker's blocks out of the index.  Bad messages are counted and dropped.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, List

import msgspec

from .._health import SourceStatus
from .._kvindex import KvIndex, decode_kv_payload
from .._parse import Malformed, parse_zmq_frames
from .backlog import Backlog
from .zmq import ZmqConfig, ZmqSource
from .zmtp import Subscriber

log = logging.getLogger(__name__)

__all__ = ["KvEventsSource"]


class KvEventsSource(ZmqSource):
    """``workermon-kv-events``: applies every worker's KV events to ``index``."""

    def __init__(self, cfg: ZmqConfig, index: KvIndex, stopping: threading.Event, on_ready: Callable[[], None],
                 status: SourceStatus) -> None:
        super().__init__(cfg, lambda _item: None, Backlog(1), stopping, on_ready, status)
        self.name = "workermon-kv-events"
        self.index = index

    def _drop_channel(self, sub: Subscriber, key: str) -> None:
        channel = self._channels.get(key)
        super()._drop_channel(sub, key)
        if channel is not None and not any(c.worker_id == channel.worker_id for c in self._channels.values()):
            self.index.drop_worker(channel.worker_id)  # the worker left: its blocks go with it

    def _accept(self, messages: List[List[bytes]], errors: List[str]) -> None:
        status = self.status
        topic = self._cfg.subscription
        for reason in errors:
            self._malformed(Malformed(reason, "read past on the wire"))
        for frames in messages:
            try:
                publisher_id, _sequence, payload = parse_zmq_frames(frames, topic, self._cfg.max_load_bytes)
                items = decode_kv_payload(payload)
            except Malformed as exc:
                self._malformed(exc)
                continue
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                self._malformed(Malformed("bad_payload", str(exc)[:200]))
                continue
            self.index.apply(items, publisher_id)
        received = len(messages) + len(errors)
        if received:
            status.inc("messages", received)
            status.event()
