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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs
import grpc

from .._health import Backoff, SourceStatus
from . import Source
from .backlog import Backlog
from .._model import CardDelete, CardListing
from .._parse import DEFAULT_MAX_CARD_BYTES, Malformed, parse_card

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


class _Backlogged(Exception):
    """The reducer is too far behind: stop the watch, list afresh once it caught up."""


def make_client(cfg: EtcdConfig, url: str, track: Optional[Callable[[Any], None]] = None) -> Any:
    """An etcd-sdk-python client for one endpoint, with the measured options.

    With a user and password it authenticates with a cancellable call:
    ``track`` receives the pending call, so ``stop()`` can cancel it (the
    library's own authentication in its constructor would block uncancellably).
    """
    import pyetcd
    from pyetcd import etcdrpc
    from pyetcd.client import EtcdTokenCallCredentials

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
    client = pyetcd.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=cfg.timeout)
    if cfg.user is not None:
        try:
            future = client.authstub.Authenticate.future(
                etcdrpc.AuthenticateRequest(name=cfg.user, password=cfg.password), cfg.timeout
            )
            if track is not None:
                track(future)
            token = future.result().token
        except BaseException:
            client.close()
            raise
        # etcd reads the token from the request metadata.  gRPC refuses call
        # credentials on a plaintext channel ("does not have a sufficient
        # security level"), so they are added only with TLS.
        client.metadata = (("token", token),)
        if creds is not None:
            client.call_credentials = grpc.metadata_call_credentials(EtcdTokenCallCredentials(token))
    return client


@attrs.frozen
class Watched:
    """One prefix the etcd source lists and watches, and what its keys become.

    ``parse(key, value, lease, create_revision)`` returns the put update (None: a key of no
    interest, e.g. another topic) or raises :class:`Malformed`;
    ``delete(key)`` and ``listing(items, revision, malformed_keys)`` build
    the other two updates; ``emit`` receives them.  ``backlogged`` says the
    updates wait in the reducer's queue, bounded by the source's backlog.
    """

    name: str
    prefix: str
    parse: Callable[[bytes, bytes, int, int], Optional[object]]
    delete: Callable[[str], object]
    listing: Callable[[Tuple[Any, ...], int, Tuple[str, ...]], object]
    emit: Optional[Callable[[object], None]] = None
    backlogged: bool = True

    @property
    def range(self) -> Tuple[bytes, bytes]:
        key = self.prefix.encode("utf-8")
        return key, _prefix_range_end(key)


def card_watch(prefix: str, max_card_bytes: int = DEFAULT_MAX_CARD_BYTES) -> Watched:
    """The worker cards: CardPut / CardDelete / CardListing for the reducer."""
    return Watched(
        name="cards",
        prefix=prefix,
        parse=lambda k, v, lease, created: parse_card(k, v, lease, max_card_bytes, created),
        delete=lambda key: CardDelete(key=key),
        listing=lambda items, rev, bad: CardListing(cards=items, revision=rev, malformed_keys=bad),
    )


