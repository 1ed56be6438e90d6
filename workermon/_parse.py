"""Bytes from the wire → typed updates.

Every malformed input becomes a :class:`Malformed` exception with a short,
stable ``reason`` that callers count; nothing here logs, blocks or keeps
state between calls, so the functions are safe on any thread.

Decoding uses msgspec typed structs: they reject ``true``, ``5.0`` or ``"5"``
where an integer is required while decoding, at the lowest cost measured
(measured: ``python -m bench`` compares it with orjson and json), and skip unknown fields without building them.
"""

from __future__ import annotations

from typing import Annotated, Any, List, NamedTuple, Optional, Tuple, Union

import attrs
import msgspec

from ._model import Card, CardPut, ChannelPut, LoadReport, normalize_worker_id

__all__ = [
    "DEFAULT_MAX_CARD_BYTES",
    "DEFAULT_MAX_LOAD_BYTES",
    "KV_METRICS",
    "Malformed",
    "channel_prefix",
    "parse_card",
    "parse_channel",
    "KvEnvelope",
    "ZmqMessage",
    "parse_kv_envelope",
    "parse_zmq_frames",
    "parse_load",
    "parse_load_fields",
    "worker_id_from_key",
]

DEFAULT_MAX_LOAD_BYTES = 64 * 1024
DEFAULT_MAX_CARD_BYTES = 1024 * 1024

_I64_MAX = (1 << 63) - 1
_U64 = 1 << 64
# Counts are JSON integers >= 0.  The upper bound keeps absurd values (which
# msgspec would happily turn into huge Python ints) out of the arithmetic.
Count = Annotated[int, msgspec.Meta(ge=0, le=_I64_MAX)]
Rank = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]
DpSize = Annotated[int, msgspec.Meta(ge=1, le=(1 << 31) - 1)]


