"""Option objects: small, frozen, validated when made (as httpx's ``Limits`` and ``Timeout``).

    WorkerMonitor(
        etcd=EtcdOptions(tls=TLS(ca="ca.pem", cert="client.pem", key="client-key.pem")),
        nats=NatsOptions(token=os.environ["MY_TOKEN"]),
        limits=Limits(max_queued_messages=50_000),
        reconnect=Reconnect(initial=0.2, cap=5.0),
        thresholds=Thresholds(busy_threshold=0.8, recover_threshold=0.6),
    )

What is not given here is read from Dynamo's own environment variables where
Dynamo has one (``ETCD_AUTH_*``, ``NATS_AUTH_*``, ``NATS_TLS_*``), else defaults.
Secrets never appear in ``repr``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import attrs

__all__ = ["EtcdOptions", "KvOptions", "Limits", "NatsOptions", "Reconnect", "TLS"]


def _path(name: str, value: Optional[str]) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a file path, got {value!r}")


def _seconds(name: str, value: float, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value < 0 if zero else value <= 0):
        raise ValueError(f"{name} must be a finite number of seconds {'>= 0' if zero else '> 0'}, got {value!r}")


def _count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@attrs.frozen
class TLS:
    """TLS for a connection: the CA to trust, and a client certificate and key (mutual TLS)."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            _path(f"TLS.{name}", getattr(self, name))
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS cert and key go together")


@attrs.frozen
class EtcdOptions:
    """How to reach etcd beyond its endpoints.  Unset fields come from ``ETCD_AUTH_*``."""

    tls: Optional[TLS] = None
    user: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    timeout: float = 5.0
    card_prefix: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd user and password go together")
        _seconds("EtcdOptions.timeout", self.timeout)
        if self.card_prefix is not None and (not isinstance(self.card_prefix, str) or not self.card_prefix):
            raise ValueError(f"EtcdOptions.card_prefix must be a non-empty string, got {self.card_prefix!r}")


def _subjects(value: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class NatsOptions:
    """How to reach NATS beyond its servers.  Unset fields come from ``NATS_AUTH_*`` / ``NATS_TLS_*``.

    One way to authenticate is used, in Dynamo's order: user and password,
    then token, then nkey (a seed; needs the ``nkeys`` package), then a
    credentials file.
    """

    tls: Optional[TLS] = None
    user: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    token: Optional[str] = attrs.field(default=None, repr=False)
    nkey: Optional[str] = attrs.field(default=None, repr=False)
    credentials: Optional[str] = None
    subjects: Optional[Tuple[str, ...]] = attrs.field(default=None, converter=_subjects)
    pending_msgs_limit: int = 512 * 1024

    def __attrs_post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("NATS user and password go together")
        _path("NatsOptions.credentials", self.credentials)
        if self.subjects is not None and (not self.subjects or not all(isinstance(x, str) and x for x in self.subjects)):
            raise ValueError(f"NatsOptions.subjects must be non-empty subject names, got {self.subjects!r}")
        _count("NatsOptions.pending_msgs_limit", self.pending_msgs_limit)

    @property
    def auth(self) -> Optional[str]:
        """Which way of authenticating applies: ``user``, ``token``, ``nkey``, ``credentials`` or None."""
        if self.user is not None:
            return "user"
        if self.token is not None:
            return "token"
        if self.nkey is not None:
            return "nkey"
        if self.credentials is not None:
            return "credentials"
        return None


@attrs.frozen
class Limits:
    """Every bound on input: message and card bytes, queued messages and bytes, held reports, ranks.

    Past each bound input is dropped and counted (see the README's options
    table for what each does); nothing grows without one.
    """

    max_load_bytes: int = 64 * 1024
    max_card_bytes: int = 1024 * 1024
    max_queued_messages: int = 200_000
    max_queued_bytes: int = 64 * 1024 * 1024
    pending_max_workers: int = 10_000
    pending_max_age: float = 30.0
    pending_max_ranks: int = 20_000
    max_ranks_per_worker: int = 1024

    def __attrs_post_init__(self) -> None:
        for name in ("max_load_bytes", "max_card_bytes", "max_queued_messages", "max_queued_bytes",
                     "max_ranks_per_worker"):
            _count(f"Limits.{name}", getattr(self, name))
        for name in ("pending_max_workers", "pending_max_ranks"):
            _count(f"Limits.{name}", getattr(self, name), 0)
        _seconds("Limits.pending_max_age", self.pending_max_age, zero=True)


@attrs.frozen
class Reconnect:
    """Capped, jittered exponential back-off between reconnects (etcd, NATS, ZMQ, the agent client)."""

    initial: float = 0.1
    cap: float = 2.0

    def __attrs_post_init__(self) -> None:
        _seconds("Reconnect.initial", self.initial)
        _seconds("Reconnect.cap", self.cap)
        if self.cap < self.initial:
            raise ValueError(f"Reconnect.cap ({self.cap}) must be >= initial ({self.initial})")


def _weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class KvOptions:
    """KV-aware picking (``WorkerMonitor(kv_index=KvOptions(…))``; ``kv_index=True`` takes these defaults).

    ``max_blocks``: (worker, block) entries the index keeps, over every tier
    (at the bound new blocks are not indexed and their worker's view is
    marked incomplete; ~100–190 B each, see BENCHMARKS.md);
    ``max_message_bytes``: the largest ``kv-events`` message read.  The cost
    weights are Dynamo 1.6.1's KV router defaults (its flags in brackets):
    ``overlap_credit`` [``--router-kv-overlap-score-credit``],
    ``prefill_load_scale`` [``--router-prefill-load-scale``],
    ``host_cache_weight`` [``--router-host-cache-hit-weight``],
    ``disk_cache_weight`` [``--router-disk-cache-hit-weight``].
    ``weigh_by_capacity`` (workermon's, not Dynamo's): a rank's decode load
    counts in proportion to how small its KV capacity is beside the largest
    candidate's (a 256-block worker's 50 blocks weigh as 200 beside 1024-block
    workers), so prefix affinity does not fill a small worker's cache while a
    larger one idles; False is Dynamo's plain sum.
    """

    max_blocks: int = 4_000_000
    max_message_bytes: int = 4 << 20
    overlap_credit: float = 1.0
    prefill_load_scale: float = 1.0
    host_cache_weight: float = 0.75
    disk_cache_weight: float = 0.25
    weigh_by_capacity: bool = True

    def __attrs_post_init__(self) -> None:
        _count("KvOptions.max_blocks", self.max_blocks)
        _count("KvOptions.max_message_bytes", self.max_message_bytes, 1024)
        for name in ("overlap_credit", "prefill_load_scale", "host_cache_weight", "disk_cache_weight"):
            _weight(f"KvOptions.{name}", getattr(self, name))
