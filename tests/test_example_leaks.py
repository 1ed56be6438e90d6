"""The routers in examples/ leak no reservation: HEAD, 204, 304 and a 529 retry, each through a
real WSGI server on loopback, a monitor fed by real etcd and NATS."""

from __future__ import annotations

import http.client
import http.server
import json
from typing import Any, Iterator, List, Tuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from workermon import WorkerPublisher
from workermon._servers import EtcdServer, NatsServer

from .helpers import LoopbackServer, Make, wait_until



class Upstream(LoopbackServer):
    """A worker (or direct-mode frontend) on loopback: 529 for the ids in ``overloaded``,
    the status a path names (``/status/204``), else 200 with who served it."""

    def __init__(self, name: str) -> None:
        outer = self
        self.name = name
        self.overloaded: set = set()  # direct mode: the worker ids it answers 529 for
        self.refuse_all = False  # a worker's own endpoint: 529 for everything

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer()

            def _answer(self, head: bool = False) -> None:
                target = self.headers.get("x-worker-instance-id")
                status = 200
                if outer.refuse_all or (target is not None and int(target) in outer.overloaded):
                    status = 529
                elif self.path.startswith("/status/"):
                    status = int(self.path.rsplit("/", 1)[-1])
                data = b"" if status in (204, 304) else json.dumps(
                    {"served_by": outer.name, "target": target}).encode()
                self.send_response(status)
                if status not in (204, 304):
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        super().__init__(server, f"upstream-{name}")


class Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class Serving(LoopbackServer):
    """A WSGI app under wsgiref on loopback, in a thread (it closes every response it sends)."""

    def __init__(self, app: Any) -> None:
        super().__init__(make_server("127.0.0.1", 0, app, handler_class=Quiet), "wsgi-under-test")

    def request(self, method: str, path: str, body: bytes = b"") -> Tuple[int, bytes, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request(method, path, body=body or None)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.headers
        finally:
            conn.close()


@pytest.fixture
def fleet(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> Iterator[List[WorkerPublisher]]:
    pubs = [WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
            for _ in range(2)]
    yield pubs
    for pub in pubs:
        pub.stop()


def test_flask_router_releases_on_head_204_304_and_529(make_monitor: Make, fleet: List[WorkerPublisher]) -> None:
    from examples.flask_router import create_app

    ups = [Upstream("a"), Upstream("b")]
    serving = None
    try:
        urls = {pub.worker_id: up.url for pub, up in zip(fleet, ups)}
        mon = make_monitor(overload_hold=60.0)
        mon.start()
        assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == set(urls), 10)
        serving = Serving(create_app(mon, worker_url=urls.get))
        # More HEADs than the fleet's capacity (2 × 90 blocks): each leaked booking would
        # take a block until the fleet answered 503.
        for _ in range(200):
            status, body, _ = serving.request("HEAD", "/v1/models")
            assert status == 200 and body == b""
        for code in (204, 304):
            for _ in range(30):
                assert serving.request("GET", f"/status/{code}")[0] == code
        assert wait_until(lambda: mon.health().picker["in_flight"] == 0, 10), mon.health().picker
        assert mon.health().picker["reserved"] == mon.health().picker["released"] == 260
        # A 529 from the worker: overloaded() releases and holds it busy; the retry goes elsewhere.
        overloaded = fleet[0].worker_id
        ups[0].refuse_all = True
        for _ in range(10):
            status, body, headers = serving.request("GET", "/v1/models")
            assert status == 200 and json.loads(body)["served_by"] == "b"
        assert mon.is_busy(overloaded) and mon.health().reducer["overloaded"] >= 1
        assert wait_until(lambda: mon.health().picker["in_flight"] == 0, 10), mon.health().picker
    finally:
        if serving is not None:
            serving.close()
        for up in ups:
            up.close()


def test_django_middleware_releases_on_head_and_on_a_529_retry(
        etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, fleet: List[WorkerPublisher]) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF="tests.django_urls", SECRET_KEY="test",
            MIDDLEWARE=["examples.django_middleware.BusyWorkersMiddleware"], INSTALLED_APPS=[],
            WORKERMON_EXEMPT_PATHS=["/healthz"],
        )
        django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    from examples import django_middleware

    frontend = Upstream("frontend")  # a direct-mode frontend stand-in: who was named, or 529
    cfg = {"etcd_endpoints": [etcd_server.url], "nats_servers": [nats_server.url], "namespace": namespace,
           "busy_threshold": 0.9, "overload_hold": 60.0}
    serving = None
    try:
        with override_settings(WORKERMON=cfg, WORKERMON_FRONTEND_URL=frontend.url):
            serving = Serving(WSGIHandler())
            mon = django_middleware.get_monitor()
            assert mon.wait_for(lambda: mon.members() == {p.worker_id for p in fleet}, 10)
            for _ in range(200):
                assert serving.request("HEAD", "/v1/models")[0] == 200
            assert wait_until(lambda: mon.health().picker["in_flight"] == 0, 10), mon.health().picker
            overloaded = fleet[0].worker_id
            frontend.overloaded.add(overloaded)
            for _ in range(10):
                status, body, _ = serving.request("POST", "/v1/chat/completions", b'{"q": 1}')
                assert status == 200 and json.loads(body)["target"] == str(fleet[1].worker_id)
            assert mon.is_busy(overloaded)
            assert wait_until(lambda: mon.health().picker["in_flight"] == 0, 10), mon.health().picker
            # Both overloaded: the second 529 is answered, nothing is kept booked.
            frontend.overloaded.add(fleet[1].worker_id)
            mon.set_thresholds(busy_threshold=0.9)  # no change; the holds stay
            assert serving.request("POST", "/v1/chat/completions", b"{}")[0] in (503, 529)
            assert wait_until(lambda: mon.health().picker["in_flight"] == 0, 10), mon.health().picker
    finally:
        if serving is not None:
            serving.close()
        frontend.close()
        django_middleware.reset_monitor()
