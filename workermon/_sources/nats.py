"""The NATS source thread: nats-py on its own asyncio loop.

``workermon-nats`` owns an event loop that runs the official client.  Its
message callback does as little as possible — it appends the raw payload to a
list — and one ``call_soon`` per loop turn hands the whole list to the reducer
as a single queue item.  Decoding happens in batches on the reducer thread
(measured: nats-py's own parsing is ~60-70 % of the cost of a message,
so per-message work on the loop thread is what limits the rate).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs

from .._health import Backoff, SourceStatus
from .._model import FeedStatus
from .._parse import DEFAULT_MAX_LOAD_BYTES
from . import Source
from .backlog import Backlog, PayloadBatch

log = logging.getLogger(__name__)

__all__ = ["NatsConfig", "NatsSource", "check_nats_url"]


def check_nats_url(url: str) -> str:
    """Validate one NATS server URL (``nats://``, ``tls://``, ``ws://``… or ``host:port``)."""
    text = url.strip()
    if not text:
        raise ValueError("empty NATS server URL")
    probe = text if "://" in text else "nats://" + text
    parts = urllib.parse.urlsplit(probe)
    if parts.scheme not in ("nats", "tls", "ws", "wss"):
        raise ValueError(f"NATS server {url!r}: scheme must be nats, tls, ws or wss")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"NATS server {url!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"NATS server {url!r}: no host")
    return probe


@attrs.frozen
class NatsConfig:
    """How to reach NATS and what to subscribe to.  Secrets stay out of ``repr``."""

    servers: Tuple[str, ...]
    subjects: Tuple[str, ...]
    user: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    token: Optional[str] = attrs.field(default=None, repr=False)
    nkey: Optional[str] = attrs.field(default=None, repr=False)  # an nkey seed (needs the nkeys package)
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    credentials_file: Optional[str] = None
    connect_timeout: float = 2.0
    ping_interval: float = 5.0
    max_outstanding_pings: int = 3
    pending_msgs_limit: int = 512 * 1024
    pending_bytes_limit: int = 128 * 1024 * 1024
    backoff_initial: float = 0.1
    backoff_cap: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not self.servers:
            raise ValueError("at least one NATS server is needed")
        for url in self.servers:
            check_nats_url(url)
        if not self.subjects:
            raise ValueError("at least one subject is needed")
        if (self.user is None) != (self.password is None):
            raise ValueError("NATS user and password go together")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("NATS tls_cert and tls_key go together")

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        uses_tls = any(s.startswith(("tls://", "wss://")) for s in self.servers)
        if not (uses_tls or self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert and self.tls_key:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


class NatsSource(Source):
    """``workermon-nats``: hands raw payload batches and FeedStatus items to ``emit``.

    Payloads over ``max_load_bytes`` are dropped here, before they are queued;
    the rest go through ``backlog``, which bounds what waits for the reducer in
    messages and bytes (beyond, messages are dropped and counted), so a slow
    reducer can never grow memory without bound.
    """

    def __init__(
        self,
        cfg: NatsConfig,
        emit: Callable[[object], None],
        backlog: Backlog,
        stopping: threading.Event,
        on_ready: Callable[[], None],
        status: SourceStatus,
        max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES,
        report_feed: bool = True,
    ) -> None:
        super().__init__("nats", stopping, status, backlog)
        # Whether NATS going down is the metrics feed going down (the outage
        # policy); not when NATS is only a best effort beside ZMQ.
        self._report_feed = report_feed
        self._cfg = cfg
        self._emit = emit
        self._on_ready = on_ready
        self._max_load_bytes = max_load_bytes
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_future: Optional[asyncio.Future[None]] = None
        self._stop_deadline: Optional[float] = None
        self._batch: List[bytes] = []
        self._batch_bytes = 0
        self._flush_scheduled = False
        self._reconnect_backoff = Backoff(stopping, cfg.backoff_initial, cfg.backoff_cap)
        self._rr = 0
        self._live = False  # a connection is established and subscribed
        self._nc: Any = None

    # --- stopping ---------------------------------------------------------------

    def wake(self, deadline: Optional[float] = None) -> None:
        """Wake the loop so it notices ``stopping`` (any thread).

        ``deadline`` (``time.monotonic()``) bounds the closing handshake, so
        the thread ends within ``stop(timeout)`` even when the server hangs.
        """
        self._stop_deadline = deadline
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._resolve_stop)
        except RuntimeError:
            pass  # the loop is already closed

    def _resolve_stop(self) -> None:
        fut = self._stop_future
        if fut is not None and not fut.done():
            fut.set_result(None)

    # --- the thread -------------------------------------------------------------

    def _feed(self, up: bool) -> None:
        if self._report_feed:
            self._emit(FeedStatus(up=up, at=self.status.clock()))

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        # Until the first subscription is live the feed counts as down, so an
        # outage policy also covers a NATS that is unreachable from the start.
        self._feed(False)
        try:
            while not self._stopping.is_set():
                try:
                    loop.run_until_complete(self._main())
                except Exception:  # noqa: BLE001 - supervise: log, back off, restart
                    if self._stopping.is_set():
                        break
                    self.status.inc("restarts")
                    log.exception("NATS source failed unexpectedly; restarting it")
                    if self._stopping.wait(self._reconnect_backoff.next_delay()):
                        break
        finally:
            self._shutdown_loop(loop)
            self.status.state = "stopped"

    def _shutdown_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = None
        close_loop(loop)

    async def _main(self) -> None:
        import nats.errors
        from nats.aio.client import Client

        loop = asyncio.get_running_loop()
        self._stop_future = stop = loop.create_future()
        if self._stopping.is_set():
            return
        cfg = self._cfg
        backoff = Backoff(self._stopping, cfg.backoff_initial, cfg.backoff_cap)
        self.status.state = "connecting"
        nc: Any = None
        while nc is None:
            client = Client()
            # The first connect makes one round over the servers (nats-py's
            # max_reconnect_attempts=1 stops its own fixed-interval retry
            # loop); between rounds we wait our capped, jittered back-off.
            # Once connected, reconnects go on forever (see _connect_options).
            connecting = asyncio.ensure_future(client.connect(**self._connect_options(first=True)))
            await asyncio.wait({connecting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                await self._close(client)
                return
            exc = connecting.exception()
            if exc is None and client.is_connected:
                client.options["max_reconnect_attempts"] = -1
                nc = self._nc = client
                self._live = True
                break
            if not isinstance(exc, nats.errors.NoServersError):
                # (Each server's own error already reached _on_error.)
                self._note_error(exc or ConnectionError("NATS connect did not complete"))
            self.status.inc("connect_failures")
            await self._close(client)
            try:
                await asyncio.wait_for(asyncio.shield(stop), backoff.next_delay())
                return
            except asyncio.TimeoutError:
                continue
        try:
            # Subscribing waits on the server (flush): race it against stop.
            subscribing = asyncio.ensure_future(self._subscribe(nc))
            await asyncio.wait({subscribing, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                subscribing.cancel()
                await asyncio.gather(subscribing, return_exceptions=True)
                return
            subscribing.result()
            self.status.state = "connected"
            self.status.endpoint = _url_of(nc)
            self.status.last_error = None
            self._last_error_logged = None
            self._feed(True)
            self._on_ready()
            log.info("NATS subscribed to %s", ", ".join(cfg.subjects))
            await stop
        finally:
            self._live = False
            await self._close(nc)

    async def _subscribe(self, nc: Any) -> None:
        cfg = self._cfg
        for subject in cfg.subjects:
            await nc.subscribe(
                subject,
                cb=self._on_msg,
                pending_msgs_limit=cfg.pending_msgs_limit,
                pending_bytes_limit=cfg.pending_bytes_limit,
            )
        await nc.flush(timeout=cfg.connect_timeout)

    async def _close(self, nc: Any) -> None:
        # Bounded by stop()'s deadline when stopping, else by 2 s.
        timeout = 2.0
        deadline = self._stop_deadline
        if deadline is not None and self._stopping.is_set():
            timeout = max(0.0, min(timeout, deadline - time.monotonic() - 0.05))
        await _close_quietly(nc, timeout)

    def _connect_options(self, first: bool = False) -> Dict[str, Any]:
        cfg = self._cfg
        opts: Dict[str, Any] = dict(
            servers=list(cfg.servers),
            name="workermon",
            allow_reconnect=True,
            # -1 (forever) once connected; see _main for the first connect.
            max_reconnect_attempts=1 if first else -1,
            connect_timeout=cfg.connect_timeout,
            # Reconnects go through _pick_server's jittered back-off; this
            # only spaces nats-py's second try of a server inside one round.
            reconnect_time_wait=cfg.backoff_initial,
            ping_interval=cfg.ping_interval,
            max_outstanding_pings=cfg.max_outstanding_pings,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            reconnect_to_server_handler=self._pick_server,
        )
        if cfg.user is not None:
            opts["user"] = cfg.user
            opts["password"] = cfg.password
        if cfg.token is not None:
            opts["token"] = cfg.token
        if cfg.nkey is not None:
            opts["nkeys_seed_str"] = cfg.nkey
        if cfg.credentials_file is not None:
            opts["user_credentials"] = cfg.credentials_file
        ctx = cfg.ssl_context()
        if ctx is not None:
            opts["tls"] = ctx
        return opts

    def _pick_server(self, servers: List[Any], info: Dict[str, Any]) -> Tuple[Optional[Any], float]:
        # Round-robin over the pool with our own capped, jittered back-off.
        if not servers:
            return None, self._reconnect_backoff.next_delay()
        self._rr += 1
        return servers[self._rr % len(servers)], self._reconnect_backoff.next_delay()

    # --- callbacks (on the loop; must never block) ------------------------------

    async def _on_msg(self, msg: Any) -> None:
        data = msg.data
        size = len(data)
        if size > self._max_load_bytes:
            # Dropped before queueing: an oversized payload never waits in memory.
            self.status.inc("malformed_oversized")
            return
        self._batch.append(data)
        self._batch_bytes += size
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = self._batch
        if not batch:
            return
        nbytes = self._batch_bytes
        self._batch = []
        self._batch_bytes = 0
        kept, kept_bytes, dropped = self.backlog.admit(batch, nbytes)
        if dropped:
            self.status.inc("dropped_backlog", dropped)
        if not kept:
            return
        self.status.inc("messages", len(kept))
        self.status.event()
        self._emit(PayloadBatch(self.backlog, kept, kept_bytes))

    async def _on_error(self, exc: Exception) -> None:
        import nats.errors

        if isinstance(exc, nats.errors.SlowConsumerError):
            self.status.inc("dropped_slow_consumer")
            return
        self._note_error(exc)

    async def _on_disconnected(self) -> None:
        # Closing a client whose first connect failed calls this too: only a
        # live connection can be disconnected.
        if self._live and not self._stopping.is_set():
            self.status.state = "reconnecting"
            self.status.inc("disconnects")
            self._feed(False)

    async def _on_reconnected(self) -> None:
        self._reconnect_backoff.reset()
        self.status.endpoint = _url_of(self._nc)
        self.status.inc("reconnects")
        self.status.state = "connected"
        self._feed(True)
        self._last_error_logged = None
        log.info("NATS reconnected")

    async def _on_closed(self) -> None:
        if self._live and not self._stopping.is_set():
            # Only reachable if the client gives up; _main's caller restarts it.
            self.status.state = "reconnecting"
            self._resolve_stop_for_restart()

    def _resolve_stop_for_restart(self) -> None:
        fut = self._stop_future
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("NATS connection closed"))

    def _note_error(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        # Beside ZMQ (event_plane="auto", NATS not asked for) NATS is a best
        # effort: an absent server is normal there, not a warning.
        self.note_error(text, log, logging.WARNING if self._report_feed else logging.INFO, None,
                        f"NATS: {text}; retrying")


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending on a stopped loop, let it finish, close the loop."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:  # noqa: BLE001
        log.debug("asyncio loop shutdown was untidy", exc_info=True)
    finally:
        loop.close()


def _url_of(nc: Any) -> Optional[str]:
    url = getattr(nc, "connected_url", None)
    if url is None:
        return None
    # Never show credentials embedded in a URL.
    return f"{url.scheme}://{url.hostname}:{url.port}"


async def _close_quietly(nc: Any, timeout: float = 2.0) -> None:
    try:
        await asyncio.wait_for(nc.close(), timeout=timeout)
    except Exception:  # noqa: BLE001
        log.debug("closing the NATS connection failed", exc_info=True)