class EtcdSource(Source):
    """``workermon-etcd``: lists and watches each :class:`Watched` prefix on one stream.

    By default only the cards (``cfg.prefix``); the monitor adds the event
    channels of Dynamo 1.6's ZMQ plane, which go to the ZMQ source.
    """

    def __init__(
        self,
        cfg: EtcdConfig,
        emit: Callable[[object], None],
        stopping: threading.Event,
        status: SourceStatus,
        backlog: Optional[Backlog] = None,
        extra: Sequence[Watched] = (),
    ) -> None:
        # Watch events waiting for the reducer are bounded: past the bound the
        # watch is dropped and, once the reducer caught up, one fresh listing
        # replaces everything that was missed (a listing reconciles).
        super().__init__("etcd", stopping, status, backlog if backlog is not None else Backlog(1 << 62))
        self._cfg = cfg
        self._put = emit
        self.watched: Tuple[Watched, ...] = (card_watch(cfg.prefix, cfg.max_card_bytes),) + tuple(extra)
        self._call_lock = threading.Lock()
        self._call: Any = None
        self._endpoint_index = 0
        # A kv_metrics event-channel key in a layout this workermon does not know (a newer Dynamo).
        self.unknown_layout: Optional[str] = None

    # --- stopping ---------------------------------------------------------------

    def wake(self, deadline: Optional[float] = None) -> None:
        """Cancel whatever gRPC call the thread is blocked in (any thread)."""
        with self._call_lock:
            call = self._call
        if call is not None:
            call.cancel()
        self.backlog.drained.set()

    def _emit(self, watched: Watched, item: object) -> None:
        if watched.emit is not None:
            watched.emit(item)
            return
        self.backlog.note_enqueued(1)
        self._put(item)

    def _track(self, call: Any) -> None:
        with self._call_lock:
            self._call = call
        if call is not None and self._stopping.is_set():
            call.cancel()

    # --- the loop ---------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self._stopping, self._cfg.backoff_initial, self._cfg.backoff_cap)
        # Last revision seen, per watched prefix; None = list again.
        revisions: Optional[List[int]] = None
        self.status.state = "connecting"
        prefixes = ", ".join(w.prefix for w in self.watched)
        while not self._stopping.is_set():
            client = None
            try:
                url = self._cfg.endpoints[self._endpoint_index]
                self.status.endpoint = url
                client = make_client(self._cfg, url, self._track)
                if revisions is None:
                    if self.status.counters.get("listings"):
                        self.status.state = "resyncing"
                    revisions = [self._list(client)] * len(self.watched)
                for _ in self._watch(client, revisions):
                    backoff.reset()
            except _Compacted:
                self.status.inc("resyncs")
                log.warning("etcd watch revision was compacted; listing %s again", prefixes)
                revisions = None
                continue
            except _Backlogged:
                self.status.inc("resyncs")
                self.status.inc("backlog_resyncs")
                log.warning("workermon is %d etcd events behind; listing %s again once it caught up",
                            self.backlog.items, prefixes)
                revisions = None
                self._track(None)
                if not self.backlog.wait_drained(self._stopping):
                    break
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

    def _recovered(self) -> None:
        self.recovered()

    def _note_failure(self, exc: BaseException) -> None:
        if self.status.state in ("connected", "resyncing"):
            self.status.inc("reconnects")
        self.status.state = "reconnecting" if self.status.counters.get("listings") else "connecting"
        text = _describe(exc)
        url = self._cfg.endpoints[self._endpoint_index]
        if len(self._cfg.endpoints) > 1:
            self._endpoint_index = (self._endpoint_index + 1) % len(self._cfg.endpoints)
        expected = isinstance(exc, (grpc.RpcError, ConnectionError, OSError, TimeoutError)) or type(
            exc
        ).__module__.startswith("pyetcd")
        if not expected:
            self.status.inc("restarts")
        if expected:
            self.note_error(text, log, logging.WARNING, None, f"etcd {url}: {text}; retrying")
        else:
            self.note_error(text, log, logging.ERROR, exc, "etcd source failed unexpectedly; restarting it")

    def _list(self, client: Any) -> int:
        """Read every watched prefix at one revision and emit one listing for each."""
        while True:
            try:
                revision = 0
                listings = []
                for watched in self.watched:
                    items, malformed, revision = self._list_pages(client, watched, revision)
                    listings.append((watched, items, malformed))
                break
            except grpc.RpcError as exc:
                # The listing's revision was compacted between two pages: not
                # an error, just list again at the newest revision.
                if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                    raise
                self.status.inc("resyncs")
                log.info("etcd compacted the prefix while it was being listed; listing again")
        self._track(None)
        # Recovered before the listing is handed over: whoever sees it applied
        # (wait_ready(), health()) also sees the source connected, its error cleared.
        self.status.inc("listings")
        self.status.event()
        self._recovered()
        for watched, items, malformed in listings:
            self._emit(watched, watched.listing(tuple(items), revision, tuple(malformed)))
        return revision

    def _list_pages(self, client: Any, watched: Watched, revision: int) -> Tuple[List[Any], List[str], int]:
        """One prefix, page by page, at ``revision`` (0: the newest, which is returned)."""
        from pyetcd import etcdrpc

        items: List[Any] = []
        malformed: List[str] = []
        key, range_end = watched.range
        while True:
            req = etcdrpc.RangeRequest(key=key, range_end=range_end, limit=_PAGE, revision=revision)
            future = client.kvstub.Range.future(
                req, self._cfg.timeout, credentials=client.call_credentials, metadata=client.metadata
            )
            self._track(future)
            resp = future.result()
            if revision == 0:
                revision = resp.header.revision
            for kv in resp.kvs:
                try:
                    item = self._parse(watched, kv)
                except Malformed:
                    try:
                        malformed.append(kv.key.decode("utf-8"))
                    except UnicodeDecodeError:
                        pass  # nothing can be stored under such a key either
                    continue
                if item is not None:
                    items.append(item)
            if not resp.more or not resp.kvs:
                break
            key = resp.kvs[-1].key + b"\0"
            self._between_pages()
        return items, malformed, revision

    def _between_pages(self) -> None:
        """A seam for tests (compaction between two pages); nothing to do here."""

    def _watch(self, client: Any, revisions: List[int]) -> Iterator[None]:
        """Watch every prefix on one stream, each from its last revision + 1.

        ``revisions`` is updated in place as each watch moves; yields after
        each response.
        """
        from pyetcd import etcdrpc

        creates = []
        for watched, revision in zip(self.watched, revisions):
            key, range_end = watched.range
            creates.append(etcdrpc.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=revision + 1, progress_notify=True
            ))
        finished = threading.Event()

        def requests() -> Iterator[Any]:
            for create in creates:
                yield etcdrpc.WatchRequest(create_request=create)
            # Keep the request stream open until the call ends; gRPC reads
            # this generator on its own thread.
            finished.wait()

        call = etcdrpc.WatchStub(client.channel).Watch(
            requests(), credentials=client.call_credentials, metadata=client.metadata
        )
        self._track(call)
        # etcd answers the create requests in order: the n-th "created" names
        # the n-th prefix's watch id.
        index_of: Dict[int, int] = {}
        try:
            for resp in call:
                if resp.compact_revision:
                    raise _Compacted()
                if resp.canceled:
                    raise ConnectionError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason'}")
                if resp.created:
                    index_of[resp.watch_id] = len(index_of)
                    if len(index_of) == len(creates):
                        self._recovered()
                        yield  # every watch is live: the back-off starts afresh
                    continue
                i = index_of.get(resp.watch_id)
                if i is None or i >= len(self.watched):
                    continue
                watched = self.watched[i]
                if resp.events:
                    for ev in resp.events:
                        if watched.backlogged and watched.emit is None and self.backlog.full():
                            raise _Backlogged()
                        self._handle_event(watched, ev)
                        revisions[i] = max(revisions[i], ev.kv.mod_revision)
                else:
                    # A progress notification: everything up to here was sent.
                    revisions[i] = max(revisions[i], resp.header.revision)
                self.status.event()
                yield
            raise ConnectionError("etcd watch stream ended")
        finally:
            finished.set()
            call.cancel()  # ends the stream on every way out (a no-op once it has ended)

    def _handle_event(self, watched: Watched, ev: Any) -> None:
        self.status.inc("events")
        if ev.type == 1:  # DELETE (lease expiry included)
            try:
                key = ev.kv.key.decode("utf-8")
            except UnicodeDecodeError:
                self.status.inc("malformed")
                return
            self._emit(watched, watched.delete(key))
            return
        try:
            item = self._parse(watched, ev.kv)
        except Malformed:
            return
        if item is not None:
            self._emit(watched, item)

    def _parse(self, watched: Watched, kv: Any) -> Optional[object]:
        try:
            return watched.parse(kv.key, kv.value, kv.lease, kv.create_revision)
        except Malformed as exc:
            if exc.reason == "unknown_layout":
                self.unknown_layout = str(exc)[len("unknown_layout: "):]
            # Cards keep their historical counter names (malformed_<reason>).
            self.status.inc("malformed")
            label = "malformed" if watched.name == "cards" else f"malformed_{watched.name}"
            self.status.inc(f"{label}_{exc.reason}")
            log.debug("ignoring malformed %s value %r: %s", watched.name, kv.key[:200], exc)
            raise


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
