"""The ZMQ source thread: Dynamo 1.6's default event plane.

``workermon-zmq`` owns one :class:`~workermon._sources.zmtp.Subscriber` (ZMTP on
plain sockets, so that one message can never take more memory than its
limits; see that module).  In direct mode (Dynamo's default) it
follows the ``kv_metrics`` event channels that the etcd source finds under
``v1/event_channels/…``: it connects to each channel's ``tcp://`` endpoint as
the key appears and disconnects when the key goes.  In broker mode it connects
to the brokers' XPUB endpoints instead and drops the duplicates that several
brokers deliver.  Every message is checked against the 4-frame layout
(:func:`~workermon._parse.parse_zmq_frames`); the ActiveLoad payloads go to the
reducer in batches, through the same backlog bound as NATS payloads.

The poll has a waker: a socket pair whose read end is polled beside the
publishers' connections, written by ``stop()`` and by the etcd thread when
channels change.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict, deque
from typing import Callable, Deque, Dict, Iterator, List, Optional, Tuple

import attrs

from .._health import Backoff, SourceStatus
from .._model import ChannelDelete, ChannelListing, ChannelPut
from .._parse import DEFAULT_MAX_LOAD_BYTES, KV_METRICS, Malformed, ZmqMessage, parse_zmq_frames
from . import Source
from .backlog import Backlog, PayloadBatch
from .._waker import Waker
from .zmtp import Subscriber

log = logging.getLogger(__name__)

__all__ = ["ZmqConfig", "ZmqSource", "parse_broker_url"]



def parse_broker_url(text: str) -> Tuple[str, ...]:
    """The XPUB endpoints of ``DYN_ZMQ_BROKER_URL`` (``xsub=…;… , xpub=…;…``)."""
    endpoints: List[str] = []
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise ValueError(f"zmq broker URL {text!r}: expected 'xsub=…, xpub=…'")
        if name.strip().lower() == "xpub":
            endpoints += [e.strip() for e in value.split(";") if e.strip()]
    if not endpoints:
        raise ValueError(f"zmq broker URL {text!r} names no xpub endpoint")
    for e in endpoints:
        if not re.fullmatch(r"tcp://[^\s/]+:\d+", e):
            raise ValueError(f"zmq broker endpoint {e!r}: expected tcp://host:port")
    return tuple(endpoints)


@attrs.frozen
class ZmqConfig:
    """What the ZMQ source subscribes to.

    ``broker`` (XPUB endpoints) selects broker mode; ``subject`` is then the
    subscription prefix of the full subjects
    (``namespace.{ns}.component.{c}.endpoint.{e}.kv_metrics``).
    """

    namespace: str
    component: Optional[str] = None
    endpoint: Optional[str] = None
    broker: Tuple[str, ...] = ()
    max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES
    dedup_window: int = 65_536
    topic: str = KV_METRICS

    @property
    def subscription(self) -> bytes:
        if not self.broker:
            return self.topic.encode()
        prefix = f"namespace.{self.namespace}.component."
        if self.component is not None:
            prefix += f"{self.component}.endpoint."
            if self.endpoint is not None:
                prefix += f"{self.endpoint}.{self.topic}"
        return prefix.encode()

    def subject_pattern(self) -> "re.Pattern[bytes]":
        seg = rb"[^.\s]+"
        c = re.escape(self.component.encode()) if self.component is not None else seg
        e = re.escape(self.endpoint.encode()) if self.endpoint is not None else seg
        ns = re.escape(self.namespace.encode())
        topic = re.escape(self.topic.encode())
        return re.compile(rb"namespace\." + ns + rb"\.component\." + c + rb"\.endpoint\." + e + rb"\." + topic)


class ZmqSource(Source):
    """``workermon-zmq``: hands validated ActiveLoad payload batches to ``emit``."""

    def __init__(
        self,
        cfg: ZmqConfig,
        emit: Callable[[object], None],
        backlog: Backlog,
        stopping: threading.Event,
        on_ready: Callable[[], None],
        status: SourceStatus,
    ) -> None:
        super().__init__("zmq", stopping, status, backlog)
        self._cfg = cfg
        self._emit = emit
        self._on_ready = on_ready
        self._inbox: Deque[object] = deque()
        self._waker = Waker()
        self._channels: Dict[str, ChannelPut] = {}
        self._endpoints: Dict[str, int] = {}  # endpoint -> channels using it
        self._publishers: Dict[int, int] = {}  # publisher id -> channels naming it
        self._seen: "OrderedDict[Tuple[int, int], None]" = OrderedDict()
        self._listed = False
        self._pattern = cfg.subject_pattern()
        self._scope = re.compile(re.escape(cfg.subscription) + rb"[^\s]*\.[A-Za-z0-9_-]+$")

    # --- from other threads -----------------------------------------------------

    def channel_update(self, item: object) -> None:
        """A ChannelPut / ChannelDelete / ChannelListing from the etcd thread."""
        self._inbox.append(item)
        self._poke()

    def wake(self, deadline: Optional[float] = None) -> None:
        """Wake the poll so the thread notices ``stopping`` (any thread)."""
        self._poke()

    def _poke(self) -> None:
        self._waker.poke()

    # --- the thread -------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self._stopping, 0.1, 2.0)
        sub: Optional[Subscriber] = None
        try:
            while not self._stopping.is_set():
                try:
                    if sub is None:
                        sub = self._open()
                    self._loop(sub)
                except Exception:  # noqa: BLE001 - supervise: log, back off, start again
                    if self._stopping.is_set():
                        break
                    self.status.inc("restarts")
                    log.exception("ZMQ source failed unexpectedly; restarting it")
                    if sub is not None:
                        sub.close()
                        sub = None
                    self._endpoints.clear()
                    self._reconnect_all()
                    if backoff.wait():
                        break
        finally:
            if sub is not None:
                sub.close()
            self._waker.close()
            self.status.state = "stopped"

    def _open(self) -> Subscriber:
        cfg = self._cfg
        sub = Subscriber(cfg.subscription, cfg.max_load_bytes)
        self.status.counters["max_message_bytes"] = sub.max_message_bytes
        for endpoint in cfg.broker:
            sub.connect(endpoint)
        for endpoint in list(self._endpoints):
            sub.connect(endpoint)
        if cfg.broker:
            self.status.endpoint = ",".join(cfg.broker)
            self._mark_ready()
        else:
            self.status.state = "connected" if self._listed else "connecting"
        return sub

    def _mark_ready(self) -> None:
        self.status.state = "connected"
        self.status.counters["endpoints_connected"] = len(self._endpoints) or len(self._cfg.broker)
        if not self._listed:
            self._listed = True
            self._on_ready()

    def _loop(self, sub: Subscriber) -> None:
        while not self._stopping.is_set():
            self._apply_inbox(sub)
            # No timeout of its own: stop() and channel changes poke the waker;
            # the subscriber wakes itself for its reconnects.
            woken, messages, errors = sub.poll(self._waker.fd)
            if woken:
                self._waker.drain()
            for name, n in sub.counters.items():
                self.status.counters[name] = n
            if sub.last_error is not None:
                self.status.last_error = sub.last_error
                sub.last_error = None
            if messages or errors:
                self._accept(messages, errors)

    # --- channels ---------------------------------------------------------------

    def _apply_inbox(self, sub: Subscriber) -> None:
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            if self._cfg.broker:
                continue  # broker mode follows no channels
            if isinstance(item, ChannelListing):
                listed = {c.key for c in item.channels} | set(item.malformed_keys)
                for key in [k for k in self._channels if k not in listed]:
                    self._drop_channel(sub, key)
                for channel in item.channels:
                    self._add_channel(sub, channel)
                self._mark_ready()
            elif isinstance(item, ChannelPut):
                self._add_channel(sub, item)
            elif isinstance(item, ChannelDelete):
                self._drop_channel(sub, item.key)
            self.status.counters["endpoints_connected"] = len(self._endpoints)

    def _add_channel(self, sub: Subscriber, channel: ChannelPut) -> None:
        old = self._channels.get(channel.key)
        if old == channel:
            return
        if old is not None:
            self._drop_channel(sub, channel.key)
        self._channels[channel.key] = channel
        self._publishers[channel.publisher_id] = self._publishers.get(channel.publisher_id, 0) + 1
        if channel.endpoint is None:
            return  # a NATS-plane channel: nothing to connect to
        n = self._endpoints.get(channel.endpoint, 0)
        self._endpoints[channel.endpoint] = n + 1
        if n == 0:
            try:
                sub.connect(channel.endpoint)
                self.status.inc("connects")
                log.debug("ZMQ connected to %s (%s)", channel.endpoint, channel.key)
            except Exception as exc:  # noqa: BLE001 - a bad endpoint must not stop the others
                del self._endpoints[channel.endpoint]
                self.status.inc("malformed")
                self.status.inc("malformed_bad_endpoint")
                self.status.last_error = f"cannot connect to {channel.endpoint}: {exc}"

    def _drop_channel(self, sub: Subscriber, key: str) -> None:
        channel = self._channels.pop(key, None)
        if channel is None:
            return
        left = self._publishers.get(channel.publisher_id, 0) - 1
        if left > 0:
            self._publishers[channel.publisher_id] = left
        else:
            self._publishers.pop(channel.publisher_id, None)
        if channel.endpoint is None or channel.endpoint not in self._endpoints:
            return
        n = self._endpoints[channel.endpoint] - 1
        if n > 0:
            self._endpoints[channel.endpoint] = n
            return
        del self._endpoints[channel.endpoint]
        sub.disconnect(channel.endpoint)
        self.status.inc("disconnects")

    def _reconnect_all(self) -> None:
        # After a restart the new socket connects to every known channel again.
        for channel in self._channels.values():
            if channel.endpoint is not None:
                self._endpoints[channel.endpoint] = self._endpoints.get(channel.endpoint, 0) + 1

    # --- messages ---------------------------------------------------------------

    def _accept(self, messages: List[List[bytes]], errors: List[str]) -> None:
        """Validate complete messages, count the malformed ones, queue the payloads."""
        cfg = self._cfg
        status = self.status
        broker = bool(cfg.broker)
        seen = self._seen
        publishers = self._publishers
        batch: List[bytes] = []
        nbytes = 0
        received = len(messages) + len(errors)
        for msg in self._checked(messages, errors):
            publisher_id, sequence, payload = msg
            if broker:
                key = (publisher_id, sequence)
                if key in seen:
                    status.inc("duplicates")
                    continue
                seen[key] = None
                if len(seen) > cfg.dedup_window:
                    seen.popitem(last=False)
            elif publisher_id not in publishers:
                # Dynamo's frontend counts a report for a known worker whatever
                # its publisher (measured on 1.6.1): counted, and applied.
                status.inc("unknown_publisher")
            batch.append(payload)
            nbytes += len(payload)
        if received:
            status.inc("messages", received)
            status.event()
        if not batch:
            return
        kept, kept_bytes, dropped = self.backlog.admit(batch, nbytes)
        if dropped:
            status.inc("dropped_backlog", dropped)
        if kept:
            self._emit(PayloadBatch(self.backlog, kept, kept_bytes, bare=True))

    def _checked(self, messages: List[List[bytes]], errors: List[str]) -> Iterator[ZmqMessage]:
        """The messages of this source's topic that pass the 4-frame check; the rest counted."""
        for reason in errors:
            self._malformed(Malformed(reason, "read past on the wire"))
        for frames in messages:
            expected = self._expected_topic(frames)
            if expected is None:
                continue
            try:
                yield parse_zmq_frames(frames, expected, self._cfg.max_load_bytes)
            except Malformed as exc:
                self._malformed(exc)

    def _expected_topic(self, frames: List[bytes]) -> Optional[bytes]:
        """The topic frame this message must carry; None (counted) for a broker's other topics.

        Through a broker the subscription is a prefix of whole subjects, so it
        also receives the workers' other topics (forward-pass metrics, …):
        those are no concern of this source, not malformed."""
        if not self._cfg.broker:
            return self._cfg.subscription
        if frames and self._pattern.fullmatch(frames[0]):
            return bytes(frames[0])
        if frames and self._scope.match(frames[0]):
            self.status.inc("other_topics")
            return None
        return b"\0"  # not a subject of this scope: malformed (wrong_topic)

    def _malformed(self, exc: Malformed) -> None:
        if exc.reason == "identity_mismatch":
            self.status.inc("identity_mismatch")
        self.count_malformed(exc, log, "ZMQ message")
