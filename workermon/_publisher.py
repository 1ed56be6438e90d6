"""WorkerPublisher: the worker side of the protocol, for Python workers, demos and tests.

Dynamo has this only in Rust.  It grants an etcd lease (TTL 10 s, as Dynamo),
keeps it alive from a daemon thread, writes the card at
``v1/mdc/{ns}/{component}/{endpoint}/{lease_hex}`` (Dynamo 0.7's wrapped form
by default, 0.6's top-level form or 1.6's form as options), and publishes a
load report every time :meth:`WorkerPublisher.report` is called: on NATS, or
with ``event_plane="zmq"`` as a Dynamo 1.6 worker does — from its own PUB
socket, registered as a ``kv_metrics`` event channel under its lease, in
4-frame messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import logging
import random
import threading
import time
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

import msgspec

from ._config import apply_deprecated, etcd_from_env, nats_from_env
from ._sources.etcd import EtcdConfig, endpoints_from, make_client
from .options import EtcdOptions, NatsOptions
from ._sources.nats import check_nats_url, close_loop
from ._parse import KV_METRICS, channel_prefix

log = logging.getLogger(__name__)

__all__ = ["WorkerPublisher"]

CardFormat = Literal["wrapped", "toplevel", "1.6"]
LoadFormat = Literal["load_event", "active_load"]
PublisherPlane = Literal["nats", "zmq"]


class WorkerPublisher:
    """Register one simulated (or real Python) worker and publish its load.

    Thread contract: :meth:`report` may be called from any thread and never
    blocks on the network (messages are handed to the publisher's own asyncio
    thread, which nats-py buffers through reconnects).  :meth:`start` and
    :meth:`stop` block for at most their timeouts.  If the lease is lost
    (etcd restarted without it, or keep-alives failed past the TTL), the
    worker registers again under a new lease: :attr:`worker_id` changes and
    ``on_reregister(old_id, new_id)`` is called from the keep-alive thread.
    """

    def __init__(
        self,
        etcd_endpoints: Union[Sequence[str], str],
        nats_servers: Union[Sequence[str], str, None] = None,
        namespace: str = "dynamo",
        component: str = "backend",
        endpoint: str = "generate",
        *,
        total_kv_blocks: Optional[int] = 1024,
        lease_ttl: int = 10,
        card_format: Optional[CardFormat] = None,
        load_format: LoadFormat = "load_event",
        event_plane: PublisherPlane = "nats",
        zmq_host: str = "127.0.0.1",
        worker_type: Optional[str] = None,
        display_name: str = "workermon/simulated",
        kv_cache_block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        data_parallel_size: int = 1,
        data_parallel_start_rank: int = 0,
        subject: Optional[str] = None,
        on_reregister: Optional[Callable[[int, int], None]] = None,
        etcd: Optional[EtcdOptions] = None,
        nats: Optional[NatsOptions] = None,
        etcd_user: Optional[str] = None,
        etcd_password: Optional[str] = None,
        etcd_ca_cert: Optional[str] = None,
        nats_token: Optional[str] = None,
        nats_user: Optional[str] = None,
        nats_password: Optional[str] = None,
        nats_tls_ca: Optional[str] = None,
    ) -> None:
        if event_plane not in ("nats", "zmq"):
            raise ValueError(f"event_plane must be 'nats' or 'zmq', got {event_plane!r}")
        if card_format is None:
            card_format = "1.6" if event_plane == "zmq" else "wrapped"
        if card_format not in ("wrapped", "toplevel", "1.6"):
            raise ValueError(f"card_format must be 'wrapped', 'toplevel' or '1.6', got {card_format!r}")
        if event_plane == "nats" and nats_servers is None:
            raise ValueError("a NATS publisher needs nats_servers (or event_plane='zmq')")
        if load_format not in ("load_event", "active_load"):
            raise ValueError(f"load_format must be 'load_event' or 'active_load', got {load_format!r}")
        if lease_ttl < 1:
            raise ValueError("lease_ttl must be at least 1 second")
        # The same option objects as WorkerMonitor; what they leave unset comes from Dynamo's
        # ETCD_AUTH_* / NATS_AUTH_* / NATS_TLS_* variables, as a Dynamo worker reads them.
        legacy = {k: v for k, v in (("etcd_user", etcd_user), ("etcd_password", etcd_password),
                                    ("etcd_ca_cert", etcd_ca_cert), ("nats_token", nats_token),
                                    ("nats_user", nats_user), ("nats_password", nats_password),
                                    ("nats_tls_ca", nats_tls_ca)) if v is not None}
        homes = apply_deprecated(legacy, {"etcd": etcd or EtcdOptions(), "nats": nats or NatsOptions()},
                                 stacklevel=3)  # apply_deprecated ← WorkerPublisher.__init__ ← the user
        etcd_opts = etcd_from_env(homes["etcd"], os.environ)
        nats_opts = nats_from_env(homes["nats"], os.environ)
        tls = etcd_opts.tls
        self._etcd_cfg = EtcdConfig(
            endpoints=endpoints_from(etcd_endpoints, None), prefix=f"v1/mdc/{namespace}/",
            user=etcd_opts.user, password=etcd_opts.password, ca_cert=tls.ca if tls else None,
            cert_cert=tls.cert if tls else None, cert_key=tls.key if tls else None, timeout=etcd_opts.timeout,
        )
        self._servers = [check_nats_url(s) for s in endpoints_from(nats_servers, None)] if nats_servers else []
        self.event_plane: PublisherPlane = event_plane
        self._zmq_host = zmq_host
        self.worker_type = worker_type
        # As a 1.6 worker: a random publisher id below 2**53, one sequence across ranks.
        self.publisher_id = random.getrandbits(52) | (1 << 40)
        self._sequence = 0
        self._zmq_ctx: Any = None
        self._zmq_sock: Any = None
        self._zmq_lock = threading.Lock()
        self._subscribed = False
        self.zmq_endpoint: Optional[str] = None
        self.namespace, self.component, self.endpoint = namespace, component, endpoint
        self.total_kv_blocks = total_kv_blocks
        self.lease_ttl = lease_ttl
        self.card_format = card_format
        self.load_format = load_format
        self.subject = subject or f"namespace.{namespace}.kv_metrics"
        self._card_fields: Dict[str, Any] = dict(
            display_name=display_name, kv_cache_block_size=kv_cache_block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, data_parallel_size=data_parallel_size,
            data_parallel_start_rank=data_parallel_start_rank,
        )
        self._on_reregister = on_reregister
        self._nats_auth: Dict[str, Any] = {}
        auth = nats_opts.auth
        if auth == "user":
            self._nats_auth.update(user=nats_opts.user, password=nats_opts.password)
        elif auth == "token":
            self._nats_auth["token"] = nats_opts.token
        elif auth == "nkey":
            self._nats_auth["nkeys_seed_str"] = nats_opts.nkey
        elif auth == "credentials":
            self._nats_auth["user_credentials"] = nats_opts.credentials
        ntls = nats_opts.tls
        if ntls is not None or any(s.startswith("tls://") for s in self._servers):
            import ssl

            ctx = ssl.create_default_context(cafile=ntls.ca if ntls else None)
            if ntls is not None and ntls.cert and ntls.key:
                ctx.load_cert_chain(ntls.cert, ntls.key)
            self._nats_auth["tls"] = ctx
        self._client: Any = None
        self._lease_id = 0
        self._stopping = threading.Event()
        self._keepalive: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._nc: Any = None
        self._lock = threading.Lock()
        self.reregistrations = 0
        self.published = 0

    # --- what goes on the wire ---------------------------------------------------

    @property
    def worker_id(self) -> int:
        """The current lease id (Dynamo's ``instance_id``); 0 before start."""
        return self._lease_id

    @property
    def key(self) -> str:
        return f"v1/mdc/{self.namespace}/{self.component}/{self.endpoint}/{self._lease_id:x}"

    @property
    def channel_key(self) -> str:
        """Where a ZMQ publisher registers its ``kv_metrics`` event channel (Dynamo 1.6)."""
        return (f"{channel_prefix(self.namespace, self.component, self.endpoint)}{self.publisher_id:x}")

    def channel(self) -> Dict[str, Any]:
        """The event channel's value, as a 1.6 worker writes it."""
        return {
            "type": "EventChannel",
            "scope": {"kind": "endpoint", "endpoint": {
                "namespace": self.namespace, "component": self.component, "name": self.endpoint}},
            "topic": KV_METRICS,
            "instance_id": self.publisher_id,
            "transport": {"kind": "Zmq", "config": {"endpoint": self.zmq_endpoint}},
        }

    def card(self) -> Dict[str, Any]:
        """The card as Dynamo writes it (0.7 wrapped or 0.6 top-level)."""
        f = self._card_fields
        runtime: Dict[str, Any] = {
            "total_kv_blocks": self.total_kv_blocks,
            "max_num_seqs": f["max_num_seqs"],
            "max_num_batched_tokens": f["max_num_batched_tokens"],
            "tool_call_parser": None,
            "reasoning_parser": None,
            "data_parallel_size": f["data_parallel_size"],
        }
        if f["data_parallel_start_rank"] or self.card_format == "1.6":
            runtime["data_parallel_start_rank"] = f["data_parallel_start_rank"]
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f["display_name"])
        body = {
            "display_name": f["display_name"],
            "slug": slug,
            "context_length": 4096,
            "kv_cache_block_size": f["kv_cache_block_size"],
            "migration_limit": 0,
            "model_type": "Chat | Completions",
            "model_input": "Tokens",
            "runtime_config": runtime,
        }
        if self.card_format == "1.6":
            body["worker_type"] = self.worker_type or "aggregated"
        if self.card_format == "toplevel":
            return body
        return {
            "type": "Model",
            "namespace": self.namespace,
            "component": self.component,
            "endpoint": self.endpoint,
            "instance_id": self._lease_id,
            "card_json": body,
        }

    def load_message(
        self,
        active_blocks: Optional[int],
        dp_rank: int = 0,
        *,
        active_prefill_tokens: Optional[int] = None,
        request_active_slots: int = 0,
        num_requests_waiting: int = 0,
        extra: Optional[Dict[str, Any]] = None,
    ) -> bytes:
        """One load report as Dynamo publishes it (LoadEvent ≤ 0.7, ActiveLoad 0.8; 1.6: msgpack ActiveLoad)."""
        msg: Dict[str, Any]
        if self.event_plane == "zmq":
            # A 1.6 worker fills only kv_used_blocks.
            body = {"worker_id": self._lease_id, "dp_rank": dp_rank, "active_decode_blocks": None,
                    "active_prefill_tokens": active_prefill_tokens, "kv_used_blocks": active_blocks}
            if extra:
                body.update(extra)
            return msgspec.msgpack.encode(body)
        if self.load_format == "load_event":
            total = self.total_kv_blocks or 0
            blocks = active_blocks or 0
            msg = {
                "worker_id": self._lease_id,
                "data": {
                    "worker_stats": {
                        "data_parallel_rank": dp_rank,
                        "request_active_slots": request_active_slots,
                        "request_total_slots": self._card_fields["max_num_seqs"],
                        "num_requests_waiting": num_requests_waiting,
                    },
                    "kv_stats": {
                        "kv_active_blocks": blocks,
                        "kv_total_blocks": total,
                        "gpu_cache_usage_perc": blocks / total if total else 0.0,
                        "gpu_prefix_cache_hit_rate": 0.0,
                    },
                    "spec_decode_stats": None,
                },
            }
        else:
            msg = {
                "worker_id": self._lease_id,
                "dp_rank": dp_rank,
                "active_decode_blocks": active_blocks,
                "active_prefill_tokens": active_prefill_tokens,
            }
        if extra:
            msg.update(extra)
        return json.dumps(msg, separators=(",", ":")).encode()

    # --- lifecycle -------------------------------------------------------------------

    def zmq_frames(self, payload: bytes, published_at_ms: Optional[int] = None,
                   sequence: Optional[int] = None) -> List[bytes]:
        """The 4 frames a 1.6 worker sends for one payload (topic, publisher id, sequence, envelope)."""
        seq = self._sequence if sequence is None else sequence
        envelope = msgspec.msgpack.encode({
            "publisher_id": self.publisher_id,
            "sequence": seq,
            "published_at": int(time.time() * 1000) if published_at_ms is None else published_at_ms,
            "topic": KV_METRICS,
            "payload": payload,
        })
        return [KV_METRICS.encode(), self.publisher_id.to_bytes(8, "big"), seq.to_bytes(8, "big"),
                b"\x01" + len(envelope).to_bytes(4, "big") + envelope]

    def start(self, timeout: float = 10.0) -> "WorkerPublisher":
        """Register the card under a new lease and connect to NATS (or bind the ZMQ socket)."""
        if self._keepalive is not None:
            raise RuntimeError("WorkerPublisher already started")
        self._client = make_client(self._etcd_cfg, self._etcd_cfg.endpoints[0])
        try:
            if self.event_plane == "zmq":
                self._bind_zmq()
            self._register()
        except BaseException:
            self.stop(revoke=False)
            raise
        if self.event_plane == "nats":
            self._start_loop(timeout)
        self._keepalive = threading.Thread(target=self._keep_alive, name="workermon-publisher-lease", daemon=True)
        self._keepalive.start()
        return self

    def stop(self, timeout: float = 5.0, revoke: bool = True) -> None:
        """Revoke the lease (the card disappears at once) and close NATS.  Idempotent."""
        self._stopping.set()
        if self._keepalive is not None:
            self._keepalive.join(timeout)
        loop, nc = self._loop, self._nc
        if loop is not None and nc is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(nc.close(), loop).result(timeout)
            except Exception:  # noqa: BLE001
                log.debug("closing the publisher's NATS connection failed", exc_info=True)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout)
        with self._zmq_lock:
            if self._zmq_sock is not None:
                self._zmq_sock.close(linger=0)
                self._zmq_sock = None
            if self._zmq_ctx is not None:
                self._zmq_ctx.term()
                self._zmq_ctx = None
        if self._client is not None:
            if revoke and self._lease_id:
                try:
                    self._client.revoke_lease(self._lease_id)
                except Exception:  # noqa: BLE001
                    log.debug("revoking lease %x failed", self._lease_id, exc_info=True)
            self._client.close()
            self._client = None

    def __enter__(self) -> "WorkerPublisher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reporting ---------------------------------------------------------------------

    def report(
        self,
        active_blocks: Optional[int],
        dp_rank: int = 0,
        *,
        active_prefill_tokens: Optional[int] = None,
        request_active_slots: int = 0,
        num_requests_waiting: int = 0,
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Publish the worker's load now (non-blocking, any thread)."""
        payload = self.load_message(
            active_blocks, dp_rank, active_prefill_tokens=active_prefill_tokens,
            request_active_slots=request_active_slots, num_requests_waiting=num_requests_waiting, extra=extra,
        )
        self.publish_raw(payload)

    def publish_raw(self, payload: bytes, subject: Optional[str] = None) -> None:
        """Publish bytes on the load subject (ZMQ: in the 4 frames) as they are (for tests and benchmarks)."""
        if self.event_plane == "zmq":
            self.send_frames(self.zmq_frames(payload))
            return
        loop = self._loop
        if loop is None or self._nc is None:
            raise RuntimeError("WorkerPublisher is not started")
        loop.call_soon_threadsafe(self._publish_now, subject or self.subject, payload)

    def send_frames(self, frames: List[bytes]) -> None:
        """Send one multipart message on the ZMQ socket as it is (any thread; never blocks)."""
        import zmq

        with self._zmq_lock:
            if self._zmq_sock is None:
                raise RuntimeError("WorkerPublisher is not started")
            self._zmq_sock.send_multipart(frames, zmq.NOBLOCK)
            self._sequence += 1
            self.published += 1

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """ZMQ only: True once a subscriber to ``kv_metrics`` is connected.

        A 1.6 PUB socket drops what it sends before a subscriber's connection
        is complete ("slow joiner"); this socket is an XPUB (the same wire for
        subscribers), which hears each subscription, so a caller can wait.
        """
        import zmq

        deadline = time.monotonic() + timeout
        while True:
            with self._zmq_lock:
                if self._zmq_sock is None:
                    raise RuntimeError("WorkerPublisher is not started")
                if self._subscribed:
                    return True
                if self._zmq_sock.poll(0, zmq.POLLIN):
                    msg = self._zmq_sock.recv()
                    if msg[:1] == b"\x01" and KV_METRICS.encode().startswith(msg[1:]):
                        self._subscribed = True
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._zmq_lock:
                sock = self._zmq_sock
            if sock is None:
                return False
            # Wait for the next subscription message outside the lock (reports go on).
            self._stopping.wait(min(left, 0.02))

    def flush(self, timeout: float = 5.0) -> None:
        """Block until NATS has received everything published so far (ZMQ: nothing to wait for)."""
        if self.event_plane == "zmq":
            return
        loop, nc = self._loop, self._nc
        if loop is None or nc is None:
            raise RuntimeError("WorkerPublisher is not started")
        asyncio.run_coroutine_threadsafe(nc.flush(timeout=timeout), loop).result(timeout + 1)

    def _publish_now(self, subject: str, payload: bytes) -> None:
        # Runs on the loop; tasks start in creation order, so reports keep theirs.
        asyncio.ensure_future(self._nc.publish(subject, payload))
        self.published += 1

    # --- internals -----------------------------------------------------------------------

    def _bind_zmq(self) -> None:
        import zmq

        self._zmq_ctx = zmq.Context()
        sock = self._zmq_ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.bind(f"tcp://{self._zmq_host}:*")
        self._zmq_sock = sock
        self._subscribed = False
        self.zmq_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _register(self) -> None:
        lease = self._client.lease(self.lease_ttl)
        with self._lock:
            self._lease_id = lease.id
        self._client.put(self.key, json.dumps(self.card(), separators=(",", ":")), lease=lease.id)
        if self.event_plane == "zmq":
            self._client.put(self.channel_key, json.dumps(self.channel(), separators=(",", ":")), lease=lease.id)

    def _start_loop(self, timeout: float) -> None:
        import nats

        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                close_loop(loop)

        self._loop_thread = threading.Thread(target=run, name="workermon-publisher-nats", daemon=True)
        self._loop_thread.start()

        async def connect() -> Any:
            async def on_error(exc: Exception) -> None:
                log.debug("publisher NATS error: %s", exc)

            return await nats.connect(
                servers=self._servers, name="workermon-publisher", max_reconnect_attempts=-1,
                reconnect_time_wait=0.25, connect_timeout=2, error_cb=on_error, allow_reconnect=True,
                **self._nats_auth,
            )

        ready = asyncio.run_coroutine_threadsafe(connect(), loop)
        try:
            self._nc = ready.result(timeout)
        except BaseException:
            ready.cancel()
            self.stop(timeout=2)
            raise

    def _keep_alive(self) -> None:
        interval = max(self.lease_ttl / 3.0, 0.2)
        last_ok = time.monotonic()
        while not self._stopping.wait(interval):
            try:
                responses: List[Any] = list(self._client.refresh_lease(self._lease_id))
                if responses and responses[0].TTL > 0:
                    last_ok = time.monotonic()
                    continue
                lost = True
            except Exception as exc:  # noqa: BLE001 - etcd down: keep trying until the TTL runs out
                log.debug("lease keep-alive failed: %s", exc)
                lost = time.monotonic() - last_ok > self.lease_ttl
                if not lost:
                    continue
            if lost and not self._stopping.is_set():
                self._reregister()
                last_ok = time.monotonic()

    def _reregister(self) -> None:
        old = self._lease_id
        try:
            self._register()
        except Exception as exc:  # noqa: BLE001 - try again at the next tick
            log.warning("re-registering the worker failed: %s", exc)
            return
        self.reregistrations += 1
        log.warning("worker lease %x was lost; registered again as %x", old, self._lease_id)
        if self._on_reregister is not None:
            try:
                self._on_reregister(old, self._lease_id)
            except Exception:  # noqa: BLE001
                log.exception("on_reregister callback failed")

