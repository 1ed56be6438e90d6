"""Configuration: option objects, one resolution (monitor.config), Dynamo's environment variables for
secured planes — by the library, the publisher and `workermon agent` — and the old keywords' warnings.
The secured-plane tests run real mutual-TLS etcd and token / user NATS servers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Dict

import pytest

from workermon import (TLS, EtcdOptions, Limits, NatsOptions, Reconnect, SharedMonitor, Thresholds,
                       WorkerMonitor, WorkerPublisher)
from workermon._config import DEPRECATED, etcd_from_env, nats_from_env
from workermon._servers import EtcdServer, NatsServer

from .helpers import card_json, card_key
from .test_security import SECRET, _etcdctl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- option objects and resolution (pure) ------------------------------------------------------

def test_option_objects_validate_and_hide_secrets() -> None:
    with pytest.raises(ValueError, match="cert and key go together"):
        TLS(cert="c.pem")
    with pytest.raises(ValueError, match="user and password"):
        EtcdOptions(user="u")
    with pytest.raises(ValueError, match="timeout"):
        EtcdOptions(timeout=0)
    with pytest.raises(ValueError, match="max_queued_messages"):
        Limits(max_queued_messages=0)
    with pytest.raises(ValueError, match="cap"):
        Reconnect(initial=3.0, cap=1.0)
    assert SECRET not in repr(EtcdOptions(user="u", password=SECRET))
    assert SECRET not in repr(NatsOptions(token=SECRET)) and SECRET not in repr(NatsOptions(nkey=SECRET))
    assert NatsOptions(subjects="a.b").subjects == ("a.b",)


def test_at_most_twenty_named_parameters() -> None:
    import inspect

    params = [p for p in inspect.signature(WorkerMonitor.__init__).parameters.values()
              if p.kind is not p.VAR_KEYWORD and p.name != "self"]
    assert len(params) <= 20, [p.name for p in params]


def test_config_is_resolved_once_from_arguments_environment_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ETCD_ENDPOINTS", "NATS_SERVER", "DYN_EVENT_PLANE", "DYN_ZMQ_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://10.1.1.1:2379, http://10.1.1.2:2379")
    monkeypatch.setenv("ETCD_AUTH_CA", "/etc/ca.pem")
    monkeypatch.setenv("NATS_AUTH_TOKEN", SECRET)
    mon = WorkerMonitor(namespace="ns", component="backend", thresholds=Thresholds(busy_threshold=0.8),
                        limits=Limits(max_load_bytes=1000), reconnect=Reconnect(0.5, 4.0))
    c = mon.config
    assert c.etcd_endpoints == ("http://10.1.1.1:2379", "http://10.1.1.2:2379")
    assert c.nats_servers == ("nats://127.0.0.1:4222",) and c.nats_required is False
    assert c.card_prefix == "v1/mdc/ns/backend/"
    assert c.etcd.tls == TLS(ca="/etc/ca.pem") and c.nats.auth == "token" and c.nats.token == SECRET
    assert c.thresholds.busy_threshold == 0.8 and c.limits.max_load_bytes == 1000 and c.reconnect.cap == 4.0
    assert SECRET not in repr(c)
    with pytest.raises(ValueError, match="not both"):
        WorkerMonitor(busy_threshold=0.5, thresholds=Thresholds())
    with pytest.raises(TypeError, match="EtcdOptions"):
        WorkerMonitor(etcd=TLS())  # type: ignore[arg-type]


def test_dynamo_precedence_for_nats_authentication() -> None:
    everything = {"NATS_AUTH_USERNAME": "u", "NATS_AUTH_PASSWORD": "p", "NATS_AUTH_TOKEN": "t",
                  "NATS_AUTH_NKEY": "SUA", "NATS_AUTH_CREDENTIALS_FILE": "/x.creds"}
    assert nats_from_env(None, everything).auth == "user"
    env = {k: v for k, v in everything.items() if "USER" not in k and "PASSWORD" not in k}
    assert nats_from_env(None, env).auth == "token"
    env.pop("NATS_AUTH_TOKEN")
    assert nats_from_env(None, env).auth == "nkey"
    env.pop("NATS_AUTH_NKEY")
    assert nats_from_env(None, env).auth == "credentials"
    # An explicit way wins over the environment; TLS comes from NATS_TLS_* only when not given.
    assert nats_from_env(NatsOptions(token="mine"), everything).token == "mine"
    tls_env = {"NATS_TLS_CA_CERT_PATH": "/ca", "NATS_TLS_CLIENT_CERT_PATH": "/c", "NATS_TLS_CLIENT_KEY_PATH": "/k"}
    assert nats_from_env(None, tls_env).tls == TLS("/ca", "/c", "/k")
    assert etcd_from_env(EtcdOptions(tls=TLS(ca="/mine")), {"ETCD_AUTH_CA": "/theirs"}).tls == TLS(ca="/mine")
    assert etcd_from_env(None, {"ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": "pw"}).user == "root"


@pytest.mark.parametrize("name", sorted(DEPRECATED))
def test_every_old_keyword_still_works_with_a_warning_naming_its_home(name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ETCD_AUTH_CA", "NATS_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    home, field = DEPRECATED[name]
    values: Dict[str, Any] = {
        "recover_threshold": 0.5, "prefill_tokens_threshold": 100, "prefill_tokens_threshold_frac": 0.5,
        "metrics_ttl": 3.0, "stale_policy": "busy", "outage_policy": "busy", "outage_grace": 2.0,
        "max_load_bytes": 999, "max_card_bytes": 9999, "pending_max_workers": 7, "pending_max_age": 3.0,
        "pending_max_ranks": 77, "max_ranks_per_worker": 8, "max_queued_messages": 70, "max_queued_bytes": 7000,
        "card_prefix": "models/", "etcd_ca_cert": "/ca.pem", "etcd_cert_cert": "/c.pem", "etcd_cert_key": "/k.pem",
        "etcd_user": "u", "etcd_password": "p", "etcd_timeout": 9.0, "metrics_subjects": ["a.b"],
        "nats_pending_msgs_limit": 5, "nats_user": "u", "nats_password": "p", "nats_token": "t",
        "nats_credentials": "/x.creds", "nats_tls_ca": "/ca.pem", "nats_tls_cert": "/c.pem",
        "nats_tls_key": "/k.pem", "backoff_initial": 0.2, "backoff_cap": 3.0,
    }
    kwargs = {name: values[name]}
    # Pairs must come together: give the partner too (it warns as well).
    partner = {"etcd_cert_cert": "etcd_cert_key", "etcd_cert_key": "etcd_cert_cert", "etcd_user": "etcd_password",
               "etcd_password": "etcd_user", "nats_user": "nats_password", "nats_password": "nats_user",
               "nats_tls_cert": "nats_tls_key", "nats_tls_key": "nats_tls_cert",
               "recover_threshold": None}.get(name)
    if partner:
        kwargs[partner] = values[partner]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = WorkerMonitor(**kwargs)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any(f"{name}=" in m and f"{home}=" in m for m in messages), messages
    obj = getattr(mon.config, home)
    value = getattr(obj.tls, field[4:]) if field.startswith("tls.") else getattr(obj, field)
    expected = tuple(values[name]) if isinstance(values[name], list) else values[name]
    assert value == expected


def test_deprecation_warnings_name_the_callers_line() -> None:
    with pytest.warns(DeprecationWarning) as monitor_warnings:
        WorkerMonitor(etcd_endpoints=None, metrics_ttl=3.0)
    with pytest.warns(DeprecationWarning) as publisher_warnings:
        WorkerPublisher(["http://127.0.0.1:1"], event_plane="zmq", etcd_user="u", etcd_password="p")
    for w in [*monitor_warnings, *publisher_warnings]:
        assert w.filename == __file__, (w.filename, w.lineno)


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="no_such"):
        WorkerMonitor(no_such=1)
    with pytest.raises(TypeError, match="no_such"):
        SharedMonitor("/tmp/x.sock", no_such=1)
    with pytest.warns(DeprecationWarning, match="reconnect=Reconnect"):
        s = SharedMonitor("/tmp/x.sock", backoff_initial=0.2, backoff_cap=3.0)
    assert s.reconnect == Reconnect(0.2, 3.0)


# --- secured planes from Dynamo's environment, against real servers ----------------------------

def _etcd_env(certs: Dict[str, str]) -> Dict[str, str]:
    return {"ETCD_AUTH_CA": certs["ca"], "ETCD_AUTH_CLIENT_CERT": certs["client"],
            "ETCD_AUTH_CLIENT_KEY": certs["client_key"]}


def test_mutual_tls_etcd_from_the_environment_alone_and_from_options(
        tls_etcd: EtcdServer, certs: Dict[str, str], namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _etcdctl(tls_etcd.url, "--cacert", certs["ca"], "--cert", certs["client"], "--key", certs["client_key"],
             "put", card_key(namespace, 0xE5), card_json(10))
    monkeypatch.delenv("NATS_SERVER", raising=False)
    for name, value in _etcd_env(certs).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ETCD_ENDPOINTS", tls_etcd.url)
    with WorkerMonitor(namespace=namespace, event_plane="zmq") as mon:  # nothing but Dynamo's variables
        assert mon.wait_ready(10) and mon.members() == {0xE5}
    for name in _etcd_env(certs):
        monkeypatch.delenv(name)
    opts = EtcdOptions(tls=TLS(ca=certs["ca"], cert=certs["client"], key=certs["client_key"]))
    with WorkerMonitor([tls_etcd.url], namespace=namespace, event_plane="zmq", etcd=opts) as mon:
        assert mon.wait_ready(10) and mon.members() == {0xE5}
    # The publisher reads the same variables, as a Dynamo worker does.
    for name, value in _etcd_env(certs).items():
        monkeypatch.setenv(name, value)
    pub = WorkerPublisher([tls_etcd.url], namespace=namespace, event_plane="zmq", total_kv_blocks=10).start()
    try:
        with WorkerMonitor(namespace=namespace, event_plane="zmq") as mon:
            assert mon.wait_ready(10) and mon.wait_for(lambda: pub.worker_id in mon.members(), 10)
    finally:
        pub.stop()


@pytest.mark.parametrize("how", ["environment", "flags"])
def test_agent_reaches_mutual_tls_etcd(tls_etcd: EtcdServer, certs: Dict[str, str], namespace: str,
                                       how: str) -> None:
    _etcdctl(tls_etcd.url, "--cacert", certs["ca"], "--cert", certs["client"], "--key", certs["client_key"],
             "put", card_key(namespace, 0xE6), card_json(10))
    d = tempfile.mkdtemp(prefix="wm-cfg-")
    os.chmod(d, 0o700)
    sock = os.path.join(d, "agent.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "NATS_"))}
    cmd = [sys.executable, "-m", "workermon", "agent", "--etcd", tls_etcd.url, "--namespace", namespace,
           "--event-plane", "zmq", "--socket", sock]
    if how == "environment":
        env.update(_etcd_env(certs))
    else:
        cmd += ["--etcd-ca", certs["ca"], "--etcd-cert", certs["client"], "--etcd-key", certs["client_key"]]
    agent = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    client = SharedMonitor(sock).start()
    try:
        assert client.wait_ready(20) and client.wait_for(lambda: client.members() == {0xE6}, 10), client.last_error
    finally:
        assert client.stop(5)
        agent.terminate()
        try:
            agent.wait(10)
        finally:
            assert agent.stderr is not None
            agent.stderr.close()
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def test_token_nats_from_the_environment(etcd_server: EtcdServer, namespace: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server = NatsServer(extra_args=["--auth", SECRET])
    server.start()
    try:
        monkeypatch.setenv("NATS_AUTH_TOKEN", SECRET)
        pub = WorkerPublisher([etcd_server.url], [server.url], namespace=namespace, total_kv_blocks=10).start()
        try:
            with WorkerMonitor([etcd_server.url], [server.url], namespace=namespace) as mon:
                assert mon.wait_ready(10) and mon.config.nats.auth == "token"
                pub.report(10)
                assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
                assert SECRET not in repr(mon.config) and SECRET not in repr(mon.health())
        finally:
            pub.stop()
        monkeypatch.setenv("NATS_AUTH_TOKEN", "wrong")
        with WorkerMonitor([etcd_server.url], [server.url], namespace=namespace) as mon:
            assert mon.wait_ready(2) is False and mon.health().nats.last_error
    finally:
        server.close()


def test_cli_takes_no_password_on_the_command_line(etcd_server: EtcdServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_AUTH", "NATS_AUTH"))}
    res = subprocess.run([sys.executable, "-m", "workermon", "watch", "--etcd", etcd_server.url, "--etcd-user",
                          "root", "--duration", "1"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert res.returncode == 2 and "ETCD_AUTH_PASSWORD" in res.stderr, res.stderr
    help_text = subprocess.run([sys.executable, "-m", "workermon", "agent", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    assert "--etcd-ca" in help_text and "--nats-creds" in help_text and "--etcd-password" not in help_text
