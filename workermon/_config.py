"""Configuration resolved in one place: arguments, then Dynamo's environment, then defaults.

:func:`resolve` is pure (the environment is an argument): the monitor keeps
its result as ``monitor.config``, and the command line and
``workermon.testing`` read that instead of private attributes or the
environment again.  The old flat keywords of ``WorkerMonitor`` map here onto
their new homes (:data:`DEPRECATED`), each with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import attrs

from ._model import EventPlane, Thresholds
from .options import TLS, EtcdOptions, Limits, NatsOptions, Reconnect

__all__ = ["DEPRECATED", "MonitorConfig", "etcd_from_env", "nats_from_env", "resolve"]

DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_NATS_SERVER = "nats://127.0.0.1:4222"

# Old flat keyword → (its new home, the field there).
DEPRECATED: Dict[str, Tuple[str, str]] = {
    "recover_threshold": ("thresholds", "recover_threshold"),
    "prefill_tokens_threshold": ("thresholds", "prefill_tokens_threshold"),
    "prefill_tokens_threshold_frac": ("thresholds", "prefill_tokens_threshold_frac"),
    "metrics_ttl": ("thresholds", "metrics_ttl"),
    "stale_policy": ("thresholds", "stale_policy"),
    "outage_policy": ("thresholds", "outage_policy"),
    "outage_grace": ("thresholds", "outage_grace"),
    "max_load_bytes": ("limits", "max_load_bytes"),
    "max_card_bytes": ("limits", "max_card_bytes"),
    "pending_max_workers": ("limits", "pending_max_workers"),
    "pending_max_age": ("limits", "pending_max_age"),
    "pending_max_ranks": ("limits", "pending_max_ranks"),
    "max_ranks_per_worker": ("limits", "max_ranks_per_worker"),
    "max_queued_messages": ("limits", "max_queued_messages"),
    "max_queued_bytes": ("limits", "max_queued_bytes"),
    "card_prefix": ("etcd", "card_prefix"),
    "etcd_ca_cert": ("etcd", "tls.ca"),
    "etcd_cert_cert": ("etcd", "tls.cert"),
    "etcd_cert_key": ("etcd", "tls.key"),
    "etcd_user": ("etcd", "user"),
    "etcd_password": ("etcd", "password"),
    "etcd_timeout": ("etcd", "timeout"),
    "metrics_subjects": ("nats", "subjects"),
    "nats_pending_msgs_limit": ("nats", "pending_msgs_limit"),
    "nats_user": ("nats", "user"),
    "nats_password": ("nats", "password"),
    "nats_token": ("nats", "token"),
    "nats_credentials": ("nats", "credentials"),
    "nats_tls_ca": ("nats", "tls.ca"),
    "nats_tls_cert": ("nats", "tls.cert"),
    "nats_tls_key": ("nats", "tls.key"),
    "backoff_initial": ("reconnect", "initial"),
    "backoff_cap": ("reconnect", "cap"),
}
_HOMES = {"thresholds": "Thresholds", "limits": "Limits", "etcd": "EtcdOptions", "nats": "NatsOptions",
          "reconnect": "Reconnect"}


@attrs.frozen
class MonitorConfig:
    """Everything a monitor was configured with, resolved: read it as ``monitor.config``.

    ``etcd_endpoints`` None is static mode; ``nats_servers`` None means no
    NATS connection; ``nats_required`` says NATS counts for readiness and the
    outage policy (it was asked for).  Secrets stay out of ``repr``.
    """

    namespace: str
    component: Optional[str]
    endpoint: Optional[str]
    etcd_endpoints: Optional[Tuple[str, ...]]
    nats_servers: Optional[Tuple[str, ...]]
    nats_required: bool
    event_plane: EventPlane
    zmq_broker: Tuple[str, ...]
    card_prefix: str
    subjects: Tuple[str, ...]
    etcd: EtcdOptions
    nats: NatsOptions
    limits: Limits
    reconnect: Reconnect
    thresholds: Thresholds

    @property
    def static(self) -> bool:
        return self.etcd_endpoints is None

    @property
    def zmq(self) -> bool:
        """Whether load reports are read from the ZMQ event plane."""
        return self.event_plane != "nats"

    @property
    def kv_stream_prefix(self) -> str:
        """What the first token of a 0.9 KV-events stream subject of this scope starts with (the whole
        token when a component is named)."""
        prefix = f"namespace-{self.namespace}-component-"
        return prefix + f"{self.component}-kv-events" if self.component else prefix

    @property
    def kv_subjects(self) -> Tuple[str, ...]:
        """Where the workers' KV events are on NATS (``kv_index=True``), in each layout Dynamo has used:
        endpoint-scoped (1.4 on), component-scoped (1.0–1.3), and the JetStream stream's subject of
        0.9 (``namespace-{ns}-component-{c}-kv-events.kv-events``; a wildcard cannot
        stand inside a token, so with no component every ``*.kv-events`` is taken and filtered)."""
        c, e = self.component or "*", self.endpoint or "*"
        stream = self.kv_stream_prefix if self.component else "*"
        return (f"namespace.{self.namespace}.component.{c}.endpoint.{e}.kv-events",
                f"namespace.{self.namespace}.component.{c}.kv-events",
                f"{stream}.kv-events")


def _split(value: Union[Sequence[str], str, None]) -> Tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if s and s.strip())


def _tls_from_env(environ: Mapping[str, str], ca: str, cert: str, key: str) -> Optional[TLS]:
    values = [environ.get(name) or None for name in (ca, cert, key)]
    if not any(values):
        return None
    return TLS(*values)


def etcd_from_env(given: Optional[EtcdOptions], environ: Mapping[str, str]) -> EtcdOptions:
    """``given``, with what it leaves unset taken from Dynamo's ``ETCD_AUTH_*`` variables."""
    opts = given if given is not None else EtcdOptions()
    changes: Dict[str, Any] = {}
    if opts.user is None and environ.get("ETCD_AUTH_USERNAME"):
        changes["user"] = environ["ETCD_AUTH_USERNAME"]
        changes["password"] = environ.get("ETCD_AUTH_PASSWORD", "")
    if opts.tls is None:
        tls = _tls_from_env(environ, "ETCD_AUTH_CA", "ETCD_AUTH_CLIENT_CERT", "ETCD_AUTH_CLIENT_KEY")
        if tls is not None:
            changes["tls"] = tls
    return attrs.evolve(opts, **changes) if changes else opts