class Malformed(ValueError):
    """Input that cannot be used; ``reason`` is a short counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- load reports -----------------------------------------------------------


class _KvStats(msgspec.Struct):
    kv_active_blocks: Optional[Count] = None


class _WorkerStats(msgspec.Struct):
    data_parallel_rank: Optional[Rank] = None


class _LoadEventData(msgspec.Struct):
    worker_stats: Optional[_WorkerStats] = None
    kv_stats: Optional[_KvStats] = None


class _LoadPayload(msgspec.Struct):
    """Both load shapes in one struct: they are told apart by their fields.

    ``LoadEvent`` (Dynamo ≤ 0.7) carries ``data``; ``ActiveLoad`` (0.8+)
    carries ``dp_rank`` and the flat load fields.
    """

    worker_id: int
    data: Optional[_LoadEventData] = None
    dp_rank: Optional[Rank] = None
    active_decode_blocks: Optional[Count] = None
    active_prefill_tokens: Optional[Count] = None
    kv_used_blocks: Optional[Count] = None
    load_report_revision: Optional[Count] = None


class _Envelope(msgspec.Struct):
    """Dynamo 0.9+ event-plane envelope; only the payload matters here."""

    payload: bytes


_json_load = msgspec.json.Decoder(_LoadPayload)
_msgpack_load = msgspec.msgpack.Decoder(_LoadPayload)
_msgpack_envelope = msgspec.msgpack.Decoder(_Envelope)

# First bytes of a msgpack map: fixmap, map16, map32.
_MSGPACK_MAP = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _decode_json(data: bytes) -> _LoadPayload:
    # msgspec skips unknown fields without checking their UTF-8; JSON must be
    # UTF-8 throughout.  The ASCII check is nearly free for real payloads.
    if not data.isascii():
        data.decode("utf-8")
    return _json_load.decode(data)


def _decode_payload(data: bytes) -> _LoadPayload:
    if data[0] in _MSGPACK_MAP:
        return _msgpack_load.decode(data)
    return _decode_json(data)


LoadFields = Tuple[int, int, Optional[int], Optional[int], Optional[int], Optional[int]]


def parse_load_fields(
    data: Union[bytes, bytearray, memoryview],
    max_bytes: int = DEFAULT_MAX_LOAD_BYTES,
    bare: bool = False,
) -> LoadFields:
    """Parse one load message into ``(worker_id, dp_rank, kv_used, decode, prefill, revision)``.

    ``kv_used`` is the worker's own count (ActiveLoad's ``kv_used_blocks``,
    LoadEvent's ``kv_active_blocks``), ``decode`` a router's estimate
    (``active_decode_blocks``): two signals, never merged here.  ``bare``
    says ``data`` is an ActiveLoad body already out of its envelope (ZMQ).
    The reducer's hot path: a plain tuple, no value object per message.
    Raises :class:`Malformed` for anything that is not a valid report.
    """
    if len(data) > max_bytes:
        raise Malformed("oversized", f"{len(data)} bytes > {max_bytes}")
    if not data:
        raise Malformed("empty")
    raw = data if type(data) is bytes else bytes(data)
    try:
        if bare:
            msg = _msgpack_load.decode(raw)
        elif raw[0] in _MSGPACK_MAP:
            payload_bytes = _msgpack_envelope.decode(raw).payload
            if not payload_bytes:
                raise Malformed("bad_envelope", "empty payload")
            msg = _decode_payload(payload_bytes)
        else:
            msg = _decode_json(raw)
    except msgspec.ValidationError as exc:
        raise Malformed("bad_field", str(exc)) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise Malformed("bad_encoding", str(exc)) from None
    worker_id = msg.worker_id
    if not 0 <= worker_id < _U64:
        try:
            worker_id = normalize_worker_id(worker_id)
        except ValueError as exc:
            raise Malformed("bad_field", str(exc)) from None

    dp_rank = msg.dp_rank
    kv = msg.kv_used_blocks
    data_ = msg.data
    if data_ is not None:
        if kv is None and data_.kv_stats is not None:
            kv = data_.kv_stats.kv_active_blocks
        if dp_rank is None and data_.worker_stats is not None:
            dp_rank = data_.worker_stats.data_parallel_rank
    return worker_id, dp_rank or 0, kv, msg.active_decode_blocks, msg.active_prefill_tokens, msg.load_report_revision


def parse_load(
    data: Union[bytes, bytearray, memoryview], max_bytes: int = DEFAULT_MAX_LOAD_BYTES, bare: bool = False
) -> LoadReport:
    """Parse one load message (LoadEvent or ActiveLoad, JSON or msgpack envelope).

    Raises :class:`Malformed` for anything that is not a valid report.
    """
    wid, rank, kv, decode, prefill, revision = parse_load_fields(data, max_bytes, bare)
    return LoadReport(wid, rank, kv, prefill, revision, decode)


# --- worker cards -----------------------------------------------------------


class _RuntimeConfig(msgspec.Struct):
    total_kv_blocks: Optional[Count] = None
    data_parallel_size: Optional[DpSize] = None
    data_parallel_start_rank: Optional[Rank] = None
    max_num_batched_tokens: Optional[Count] = None


# The card fields Dynamo's card checksum covers (frontends since 1.5 admit a
# worker only when they equal those of its model's incumbent configuration).
# ``runtime_config`` is not among them: capacity and ranks may differ freely.
ADMISSION_FIELDS = (
    "display_name", "source_path", "model_info", "tokenizer", "prompt_formatter", "chat_template_file",
    "gen_config", "extra_files", "prompt_context", "context_length", "kv_cache_block_size", "worker_type",
    "needs", "router_config", "aliases",
)


class _CardBody(msgspec.Struct):
    runtime_config: Optional[_RuntimeConfig] = None
    display_name: Optional[str] = None
    # 1.6 cards: "aggregated", "prefill", "decode"; anything else is kept as is.
    worker_type: Optional[str] = None
    model_type: Any = None
    model_input: Any = None
    architectural_max_context_length: Any = None
    # Admission fields of any JSON shape (decoded generically, compared canonically).
    source_path: Any = None
    model_info: Any = None
    tokenizer: Any = None
    prompt_formatter: Any = None
    chat_template_file: Any = None
    gen_config: Any = None
    extra_files: Any = None
    prompt_context: Any = None
    context_length: Any = None
    kv_cache_block_size: Any = None
    needs: Any = None
    router_config: Any = None
    aliases: Any = None


class _CardDoc(_CardBody):
    """A card at the top level (Dynamo 0.6) or wrapped in ``card_json`` (0.7+, which names its endpoint)."""

    card_json: Optional[_CardBody] = None
    # Strings in 0.7+; older cards used other shapes under these names (then the key decides).
    namespace: Any = None
    component: Any = None
    endpoint: Any = None


_json_card = msgspec.json.Decoder(_CardDoc)
_json_canonical = msgspec.json.Encoder(order="sorted")


def _by_checksum(value: Any) -> Any:
    """A card value with every file artifact reduced to its checksum (its path may differ per host)."""
    if isinstance(value, dict):
        if isinstance(value.get("checksum"), str):
            return {"checksum": value["checksum"]}
        return {k: _by_checksum(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_checksum(v) for v in value]
    return value


def _admission(body: _CardBody) -> Tuple[Tuple[str, str], ...]:
    fields = []
    for name in ADMISSION_FIELDS:
        value = getattr(body, name)
        if name == "context_length" and not value:
            value = body.architectural_max_context_length  # the effective context length
        value = _by_checksum(value)
        if name == "extra_files" and isinstance(value, list):
            value = sorted(value, key=lambda v: _json_canonical.encode(v))
        fields.append((name, _json_canonical.encode(value).decode()))
    return tuple(fields)


def _file_ref(value: Any, kind: str) -> Optional[Tuple[str, str]]:
    """``(path, checksum)`` of a card's file artifact ``{kind: {path, checksum}}``, else None."""
    ref = value.get(kind) if isinstance(value, dict) else None
    if isinstance(ref, dict) and isinstance(ref.get("path"), str) and len(ref["path"]) <= 4096:
        checksum = ref.get("checksum")
        return ref["path"], checksum if isinstance(checksum, str) else ""
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else _json_canonical.encode(value).decode()


