"""Frozen value objects that cross threads.

Everything in this module is immutable, so a reader on any thread can hold a
reference without a lock.  Nothing here imports ``threading``.
"""

from __future__ import annotations

import math
import types
from typing import Any, Literal, Mapping, Optional, Tuple, Union

import attrs

__all__ = [
    "BusyChange",
    "Card",
    "CardDelete",
    "CardListing",
    "CardPut",
    "ChannelDelete",
    "ChannelListing",
    "ChannelPut",
    "Explanation",
    "FeedStatus",
    "LoadReport",
    "Overloaded",
    "PickState",
    "RankExplanation",
    "Thresholds",
    "WorkerLoadState",
    "normalize_worker_id",
]

U64 = 1 << 64
I64_MIN = -(1 << 63)

StalePolicy = Literal["ignore", "busy"]
OutagePolicy = Literal["keep", "ignore", "busy"]
EventPlane = Literal["auto", "nats", "zmq"]


def normalize_worker_id(value: int) -> int:
    """Map a worker id from either Dynamo convention to one unsigned 64-bit id.

    Dynamo releases have published ``instance_id`` both as ``i64`` and ``u64``;
    a negative id is the two's-complement twin of a large unsigned one, so both
    name the same lease.  Raises ``ValueError`` outside ``[-2**63, 2**64)``.
    """
    if value < I64_MIN or value >= U64:
        raise ValueError(f"worker id {value} is outside the 64-bit range")
    return value + U64 if value < 0 else value