def nats_from_env(given: Optional[NatsOptions], environ: Mapping[str, str]) -> NatsOptions:
    """``given``, with what it leaves unset taken from Dynamo's ``NATS_AUTH_*`` and ``NATS_TLS_*``.

    Authentication from the environment only when none was given, in
    Dynamo's order: user and password, then token, then nkey, then a
    credentials file.
    """
    opts = given if given is not None else NatsOptions()
    changes: Dict[str, Any] = {}
    if opts.auth is None:
        if environ.get("NATS_AUTH_USERNAME"):
            changes["user"] = environ["NATS_AUTH_USERNAME"]
            changes["password"] = environ.get("NATS_AUTH_PASSWORD", "")
        elif environ.get("NATS_AUTH_TOKEN"):
            changes["token"] = environ["NATS_AUTH_TOKEN"]
        elif environ.get("NATS_AUTH_NKEY"):
            changes["nkey"] = environ["NATS_AUTH_NKEY"]
        elif environ.get("NATS_AUTH_CREDENTIALS_FILE"):
            changes["credentials"] = environ["NATS_AUTH_CREDENTIALS_FILE"]
    if opts.tls is None:
        tls = _tls_from_env(environ, "NATS_TLS_CA_CERT_PATH", "NATS_TLS_CLIENT_CERT_PATH", "NATS_TLS_CLIENT_KEY_PATH")
        if tls is not None:
            changes["tls"] = tls
    return attrs.evolve(opts, **changes) if changes else opts


def apply_deprecated(deprecated: Mapping[str, Any], homes: Dict[str, Any], *, stacklevel: int) -> Dict[str, Any]:
    """Fold old flat keywords into their option objects in ``homes``, with one DeprecationWarning each.

    ``stacklevel`` is counted from this function to the user's call (3 when a
    constructor calls it directly), so the warning names the user's line.

    Each object is rebuilt once with all of its old keywords, so pairs given
    apart (a TLS cert and key, a user and password) validate together.
    TypeError for a keyword that never existed.
    """
    grouped: Dict[str, Dict[str, Any]] = {}
    for name, value in deprecated.items():
        if name not in DEPRECATED:
            raise TypeError(f"got an unexpected keyword argument {name!r}")
        home, field = DEPRECATED[name]
        warnings.warn(f"the keyword {name}=… is deprecated: use {home}={_HOMES[home]}({field.split('.')[0]}=…)",
                      DeprecationWarning, stacklevel=stacklevel)
        grouped.setdefault(home, {})[field] = value
    for home, fields in grouped.items():
        base = homes[home]
        plain = {f: v for f, v in fields.items() if not f.startswith("tls.")}
        tls = {f[4:]: v for f, v in fields.items() if f.startswith("tls.")}
        if tls:
            merged = {k: getattr(base.tls, k) if base.tls is not None else None for k in ("ca", "cert", "key")}
            merged.update(tls)
            plain["tls"] = TLS(**merged)
        homes[home] = attrs.evolve(base, **plain)
    return homes