def _endpoint_of(key: str, doc: _CardDoc) -> Tuple[str, str, str]:
    """(namespace, component, endpoint): the card's own, else its key ``v1/mdc/{ns}/{component}/{endpoint}/{id}``."""
    parts = key.split("/")
    from_key = parts[2:5] if len(parts) == 6 and parts[0] == "v1" else ["", "", ""]
    own = [v if isinstance(v, str) and v else None for v in (doc.namespace, doc.component, doc.endpoint)]
    return (own[0] or from_key[0], own[1] or from_key[1], own[2] or from_key[2])


def worker_id_from_key(key: str, lease: int) -> int:
    """The worker id of a card: its lease, else the key's last segment in hex."""
    if lease:
        try:
            return normalize_worker_id(lease)
        except ValueError as exc:
            raise Malformed("bad_key", str(exc)) from None
    last = key.rsplit("/", 1)[-1]
    try:
        if not last or last.startswith(("-", "+")) or "_" in last:
            raise ValueError(last)
        value = int(last, 16)
        return normalize_worker_id(value)
    except ValueError:
        raise Malformed("bad_key", f"no lease and no hex id in {key!r}") from None


def parse_card(
    key: Union[bytes, str],
    value: bytes,
    lease: int,
    max_bytes: int = DEFAULT_MAX_CARD_BYTES,
    create_revision: int = 0,
) -> CardPut:
    """Parse one etcd key/value/lease into a :class:`CardPut`.

    Raises :class:`Malformed`; the caller keeps the key's previous card.
    """
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("bad_key", "key is not UTF-8") from None
    if len(value) > max_bytes:
        raise Malformed("oversized", f"{len(value)} bytes > {max_bytes}")
    worker_id = worker_id_from_key(key, lease)
    try:
        if not value.isascii():
            value.decode("utf-8")
        doc = _json_card.decode(value)
    except msgspec.ValidationError as exc:
        raise Malformed("bad_field", str(exc)) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise Malformed("bad_encoding", str(exc)) from None
    body: _CardBody = doc.card_json if doc.card_json is not None else doc
    rc = body.runtime_config
    name, kind = body.display_name, body.worker_type
    if name is not None and len(name) > 1024:
        name = name[:1024]
    if kind is not None and len(kind) > 64:
        raise Malformed("bad_field", "worker_type is longer than 64 characters")
    try:
        config = _admission(body)
        worker_set = (name or "", *_endpoint_of(key, doc), _text(body.model_type), _text(body.model_input), kind or "")
    except (msgspec.EncodeError, RecursionError, TypeError) as exc:
        raise Malformed("bad_field", f"card fields: {exc}") from None
    bs = body.kv_cache_block_size
    card = Card(display_name=name, worker_type=kind, worker_set=worker_set, config=config,
                kv_cache_block_size=bs if type(bs) is int and 0 < bs <= 1 << 20 else None,
                tokenizer_file=_file_ref(body.tokenizer, "hf_tokenizer_json"),
                tokenizer_config_file=_file_ref(body.prompt_formatter, "hf_tokenizer_config_json"))
    if rc is not None:
        card = attrs.evolve(
            card,
            total_kv_blocks=rc.total_kv_blocks,
            data_parallel_size=rc.data_parallel_size if rc.data_parallel_size is not None else 1,
            data_parallel_start_rank=rc.data_parallel_start_rank or 0,
            max_num_batched_tokens=rc.max_num_batched_tokens,
        )
    return CardPut(key=key, worker_id=worker_id, card=card, create_revision=create_revision)


