"""The public surface: names, static mode, validation, defaults.  No servers."""

from __future__ import annotations

import queue

import attrs
import pytest

import workermon
from workermon import BusyChange, EtcdOptions, Limits, NatsOptions, Thresholds, WorkerLoadState, WorkerMonitor


def test_all_matches_public_names() -> None:
    public = {name for name in dir(workermon) if not name.startswith(("_", "@"))}  # "@": pytest's rewriting
    # Submodules imported as a side effect are not part of the API; the public
    # submodules (the pytest plugin, the Prometheus collector) are imported on their own.
    public -= {"annotations", "logging", "testing", "prometheus", "options"}
    assert set(workermon.__all__) - {"__version__"} == public
    for name in ("WorkerMonitor", "BusyChange", "WorkerLoadState"):
        assert name in workermon.__all__


def test_value_objects_are_frozen() -> None:
    change = BusyChange(frozenset({1}), frozenset({1}), frozenset(), frozenset(), 1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        change.version = 2  # type: ignore[misc]
    state = WorkerLoadState(worker_id=1, kv_total_blocks=None)
    assert dict(state.kv_active_blocks) == {} and state.busy is False and state.last_report_age is None
    with pytest.raises(TypeError):
        state.kv_active_blocks[0] = 1  # type: ignore[index]


def test_static_mode() -> None:
    mon = WorkerMonitor(etcd_endpoints=None)
    got: "queue.Queue[BusyChange]" = queue.Queue()
    mon.on_busy_change(got.put)   # before start: no call
    assert got.empty()
    mon.start()
    assert mon.wait_ready(0) is True
    assert mon.busy_workers() == frozenset() and mon.free_workers() == frozenset()
    assert mon.is_busy(123) is False and mon.load_states() == {}
    mon.on_busy_change(got.put)   # after start: called once at once
    first = got.get(timeout=1)
    assert first == BusyChange(frozenset(), frozenset(), frozenset(), frozenset(), 0)
    assert got.empty()
    mon.set_thresholds(busy_threshold=0.5)
    assert mon.thresholds.busy_threshold == 0.5
    with pytest.raises(RuntimeError):
        mon.start()
    assert mon.stop() is True and mon.stop() is True
    with pytest.raises(RuntimeError):
        mon.start()


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:1111, http://127.0.0.1:2222")
    monkeypatch.setenv("NATS_SERVER", "nats://127.0.0.1:3333")
    mon = WorkerMonitor()
    assert mon._etcd_cfg is not None and mon._nats_cfg is not None
    assert mon._etcd_cfg.endpoints == ("http://127.0.0.1:1111", "http://127.0.0.1:2222")
    assert mon._nats_cfg.servers == ("nats://127.0.0.1:3333",)
    monkeypatch.delenv("ETCD_ENDPOINTS")
    monkeypatch.delenv("NATS_SERVER")
    mon = WorkerMonitor()
    assert mon._etcd_cfg is not None and mon._etcd_cfg.endpoints == ("http://127.0.0.1:2379",)
    assert mon._nats_cfg is not None and mon._nats_cfg.servers == ("nats://127.0.0.1:4222",)
    assert mon._nats_cfg.subjects == ("namespace.dynamo.kv_metrics",
                                      "namespace.dynamo.component.*.endpoint.*.kv_metrics")
    assert mon.card_prefix == "v1/mdc/dynamo/"


def test_narrowing_and_prefix() -> None:
    mon = WorkerMonitor(["http://127.0.0.1:1"], ["nats://127.0.0.1:2"], namespace="prod",
                        component="backend", endpoint="generate")
    assert mon.card_prefix == "v1/mdc/prod/backend/generate/"
    assert mon._nats_cfg is not None
    assert "namespace.prod.component.backend.endpoint.generate.kv_metrics" in mon._nats_cfg.subjects
    mon = WorkerMonitor(["http://127.0.0.1:1"], None, etcd=EtcdOptions(card_prefix="models/"))
    assert mon.card_prefix == "models/" and mon._nats_cfg is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"busy_threshold": 1.2},
        {"busy_threshold": -1},
        {"namespace": "a.b"},
        {"namespace": ""},
        {"namespace": "a b"},
        {"endpoint": "generate"},
        {"etcd_endpoints": ["ftp://x:1"]},
        {"etcd_endpoints": ["http://127.0.0.1:notaport"]},
        {"etcd_endpoints": []},
        {"nats_servers": ["http://127.0.0.1:4222"]},
        {"nats_servers": []},
        # Option objects are built inside the check: they refuse bad values themselves.
        {"etcd": lambda: EtcdOptions(user="root")},
        {"thresholds": lambda: Thresholds(recover_threshold=0.95)},
        {"thresholds": lambda: Thresholds(stale_policy="sometimes")},  # type: ignore[arg-type]
        {"limits": lambda: Limits(max_load_bytes=0)},
        {"busy_threshold": 0.8, "thresholds": Thresholds},  # the shortcut and the whole rule: one or the other
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict) -> None:
    kwargs.setdefault("etcd_endpoints", ["http://127.0.0.1:1"])
    kwargs.setdefault("nats_servers", ["nats://127.0.0.1:2"])
    with pytest.raises(ValueError):
        WorkerMonitor(**{k: v() if callable(v) else v for k, v in kwargs.items()})


def test_secrets_not_in_repr() -> None:
    mon = WorkerMonitor(["http://127.0.0.1:1"], ["nats://127.0.0.1:2"], etcd=EtcdOptions(user="root",
                        password="s3cr3t-etcd"), nats=NatsOptions(token="s3cr3t-token"))
    text = repr(mon._etcd_cfg) + repr(mon._nats_cfg) + repr(mon)
    assert "s3cr3t" not in text


def test_callback_handle_is_decorator_friendly() -> None:
    mon = WorkerMonitor(etcd_endpoints=None)

    @mon.on_busy_change
    def handler(change: BusyChange) -> str:
        return "called"

    assert handler(BusyChange(frozenset(), frozenset(), frozenset(), frozenset(), 0)) == "called"
    handler.cancel()
    handler.cancel()
    assert mon._callbacks == ()
    with pytest.raises(TypeError):
        mon.on_busy_change("not callable")  # type: ignore[arg-type]
