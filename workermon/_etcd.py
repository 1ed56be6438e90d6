"""The etcd source thread: list the card prefix, then watch it, forever.

``workermon-etcd`` lists the prefix (paged, at one revision), hands the whole
listing to the reducer to reconcile, then watches from the next revision.  A
broken stream is resumed from the last revision seen, with capped, jittered
back-off; a compacted revision triggers a new listing.  Every blocking gRPC
call is cancellable, so ``stop()`` wakes it at once.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import attrs
import grpc

from ._health import Backoff, SourceStatus
from ._model import CardDelete, CardListing, CardPut
from ._parse import DEFAULT_MAX_CARD_BYTES, Malformed, parse_card

log = logging.getLogger(__name__)

__all__ = ["EtcdConfig", "EtcdSource", "parse_etcd_endpoint"]

# Measured pitfalls of etcd-sdk-python (see README "Dependencies"): keepalive
# under 5 s makes etcd drop the client; 10 s pings with a 5 s ack timeout find
# a hung server within ~15 s; reconnect attempts are capped at 1 s apart.
_GRPC_OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
)
_PAGE = 256


def parse_etcd_endpoint(url: str) -> Tuple[str, int, bool]:
    """``http://host:port`` / ``https://…`` / ``host:port`` → (host, port, tls)."""
    text = url.strip()
    if not text:
        raise ValueError("empty etcd endpoint")
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {url!r}: scheme must be http or https")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"etcd endpoint {url!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {url!r}: unexpected path or query")
    return parts.hostname, port, parts.scheme == "https"


@attrs.frozen
class EtcdConfig:
    """How to reach etcd.  Secrets are kept out of ``repr``."""

    endpoints: Tuple[str, ...]
    prefix: str
    ca_cert: Optional[str] = None
    cert_key: Optional[str] = None
    cert_cert: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    timeout: float = 5.0
    max_card_bytes: int = DEFAULT_MAX_CARD_BYTES
    backoff_initial: float = 0.1
    backoff_cap: float = 2.0

    def __attrs_post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        for url in self.endpoints:
            parse_etcd_endpoint(url)
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd user and password go together")
        if (self.cert_key is None) != (self.cert_cert is None):
            raise ValueError("etcd cert_key and cert_cert go together")


def _prefix_range_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class _Compacted(Exception):
    pass


def make_client(cfg: EtcdConfig, url: str) -> Any:
    """An etcd-sdk-python client for one endpoint, with the measured options."""
    import pyetcd

    host, port, tls = parse_etcd_endpoint(url)
    creds = None
    if tls or cfg.ca_cert is not None:
        root = cert_key = cert_chain = None
        if cfg.ca_cert is not None:
            with open(cfg.ca_cert, "rb") as f:
                root = f.read()
        if cfg.cert_key is not None and cfg.cert_cert is not None:
            with open(cfg.cert_key, "rb") as f:
                cert_key = f.read()
            with open(cfg.cert_cert, "rb") as f:
                cert_chain = f.read()
        creds = grpc.ssl_channel_credentials(root, cert_key, cert_chain)
    endpoint = pyetcd.Endpoint(
        host,
        port,
        secure=creds is not None,
        creds=creds,
        # Without this one failure bans the endpoint for 300 s.
        time_retry=0,
        opts=list(_GRPC_OPTIONS),
    )
    client = pyetcd.MultiEndpointEtcd3Client(
        endpoints=[endpoint], timeout=cfg.timeout, user=cfg.user, password=cfg.password
    )
    if creds is None:
        # gRPC refuses call credentials on a plaintext channel ("does not have
        # a sufficient security level"); the auth token still travels in the
        # request metadata, which is what etcd reads.
        client.call_credentials = None
    return client


class EtcdSource(threading.Thread):
    """``workermon-etcd``: feeds CardListing / CardPut / CardDelete to ``emit``."""

    def __init__(
        self,
        cfg: EtcdConfig,
        emit: Callable[[object], None],
        stopping: threading.Event,
        status: SourceStatus,
    ) -> None:
        super().__init__(name="workermon-etcd", daemon=True)
        self._cfg = cfg
        self._emit = emit
        self._stopping = stopping
        self.status = status
        self._prefix = cfg.prefix.encode("utf-8")
        self._range_end = _prefix_range_end(self._prefix)
        self._call_lock = threading.Lock()
        self._call: Any = None
        self._endpoint_index = 0
        self._last_error_logged: Optional[str] = None

    # --- stopping ---------------------------------------------------------------

    def wake(self) -> None:
        """Cancel whatever gRPC call the thread is blocked in (any thread)."""
        with self._call_lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _track(self, call: Any) -> None:
        with self._call_lock:
            self._call = call
        if call is not None and self._stopping.is_set():
            call.cancel()

    # --- the loop ---------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self._stopping, self._cfg.backoff_initial, self._cfg.backoff_cap)
        revision: Optional[int] = None  # last revision seen; None = list again
        self.status.state = "connecting"
        while not self._stopping.is_set():
            client = None
            try:
                url = self._cfg.endpoints[self._endpoint_index]
                self.status.endpoint = url
                client = make_client(self._cfg, url)
                if revision is None:
                    if self.status.counters.get("listings"):
                        self.status.state = "resyncing"
                    revision = self._list(client)
                for revision in self._watch(client, revision):
                    backoff.reset()
                    self._last_error_logged = None
            except _Compacted:
                self.status.inc("resyncs")
                log.warning("etcd watch revision was compacted; listing %s again", self._cfg.prefix)
                revision = None
                continue
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                if self._stopping.is_set():
                    break
                self._note_failure(exc)
                if backoff.wait():
                    break
            finally:
                self._track(None)
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001
                        log.debug("closing etcd client failed", exc_info=True)
        self.status.state = "stopped"

    def _note_failure(self, exc: BaseException) -> None:
        self.status.inc("errors")
        if self.status.state in ("connected", "resyncing"):
            self.status.inc("reconnects")
        self.status.state = "reconnecting" if self.status.counters.get("listings") else "connecting"
        text = _describe(exc)
        self.status.last_error = text
        url = self._cfg.endpoints[self._endpoint_index]
        if len(self._cfg.endpoints) > 1:
            self._endpoint_index = (self._endpoint_index + 1) % len(self._cfg.endpoints)
        expected = isinstance(exc, (grpc.RpcError, ConnectionError, OSError, TimeoutError)) or type(
            exc
        ).__module__.startswith("pyetcd")
        if not expected:
            self.status.inc("restarts")
        # One line per distinct error, not one per retry.
        if text != self._last_error_logged:
            self._last_error_logged = text
            if expected:
                log.warning("etcd %s: %s; retrying", url, text)
            else:
                log.error("etcd source failed unexpectedly; restarting it", exc_info=exc)

    def _list(self, client: Any) -> int:
        """Read every card under the prefix at one revision and emit a listing."""
        from pyetcd import etcdrpc

        puts: List[CardPut] = []
        key = self._prefix
        revision = 0
        while True:
            req = etcdrpc.RangeRequest(key=key, range_end=self._range_end, limit=_PAGE, revision=revision)
            future = client.kvstub.Range.future(
                req, self._cfg.timeout, credentials=client.call_credentials, metadata=client.metadata
            )
            self._track(future)
            resp = future.result()
            if revision == 0:
                revision = resp.header.revision
            for kv in resp.kvs:
                put = self._parse(kv.key, kv.value, kv.lease)
                if put is not None:
                    puts.append(put)
            if not resp.more or not resp.kvs:
                break
            key = resp.kvs[-1].key + b"\0"
        self._track(None)
        self._emit(CardListing(cards=tuple(puts), revision=revision))
        self.status.inc("listings")
        self.status.event()
        self.status.state = "connected"
        return revision

    def _watch(self, client: Any, revision: int) -> Iterator[int]:
        """Watch from ``revision + 1``; yields the last revision seen as it moves."""
        from pyetcd import etcdrpc

        create = etcdrpc.WatchCreateRequest(
            key=self._prefix, range_end=self._range_end, start_revision=revision + 1, progress_notify=True
        )
        finished = threading.Event()

        def requests() -> Iterator[Any]:
            yield etcdrpc.WatchRequest(create_request=create)
            # Keep the request stream open until the call ends; gRPC reads
            # this generator on its own thread.
            finished.wait()

        call = etcdrpc.WatchStub(client.channel).Watch(
            requests(), credentials=client.call_credentials, metadata=client.metadata
        )
        self._track(call)
        try:
            for resp in call:
                if resp.compact_revision:
                    raise _Compacted()
                if resp.canceled:
                    raise ConnectionError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason'}")
                if resp.created:
                    self.status.state = "connected"
                    yield revision  # a live watch: the back-off starts afresh
                    continue
                if resp.events:
                    for ev in resp.events:
                        self._handle_event(ev)
                        revision = max(revision, ev.kv.mod_revision)
                else:
                    # A progress notification: everything up to here was sent.
                    revision = max(revision, resp.header.revision)
                self.status.event()
                yield revision
            raise ConnectionError("etcd watch stream ended")
        finally:
            finished.set()

    def _handle_event(self, ev: Any) -> None:
        self.status.inc("events")
        if ev.type == 1:  # DELETE (lease expiry included)
            try:
                key = ev.kv.key.decode("utf-8")
            except UnicodeDecodeError:
                self.status.inc("malformed")
                return
            self._emit(CardDelete(key=key))
            return
        put = self._parse(ev.kv.key, ev.kv.value, ev.kv.lease)
        if put is not None:
            self._emit(put)

    def _parse(self, key: bytes, value: bytes, lease: int) -> Optional[CardPut]:
        try:
            return parse_card(key, value, lease, self._cfg.max_card_bytes)
        except Malformed as exc:
            self.status.inc("malformed")
            self.status.inc(f"malformed_{exc.reason}")
            log.debug("ignoring malformed card %r: %s", key[:200], exc)
            return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        try:
            return f"{code().name if code else 'RPC error'}: {details() if details else exc}"
        except Exception:  # noqa: BLE001
            return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def endpoints_from(value: Optional[Sequence[str]], env: Optional[str]) -> Tuple[str, ...]:
    """Explicit endpoints, else a comma-separated environment value."""
    if value is not None:
        if isinstance(value, str):
            value = [value]
        return tuple(v.strip() for v in value if v.strip())
    if env:
        return tuple(v.strip() for v in env.split(",") if v.strip())
    return ()