# --- event channels (Dynamo 1.6, etcd) ------------------------------------------

KV_METRICS = "kv_metrics"
KV_EVENTS = "kv-events"


def path_segment(name: str) -> str:
    """One path segment as Dynamo writes it: ``[A-Za-z0-9_-]`` kept, every other byte ``%XX``."""
    out = []
    for byte in name.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else f"%{byte:02X}")
    return "".join(out)


def channel_prefix(namespace: str, component: Optional[str] = None, endpoint: Optional[str] = None) -> str:
    """The etcd prefix of the event channels of a namespace (narrowed to a component/endpoint)."""
    prefix = f"v1/event_channels/namespace/{path_segment(namespace)}/"
    if component is not None:
        prefix += f"component/{path_segment(component)}/"
        if endpoint is not None:
            prefix += f"endpoint/{path_segment(endpoint)}/topic/{KV_METRICS}/"
    return prefix


class _TransportConfig(msgspec.Struct):
    endpoint: Optional[str] = None  # ZMQ; other transports' fields are skipped


class _Transport(msgspec.Struct):
    kind: str
    config: Optional[_TransportConfig] = None


class _ChannelDoc(msgspec.Struct):
    topic: str
    instance_id: int
    transport: _Transport


_json_channel = msgspec.json.Decoder(_ChannelDoc)


EVENT_CHANNELS = "v1/event_channels/"


def channel_scope(key: str) -> Optional[Tuple[str, str, Optional[str], str]]:
    """``(namespace, component, endpoint or None, topic)`` of an event-channel key in either layout, else None.

    Dynamo 1.4+: ``v1/event_channels/namespace/{ns}/component/{c}/endpoint/{e}/topic/{topic}/{id}``.
    Dynamo 1.3: ``v1/event_channels/{ns}/{c}/{topic}/{id}`` (``c`` empty for ``kv_metrics``).
    """
    if not key.startswith(EVENT_CHANNELS):
        return None
    parts = key[len(EVENT_CHANNELS):].split("/")
    if (len(parts) == 9 and parts[0] == "namespace" and parts[2] == "component" and parts[4] == "endpoint"
            and parts[6] == "topic"):
        return parts[1], parts[3], parts[5], parts[7]
    if len(parts) == 4 and parts[0] and parts[2]:
        return parts[0], parts[1], None, parts[2]
    return None


def parse_channel(key: Union[bytes, str], value: bytes, lease: int, max_bytes: int = DEFAULT_MAX_CARD_BYTES,
                  namespace: Optional[str] = None, component: Optional[str] = None,
                  endpoint_name: Optional[str] = None, topic_name: str = KV_METRICS) -> Optional[ChannelPut]:
    """Parse one event-channel key/value/lease (either layout); None for another topic or scope.

    With ``namespace`` (and ``component`` / ``endpoint_name``) only that
    scope's channels are taken; a 1.3 ``kv_metrics`` channel names no
    component (it is empty), so it is taken for any component of its
    namespace.  Raises :class:`Malformed` for a ``kv_metrics`` channel that
    cannot be used, ``unknown_layout`` for a ``kv_metrics`` key in a layout
    this release of workermon does not know.
    """
    if isinstance(key, bytes):
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("bad_key", "key is not UTF-8") from None
    scope = channel_scope(key)
    if scope is None:
        if topic_name in key:
            raise Malformed("unknown_layout", key[:200])
        return None
    ns, comp, ep, topic = scope
    if topic != topic_name:
        return None
    if namespace is not None and ns != path_segment(namespace):
        return None
    if component is not None and comp and comp != path_segment(component):
        return None
    if endpoint_name is not None and ep is not None and ep != path_segment(endpoint_name):
        return None
    if len(value) > max_bytes:
        raise Malformed("oversized", f"{len(value)} bytes > {max_bytes}")
    if not lease:
        raise Malformed("bad_key", "an event channel without a lease names no worker")
    try:
        worker_id = normalize_worker_id(lease)
        if not value.isascii():
            value.decode("utf-8")
        doc = _json_channel.decode(value)
        publisher_id = normalize_worker_id(doc.instance_id)
        endpoint: Optional[str] = None
        if doc.transport.kind.lower() == "zmq":
            endpoint = doc.transport.config.endpoint if doc.transport.config is not None else None
            if endpoint is None:
                raise Malformed("bad_field", "ZMQ transport without an endpoint")
            if not endpoint.startswith("tcp://") or len(endpoint) > 300:
                raise Malformed("bad_endpoint", f"not a tcp:// endpoint: {endpoint[:100]!r}")
    except msgspec.ValidationError as exc:
        raise Malformed("bad_field", str(exc)) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise Malformed("bad_encoding", str(exc)) from None
    except ValueError as exc:
        raise Malformed("bad_field", str(exc)) from None
    if doc.topic != topic_name:
        raise Malformed("bad_field", f"topic {doc.topic[:50]!r} disagrees with the key")
    return ChannelPut(key=key, publisher_id=publisher_id, worker_id=worker_id, endpoint=endpoint)