def resolve(
    *,
    etcd_endpoints: Union[Sequence[str], str, None, Any],
    nats_servers: Union[Sequence[str], str, None, Any],
    namespace: str,
    component: Optional[str],
    endpoint: Optional[str],
    event_plane: Any,
    zmq_broker_url: Any,
    etcd: Optional[EtcdOptions],
    nats: Optional[NatsOptions],
    limits: Optional[Limits],
    reconnect: Optional[Reconnect],
    thresholds: Thresholds,
    environ: Mapping[str, str],
    from_env: Any,
) -> MonitorConfig:
    """Resolve a monitor's configuration; ``from_env`` is the marker of "not given: read the environment"."""
    from ._sources.zmq import parse_broker_url

    if event_plane is from_env:
        event_plane = environ.get("DYN_EVENT_PLANE", "").strip().lower() or "auto"
    if event_plane not in ("auto", "nats", "zmq"):
        raise ValueError(f"event_plane must be 'auto', 'nats' or 'zmq', got {event_plane!r}")
    if zmq_broker_url is from_env:
        zmq_broker_url = environ.get("DYN_ZMQ_BROKER_URL") or None
    broker = parse_broker_url(zmq_broker_url) if zmq_broker_url is not None else ()
    if event_plane == "zmq" and nats_servers not in (from_env, None):
        raise ValueError("event_plane='zmq' uses no NATS: drop nats_servers (or use event_plane='auto')")
    # NATS counts for readiness and the outage policy only when asked for:
    # event_plane="nats", nats_servers=…, or $NATS_SERVER.  In "auto" it is
    # otherwise subscribed where reachable, as a best effort.
    nats_required = event_plane == "nats" or (
        nats_servers is not None and (nats_servers is not from_env or bool(environ.get("NATS_SERVER")))
    )
    if etcd_endpoints is from_env:
        etcd_endpoints = _split(environ.get("ETCD_ENDPOINTS")) or (DEFAULT_ETCD_ENDPOINT,)
    if nats_servers is from_env:
        nats_servers = _split(environ.get("NATS_SERVER")) or (DEFAULT_NATS_SERVER,)
    if event_plane == "zmq":
        nats_servers = None
    etcd_opts = etcd_from_env(etcd, environ)
    nats_opts = nats_from_env(nats, environ)
    card_prefix = etcd_opts.card_prefix
    if card_prefix is None:
        card_prefix = f"v1/mdc/{namespace}/"
        if etcd_endpoints is not None and component is not None:
            card_prefix += f"{component}/" + (f"{endpoint}/" if endpoint is not None else "")
    subjects = nats_opts.subjects or (
        f"namespace.{namespace}.kv_metrics",
        # Dynamo 1.6 publishes on an endpoint-scoped subject.
        f"namespace.{namespace}.component.{component or '*'}.endpoint.{endpoint or '*'}.kv_metrics",
    )
    return MonitorConfig(
        namespace=namespace,
        component=component,
        endpoint=endpoint,
        etcd_endpoints=None if etcd_endpoints is None else _split(etcd_endpoints),
        nats_servers=None if nats_servers is None else _split(nats_servers),
        nats_required=nats_required,
        event_plane=event_plane,
        zmq_broker=broker,
        card_prefix=card_prefix,
        subjects=tuple(subjects),
        etcd=etcd_opts,
        nats=nats_opts,
        limits=limits if limits is not None else Limits(),
        reconnect=reconnect if reconnect is not None else Reconnect(),
        thresholds=thresholds,
    )


def check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or any(c in value for c in " \t\r\n./*>"):
        raise ValueError(f"{what} must be a non-empty name without spaces, '.', '/', '*' or '>': {value!r}")


def configure(*, etcd_endpoints: Any, nats_servers: Any, namespace: str, busy_threshold: Any, unset: Any,
              thresholds: Optional[Thresholds], component: Optional[str], endpoint: Optional[str], event_plane: Any,
              zmq_broker_url: Any, etcd: Optional[EtcdOptions], nats: Optional[NatsOptions], limits: Optional[Limits],
              reconnect: Optional[Reconnect], deprecated: Mapping[str, Any], environ: Mapping[str, str],
              from_env: Any) -> MonitorConfig:
    """``WorkerMonitor(...)``'s arguments checked, old keywords folded in (with their warnings), resolved."""
    check_name("namespace", namespace)
    if component is not None:
        check_name("component", component)
    if endpoint is not None:
        check_name("endpoint", endpoint)
        if component is None:
            raise ValueError("endpoint narrows a component: give component too")
    if thresholds is not None and busy_threshold is not unset:
        raise ValueError("give busy_threshold (a shortcut) or thresholds=Thresholds(...), not both")
    for name, value, kind in (("thresholds", thresholds, Thresholds), ("etcd", etcd, EtcdOptions),
                              ("nats", nats, NatsOptions), ("limits", limits, Limits),
                              ("reconnect", reconnect, Reconnect)):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if thresholds is None:
        thresholds = Thresholds() if busy_threshold is unset else Thresholds(busy_threshold=busy_threshold)
    homes = apply_deprecated(deprecated, {
        "thresholds": thresholds, "limits": limits or Limits(), "etcd": etcd or EtcdOptions(),
        "nats": nats or NatsOptions(), "reconnect": reconnect or Reconnect()},
        stacklevel=4)  # apply_deprecated ← configure ← WorkerMonitor.__init__ ← the user
    return resolve(etcd_endpoints=etcd_endpoints, nats_servers=nats_servers, namespace=namespace, component=component,
                   endpoint=endpoint, event_plane=event_plane, zmq_broker_url=zmq_broker_url, etcd=homes["etcd"],
                   nats=homes["nats"], limits=homes["limits"], reconnect=homes["reconnect"],
                   thresholds=homes["thresholds"], environ=environ, from_env=from_env)
