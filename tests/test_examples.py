"""Each example, run for real against a monitor fed by real etcd and NATS."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest


from workermon import WorkerPublisher
from workermon._servers import EtcdServer, NatsServer, free_port

from .helpers import LoopbackServer, Make, retry_pause
from .test_cli import Lines

ROOT = Path(__file__).resolve().parents[1]


class Backend(LoopbackServer):
    """A worker's HTTP endpoint: answers with its own name."""

    def __init__(self, name: str) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _answer(self, body: bytes = b"") -> None:
                data = json.dumps({"backend": outer.name, "path": self.path, "echo": body.decode()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.name = name
        super().__init__(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler), f"backend-{name}")


@pytest.fixture
def fleet(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> Iterator[List[Tuple[WorkerPublisher, Backend]]]:
    out = []
    for name in ("a", "b"):
        pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
        out.append((pub, Backend(name)))
    yield out
    for pub, backend in out:
        pub.stop()
        backend.close()


def test_flask_router(make_monitor: Make, fleet: List[Tuple[WorkerPublisher, Backend]]) -> None:
    from examples.flask_router import RouterSettings, create_app

    (pa, ba), (pb, bb) = fleet
    urls = {pa.worker_id: ba.url, pb.worker_id: bb.url}
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    client = create_app(mon, worker_url=urls.get).test_client()

    seen = {client.get("/v1/models").get_json()["backend"] for _ in range(20)}
    assert seen == {"a", "b"}          # reserve(): p2c over the free workers
    assert mon.health().picker["in_flight"] == 0  # each released once its response was sent
    r = client.post("/v1/chat/completions?x=1", data=b'{"q": 1}', content_type="application/json")
    assert r.status_code == 200 and r.get_json()["echo"] == '{"q": 1}'
    assert r.get_json()["path"] == "/v1/chat/completions?x=1"

    pa.report(95)
    assert mon.wait_for(lambda: mon.is_busy(pa.worker_id), 10)
    assert {client.get("/").get_json()["backend"] for _ in range(4)} == {"b"}

    pb.report(95)
    assert mon.wait_for(lambda: mon.busy_workers() == set(urls), 10)
    r = client.get("/v1/models")
    assert r.status_code == 529 and r.headers["Retry-After"] == "1"  # as Dynamo 1.3+ answers
    assert r.get_json()["error"]["message"] == "All workers are busy, please retry later"
    old = create_app(mon, worker_url=urls.get, settings=RouterSettings(overload_status=503)).test_client()
    assert old.get("/v1/models").status_code == 503  # configurable, for clients of older Dynamo

    pa.report(10)
    assert mon.wait_for(lambda: not mon.is_busy(pa.worker_id), 10)
    r = client.get("/")
    assert r.status_code == 200 and r.get_json()["backend"] == "a"
    assert r.headers["X-Workermon-Worker"] == f"{pa.worker_id:x}"
    assert client.get("/_workermon/health").get_json()["members"] == 2


def test_django_middleware(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str,
                           fleet: List[Tuple[WorkerPublisher, Backend]]) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF="tests.django_urls", SECRET_KEY="test",
            MIDDLEWARE=["examples.django_middleware.BusyWorkersMiddleware"], INSTALLED_APPS=[],
            WORKERMON_EXEMPT_PATHS=["/healthz"],
        )
        django.setup()
    from django.test import Client, override_settings

    from examples import django_middleware

    (pa, _), (pb, _) = fleet
    cfg = {"etcd_endpoints": [etcd_server.url], "nats_servers": [nats_server.url], "namespace": namespace,
           "busy_threshold": 0.9}
    with override_settings(WORKERMON=cfg):
        try:
            client = Client()
            chosen = {client.get("/work").json()["worker"] for _ in range(20)}
            assert chosen == {pa.worker_id, pb.worker_id}
            mon = django_middleware.get_monitor()
            assert mon.health().picker["in_flight"] == 0  # released after each response
            pa.report(99)
            pb.report(99)
            assert mon.wait_for(lambda: mon.busy_workers() == {pa.worker_id, pb.worker_id}, 10)
            r = client.get("/work")
            assert r.status_code == 529 and r["Retry-After"] == "1"
            assert r.json()["error"]["message"] == "All workers are busy, please retry later"
            assert client.get("/healthz").status_code == 200      # exempt path
            pb.report(0)
            assert mon.wait_for(lambda: not mon.is_busy(pb.worker_id), 10)
            assert client.get("/work").json()["worker"] == pb.worker_id
        finally:
            django_middleware.reset_monitor()


def test_callbacks_script(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "callbacks.py"), "--etcd", etcd_server.url, "--nats",
         nats_server.url, "--namespace", namespace, "--stop-after-changes", "1", "--duration", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = Lines(proc.stdout)  # type: ignore[arg-type]
    stop = threading.Event()
    t = threading.Thread(target=lambda: [pub.report(99) for _ in iter(lambda: stop.wait(0.2), True)])
    try:
        assert lines.wait_for("ready:") == "ready: 1 workers, 0 busy"
        t.start()
        assert lines.wait_for("busy ") == f"busy {pub.worker_id:x}"
        assert proc.wait(30) == 0
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.stop()


def _get(url: str) -> Tuple[int, Dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("mode, workers", [("per-process", 2), ("agent", 4)])
def test_gunicorn_post_fork(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, mode: str,
                            workers: int, tmp_path: Path) -> None:
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        pytest.skip("gunicorn is not installed (pip install 'workermon[examples]')")
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
    port = free_port()
    sock_dir = tmp_path / "agent"
    env = dict(os.environ, WORKERMON_BIND=f"127.0.0.1:{port}", ETCD_ENDPOINTS=etcd_server.url,
               NATS_SERVER=nats_server.url, DYN_NAMESPACE=namespace, WORKERMON_GUNICORN_WORKERS=str(workers),
               PYTHONPATH=str(ROOT), WORKERMON_MODE=mode, WORKERMON_AGENT_SOCKET=str(sock_dir / "agent.sock"))
    proc = subprocess.Popen([str(gunicorn), "-c", "examples/gunicorn.conf.py", "examples.wsgi_app:app"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        pids = set()
        # Both forked workers must serve a live view of their own (bounded poll
        # of another process: there is no event to wait on across processes).
        while time.monotonic() < deadline and len(pids) < workers:
            try:
                status, body = _get(base + "/workers")
            except OSError:
                retry_pause()
                continue
            if status == 200 and body["members"] == [pub.worker_id]:
                pids.add(body["pid"])
        assert len(pids) == workers, "every gunicorn worker should report the worker"
        assert proc.pid not in pids
        statuses = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and statuses != {503}:
            pub.report(99)
            statuses = {_get(base + "/")[0] for _ in range(6)}
        assert statuses == {503}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            pub.stop()
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_the_flask_routers_prompt_sizer_counts_the_models_tokens(tmp_path: Path) -> None:
    """``WORKERMON_TOKENIZER`` sizes prompts by the model's own tokenizer (``workermon.load_tokenizer``,
    a model directory or its tokenizer.json); without one, by UTF-8 bytes / 4."""
    from examples.flask_router import PromptSizer
    from workermon import load_tokenizer

    from .dynamo.model import write_tiny_model

    model = write_tiny_model(tmp_path / "m")
    assert load_tokenizer(str(model)).encode("hi").ids == load_tokenizer(str(model / "tokenizer.json")).encode("hi").ids
    body = {"messages": [{"role": "user", "content": "x" * 40}], "prompt": [1, 2, 3]}
    by_tokens = PromptSizer(16, str(model))
    assert by_tokens.tokens(body) == 40 + 3  # the tiny model has a token per byte; ids count as they are
    assert by_tokens.blocks(body) == 3
    by_bytes = PromptSizer(16)
    assert by_bytes.tokens(body) == 10 + 3 and by_bytes.blocks(body) == 1
    assert by_tokens.tokens({"nvext": {"token_data": [7] * 33}}) == 33
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PromptSizer(16, "/nowhere/tokenizer.json").tokens(body)
