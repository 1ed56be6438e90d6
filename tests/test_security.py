"""TLS and authentication against real servers, with certificates made by the test."""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Any, Dict

import pytest

from workermon import TLS, EtcdOptions, NatsOptions, WorkerMonitor
from workermon import WorkerPublisher
from workermon._servers import EtcdServer, NatsServer, find_etcd

from .helpers import card_json, card_key

SECRET = "s3cr3t-Pa55"


def _no_secret(mon: WorkerMonitor, caplog: pytest.LogCaptureFixture) -> None:
    assert SECRET not in caplog.text
    assert SECRET not in repr(mon) and SECRET not in repr(mon.health())
    assert SECRET not in repr(mon._etcd_cfg) and SECRET not in repr(mon._nats_cfg)


def _etcdctl(url: str, *args: str, **kw: Any) -> None:
    etcdctl = os.path.join(os.path.dirname(find_etcd()), "etcdctl")
    subprocess.run([etcdctl, "--endpoints", url, *args], check=True, capture_output=True, timeout=30, **kw)


def test_etcd_with_client_certificates(tls_etcd: EtcdServer, nats_server: NatsServer, certs: Dict[str, str],
                                       namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _etcdctl(tls_etcd.url, "--cacert", certs["ca"], "--cert", certs["client"], "--key", certs["client_key"],
             "put", card_key(namespace, 0xE1), card_json(10))
    mon = WorkerMonitor([tls_etcd.url], [nats_server.url], namespace=namespace,
                        etcd=EtcdOptions(tls=TLS(certs["ca"], certs["client"], certs["client_key"])))
    with mon:
        assert mon.wait_ready(10)
        assert mon.members() == {0xE1}
    # Without a client certificate the server refuses: a clear error, no readiness.
    bad = WorkerMonitor([tls_etcd.url], [nats_server.url], namespace=namespace,
                        etcd=EtcdOptions(tls=TLS(ca=certs["ca"])))
    with bad:
        assert bad.wait_ready(2) is False
        assert bad.health().etcd.last_error


def test_etcd_user_password(fresh_etcd: EtcdServer, nats_server: NatsServer, namespace: str,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = fresh_etcd.url
    _etcdctl(url, "put", card_key(namespace, 0xE2), card_json(10))
    _etcdctl(url, "user", "add", "root", "--new-user-password", SECRET)
    _etcdctl(url, "auth", "enable")
    mon = WorkerMonitor([url], [nats_server.url], namespace=namespace,
                        etcd=EtcdOptions(user="root", password=SECRET))
    with mon:
        assert mon.wait_ready(10)
        assert mon.members() == {0xE2}
        _no_secret(mon, caplog)
    wrong = WorkerMonitor([url], [nats_server.url], namespace=namespace,
                          etcd=EtcdOptions(user="root", password=SECRET + "-wrong"))
    with wrong:
        assert wrong.wait_ready(2) is False
        err = wrong.health().etcd.last_error or ""
        assert "authentication failed" in err, err
        warnings = [r for r in caplog.records if r.name == "workermon._sources.etcd" and "authentication failed" in r.message]
        assert len(warnings) == 1          # one clear line, not one per retry
    assert SECRET not in caplog.text


@pytest.mark.parametrize("mode", ["tls", "token", "user"])
def test_nats_tls_token_user(mode: str, etcd_server: EtcdServer, certs: Dict[str, str], namespace: str,
                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    args: Dict[str, list] = {
        "tls": ["--tls", "--tlscert", certs["server"], "--tlskey", certs["server_key"]],
        "token": ["--auth", SECRET],
        "user": ["--user", "router", "--pass", SECRET],
    }
    server = NatsServer(extra_args=args[mode], scheme="tls" if mode == "tls" else "nats")
    server.start()
    good = {"tls": NatsOptions(tls=TLS(ca=certs["ca"])), "token": NatsOptions(token=SECRET),
            "user": NatsOptions(user="router", password=SECRET)}[mode]
    bad = {"tls": NatsOptions(), "token": NatsOptions(token="nope"),
           "user": NatsOptions(user="router", password="nope")}[mode]
    pub = WorkerPublisher([etcd_server.url], [server.url], namespace=namespace, total_kv_blocks=10,
                          nats=good)
    try:
        pub.start()
        mon = WorkerMonitor([etcd_server.url], [server.url], namespace=namespace, nats=good)
        with mon:
            assert mon.wait_ready(10)
            pub.report(10)
            assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
            _no_secret(mon, caplog)
        wrong = WorkerMonitor([etcd_server.url], [server.url], namespace=namespace, nats=bad)
        with wrong:
            assert wrong.wait_ready(2) is False
            assert wrong.health().nats.last_error
            nats_warnings = [r for r in caplog.records if r.name == "workermon._sources.nats" and r.levelno >= logging.WARNING
                             and "retrying" in r.message]
            assert 1 <= len({r.message for r in nats_warnings}) <= 2
    finally:
        pub.stop()
        server.close()
    assert SECRET not in caplog.text