def check_worker_id(value: Any) -> int:
    """``value`` unchanged if it is a worker id in either Dynamo convention (an ``int`` in
    ``[-2**63, 2**64)``); ``TypeError`` or ``ValueError`` otherwise, for ids from callers and peers."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"worker_id must be an integer, got {value!r}"[:200])
    normalize_worker_id(value)  # raises ValueError outside the 64-bit range
    return value


def _empty_mapping() -> Mapping[int, int]:
    return types.MappingProxyType({})


@attrs.frozen
class BusyChange:
    """One change of the busy set, delivered to ``on_busy_change`` callbacks.

    ``busy`` is the new busy set; ``became_busy`` entered it; ``became_free``
    left it and are still members; ``removed`` left it because they left the
    fleet.  ``version`` grows by one per change.
    """

    busy: frozenset[int]
    became_busy: frozenset[int]
    became_free: frozenset[int]
    removed: frozenset[int]
    version: int


@attrs.frozen
class WorkerLoadState:
    """What workermon knows about one worker, copied at one instant.

    ``kv_total_blocks`` is the card's capacity per data-parallel rank (None
    when unknown); ``kv_active_blocks`` maps each rank to the active blocks the
    KV rule acts on (the higher of the worker's own ``kv_used_blocks`` and a
    router's ``active_decode_blocks``; each is also shown on its own);
    ``last_report_age`` is seconds since the newest load report, or None.
    """

    worker_id: int
    kv_total_blocks: Optional[int]
    kv_active_blocks: Mapping[int, int] = attrs.field(factory=_empty_mapping)
    busy: bool = False
    last_report_age: Optional[float] = None
    active_prefill_tokens: Mapping[int, int] = attrs.field(factory=_empty_mapping)
    busy_ranks: frozenset[int] = frozenset()
    stale_ranks: frozenset[int] = frozenset()
    data_parallel_size: int = 1
    data_parallel_start_rank: int = 0
    max_num_batched_tokens: Optional[int] = None
    card_keys: Tuple[str, ...] = ()
    # The two KV signals apart (``kv_active_blocks`` shows the higher of the two per rank).
    kv_used_blocks: Mapping[int, int] = attrs.field(factory=_empty_mapping)
    active_decode_blocks: Mapping[int, int] = attrs.field(factory=_empty_mapping)
    display_name: Optional[str] = None
    worker_type: Optional[str] = None
    # Card admission (Dynamo 1.5+ frontends): False when the frontend would
    # refuse this worker because its card differs from the incumbent
    # configuration of its model (see ``WorkerMonitor.why``).  Such a worker
    # is in ``load_states()`` only: not in ``members()``, the busy set or any pick.
    admitted: bool = True
    # Seconds left of a hold set by ``Reservation.overloaded()`` (None: none).
    overload_hold_left: Optional[float] = None

    @property
    def declared_ranks(self) -> range:
        """The data-parallel ranks the card declares."""
        return range(self.data_parallel_start_rank, self.data_parallel_start_rank + self.data_parallel_size)

    @property
    def utilization(self) -> Optional[float]:
        """Highest ``active / total`` over the ranks, or None when unknown."""
        if not self.kv_total_blocks or not self.kv_active_blocks:
            return None
        return max(self.kv_active_blocks.values()) / self.kv_total_blocks


@attrs.frozen
class Card:
    """The fields of a model deployment card that the busy rule and card admission need.

    ``worker_set`` names the set of workers a frontend admits together:
    ``(display_name, namespace, component, endpoint, model_type, model_input,
    worker_type)``.  ``config`` holds, as ``(field, canonical JSON)`` pairs,
    the card fields Dynamo's card checksum covers (file artifacts by their
    checksums, not their paths); two cards of one worker set are compatible
    when their ``config`` is equal.
    """

    total_kv_blocks: Optional[int] = None
    data_parallel_size: int = 1
    data_parallel_start_rank: int = 0
    max_num_batched_tokens: Optional[int] = None
    display_name: Optional[str] = None
    worker_type: Optional[str] = None
    worker_set: Tuple[str, ...] = ()
    config: Tuple[Tuple[str, str], ...] = ()
    # KV-aware picking: the block size prompts are hashed in, and the files
    # (as the card names them: path, checksum) of its tokenizer and chat template.
    kv_cache_block_size: Optional[int] = None
    tokenizer_file: Optional[Tuple[str, str]] = None
    tokenizer_config_file: Optional[Tuple[str, str]] = None


@attrs.frozen
class CardPut:
    """A card stored under ``key`` for ``worker_id`` (from the etcd source)."""

    key: str
    worker_id: int
    card: Card
    # etcd's create revision of the key: the order in which workers
    # registered, which decides the incumbent of card admission.
    create_revision: int = 0


@attrs.frozen
class CardDelete:
    """The card under ``key`` was deleted or its lease expired."""

    key: str


@attrs.frozen
class CardListing:
    """A complete listing of the prefix at ``revision``.

    The reducer reconciles against it: cards absent from the listing are
    removed, so a listing after a compacted watch loses nothing.
    """

    cards: Tuple[CardPut, ...]
    revision: int
    # Keys present at ``revision`` whose value could not be parsed: they keep
    # the card the reducer had for them (none is created).
    malformed_keys: Tuple[str, ...] = ()


@attrs.frozen
class LoadReport:
    """One parsed load report for one worker and data-parallel rank.

    ``None`` means "not reported": the previous value for the rank stays.
    ``kv_active_blocks`` is the worker's own count (``kv_used_blocks``, or
    LoadEvent's ``kv_active_blocks``); ``active_decode_blocks`` a router's
    estimate: two signals, kept apart.
    """

    worker_id: int
    dp_rank: int = 0
    kv_active_blocks: Optional[int] = None
    active_prefill_tokens: Optional[int] = None
    revision: Optional[int] = None
    active_decode_blocks: Optional[int] = None


@attrs.frozen
class Thresholds:
    """The busy rule's settings (see the README's *The busy rule*).  Validated on construction."""

    busy_threshold: Optional[float] = 0.9
    recover_threshold: Optional[float] = None
    prefill_tokens_threshold: Optional[int] = None
    prefill_tokens_threshold_frac: Optional[float] = None
    metrics_ttl: Optional[float] = None
    stale_policy: StalePolicy = "ignore"
    outage_policy: OutagePolicy = "keep"
    outage_grace: float = 5.0

    def __attrs_post_init__(self) -> None:
        if self.busy_threshold is not None and (
            not _is_number(self.busy_threshold) or not 0.0 <= self.busy_threshold <= 1.0
        ):
            raise ValueError(f"busy_threshold must be a number in [0, 1] or None, got {self.busy_threshold!r}")
        if self.recover_threshold is not None:
            if self.busy_threshold is None:
                raise ValueError("recover_threshold needs busy_threshold (the KV rule is off)")
            if not _is_number(self.recover_threshold) or not (
                0.0 <= self.recover_threshold < self.busy_threshold
            ):
                raise ValueError(
                    "recover_threshold must be a number in [0, busy_threshold), "
                    f"got {self.recover_threshold!r}"
                )
        if self.prefill_tokens_threshold is not None and (
            isinstance(self.prefill_tokens_threshold, bool)
            or not isinstance(self.prefill_tokens_threshold, int)
            or self.prefill_tokens_threshold < 0
        ):
            raise ValueError(
                f"prefill_tokens_threshold must be an integer >= 0, got {self.prefill_tokens_threshold!r}"
            )
        if self.prefill_tokens_threshold_frac is not None and (
            not _is_number(self.prefill_tokens_threshold_frac)
            or self.prefill_tokens_threshold_frac < 0
            or not math.isfinite(self.prefill_tokens_threshold_frac)
        ):
            raise ValueError(
                "prefill_tokens_threshold_frac must be a finite number >= 0, "
                f"got {self.prefill_tokens_threshold_frac!r}"
            )
        if self.metrics_ttl is not None and (
            not _is_number(self.metrics_ttl) or self.metrics_ttl <= 0 or not math.isfinite(self.metrics_ttl)
        ):
            raise ValueError(f"metrics_ttl must be a number of seconds > 0, got {self.metrics_ttl!r}")
        if self.stale_policy not in ("ignore", "busy"):
            raise ValueError(f"stale_policy must be 'ignore' or 'busy', got {self.stale_policy!r}")
        if self.outage_policy not in ("keep", "ignore", "busy"):
            raise ValueError(f"outage_policy must be 'keep', 'ignore' or 'busy', got {self.outage_policy!r}")
        if not _is_number(self.outage_grace) or self.outage_grace < 0:
            raise ValueError(f"outage_grace must be a number of seconds >= 0, got {self.outage_grace!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@attrs.frozen
class ChannelPut:
    """A ``kv_metrics`` event channel registered in etcd (Dynamo 1.6's ZMQ plane).

    ``publisher_id`` is the channel's ``instance_id`` (not the worker id);
    ``worker_id`` is the key's lease; ``endpoint`` the PUB socket's
    ``tcp://host:port``, or None when the channel is not on ZMQ.
    """

    key: str
    publisher_id: int
    worker_id: int
    endpoint: Optional[str]


@attrs.frozen
class ChannelDelete:
    """The channel under ``key`` was deleted or its lease expired."""

    key: str


@attrs.frozen
class ChannelListing:
    """Every ``kv_metrics`` channel under the prefix at ``revision`` (reconciled like cards)."""

    channels: Tuple[ChannelPut, ...]
    revision: int
    malformed_keys: Tuple[str, ...] = ()


@attrs.frozen
class PickState:
    """What picking needs of one worker, copied at one instant (the host agent publishes it).

    ``ranks`` holds, for each declared rank from ``dp_start`` on (at most the
    per-worker rank cap), ``(load, report_seq, busy)``: the higher of the two
    KV signals (None: no data the rule uses), the number of reports applied to
    the rank (bookings made before the newest one stop counting), and the
    busy rule's verdict for the rank.
    """

    worker_id: int
    admitted: bool
    busy: bool
    held: bool
    total: Optional[int]
    dp_start: int
    display_name: Optional[str]
    worker_type: Optional[str]
    ranks: Tuple[Tuple[Optional[int], int, bool], ...]


@attrs.frozen
class Overloaded:
    """The frontend answered 529 for a request on ``worker_id`` (see ``Reservation.overloaded``)."""

    worker_id: int
    hold: float


@attrs.frozen
class FeedStatus:
    """The metrics feed (NATS) went down or came back, at ``at`` (monotonic)."""

    up: bool
    at: float


Update = Union[CardPut, CardDelete, CardListing, LoadReport, FeedStatus]


@attrs.frozen
class RankExplanation:
    """One declared rank in :class:`Explanation`: its values and what each was held against."""

    rank: int
    reported: bool
    kv_used_blocks: Optional[int]
    active_decode_blocks: Optional[int]
    active_prefill_tokens: Optional[int]
    kv_total_blocks: Optional[int]
    kv_limit: Optional[float]  # busy_threshold × total (recover_threshold × total while held over)
    busy: bool
    stale: bool
    report_age: Optional[float]
    booked_blocks: int
    why: str
    # Whether reserve() could book a request of the asked size on this rank now
    # (free by the rule, and room below the threshold beside its bookings).
    pickable: bool = True


@attrs.frozen
class Explanation:
    """Why a worker is (or is not) busy right now: see :meth:`WorkerMonitor.why`."""

    worker_id: int
    member: bool
    busy: bool
    ranks: Tuple[RankExplanation, ...]
    thresholds: Thresholds
    outage_policy: str
    outage_active: bool
    bookings_in_flight: int
    summary: str
    # False: the frontend would refuse the worker (card admission; the summary says which field differs).
    admitted: bool = True
    # Seconds left of a hold set by ``Reservation.overloaded()`` (None: none).
    overload_hold_left: Optional[float] = None
    # kv_index=True: per rank, its cached blocks, whether its view is complete,
    # and its overlap and cost in the last kv pick.
    kv: Tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"worker {self.worker_id:x}: {self.summary}"]
        for r in self.ranks:
            lines.append(f"  rank {r.rank}: {r.why}")
        for line in self.kv:
            lines.append(f"  kv {line}")
        th = self.thresholds
        rule = "KV rule off" if th.busy_threshold is None else f"busy_threshold {th.busy_threshold:g}"
        if th.recover_threshold is not None:
            rule += f", recover_threshold {th.recover_threshold:g}"
        if th.prefill_tokens_threshold is not None:
            rule += f", prefill_tokens_threshold {th.prefill_tokens_threshold}"
        if th.prefill_tokens_threshold_frac is not None:
            rule += f", prefill_tokens_threshold_frac {th.prefill_tokens_threshold_frac:g}"
        if th.metrics_ttl is not None:
            rule += f", metrics_ttl {th.metrics_ttl:g} s ({th.stale_policy})"
        outage = f"outage policy {self.outage_policy!r}" + (" (in force now)" if self.outage_active else "")
        lines.append(f"  rule: {rule}; {outage}; {self.bookings_in_flight} reservation(s) in flight")
        return "\n".join(lines)