# --- ZMQ frames (Dynamo 1.6's event plane) ----------------------------------------


class _ZmqEnvelope(msgspec.Struct):
    publisher_id: int
    sequence: int
    topic: str
    payload: bytes


_msgpack_zmq_envelope = msgspec.msgpack.Decoder(_ZmqEnvelope)


class ZmqMessage(NamedTuple):
    """One event-plane message, checked: who sent it, its place in that publisher's sequence, its payload."""

    publisher_id: int
    sequence: int
    payload: bytes


class KvEnvelope(NamedTuple):
    """A NATS event-plane envelope: its publisher and its payload."""

    publisher_id: int
    payload: bytes


def parse_zmq_frames(frames: List[bytes], topic: bytes, max_bytes: int = DEFAULT_MAX_LOAD_BYTES) -> ZmqMessage:
    """Validate one 4-frame event-plane message: ``(publisher_id, sequence, payload)``.

    Frames: 0 the topic (equal to ``topic``), 1 the publisher id and 2 the
    sequence (8 bytes big-endian each), 3 a version byte ``0x01``, a 4-byte
    big-endian length N and N bytes of msgpack envelope whose publisher id,
    sequence and topic must agree with the frames.  ``payload`` is the
    envelope's ActiveLoad bytes.  Raises :class:`Malformed` (reasons:
    ``bad_frame_count``, ``wrong_topic``, ``bad_publisher_id``,
    ``bad_sequence``, ``bad_header``, ``bad_length``, ``oversized``,
    ``bad_envelope``, ``identity_mismatch``).
    """
    if len(frames) != 4:
        raise Malformed("bad_frame_count", f"{len(frames)} frames, 4 expected")
    f0, f1, f2, f3 = frames
    if f0 != topic:
        raise Malformed("wrong_topic", f"topic frame {bytes(f0[:60])!r}")
    if len(f1) != 8:
        raise Malformed("bad_publisher_id", f"{len(f1)}-byte publisher id frame")
    if len(f2) != 8:
        raise Malformed("bad_sequence", f"{len(f2)}-byte sequence frame")
    if len(f3) < 5 or f3[0] != 1:
        raise Malformed("bad_header", "frame 3 does not start with version byte 0x01 and a length")
    n = int.from_bytes(f3[1:5], "big")
    if n != len(f3) - 5:
        raise Malformed("bad_length", f"length {n} disagrees with the {len(f3) - 5} bytes that follow")
    if n > max_bytes:
        raise Malformed("oversized", f"{n} bytes > {max_bytes}")
    publisher_id = int.from_bytes(f1, "big")
    sequence = int.from_bytes(f2, "big")
    try:
        env = _msgpack_zmq_envelope.decode(f3[5:])
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise Malformed("bad_envelope", str(exc)) from None
    # With a broker the topic frame is the full subject; the envelope may name either.
    env_topic = env.topic.encode()
    if env.publisher_id != publisher_id or env.sequence != sequence or (
        env_topic != topic and env_topic != topic.rsplit(b".", 1)[-1]
    ):
        raise Malformed("identity_mismatch", "the envelope disagrees with the frames")
    if not env.payload:
        raise Malformed("bad_envelope", "empty payload")
    return ZmqMessage(publisher_id, sequence, env.payload)


def parse_kv_envelope(data: bytes, topic: str) -> KvEnvelope:
    """One NATS event-plane message (Dynamo 1.1+): ``(publisher_id, payload)`` of its msgpack envelope,
    whose topic must be ``topic``.  Raises :class:`Malformed` (``bad_envelope``, ``wrong_topic``)."""
    try:
        env = _msgpack_zmq_envelope.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise Malformed("bad_envelope", str(exc)[:200]) from None
    if env.topic != topic:
        raise Malformed("wrong_topic", f"envelope topic {env.topic[:60]!r}")
    if not env.payload:
        raise Malformed("bad_envelope", "empty payload")
    return KvEnvelope(env.publisher_id, env.payload)
