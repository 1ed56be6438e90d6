"""workermon against real Dynamo releases: mocker workers + the real frontend.

Opt in with ``pytest -m dynamo`` after ``scripts/setup-dynamo.sh`` has made one
virtual environment per release (``$WORKERMON_DYNAMO_VENVS/<version>``); run
it inside a private network namespace with ``scripts/dynamo-interop.sh``.
Each release is skipped with its reason when its environment is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import msgspec
import pytest

from workermon import WorkerMonitor
from workermon._servers import EtcdServer, NatsServer, free_port

from ..helpers import RawNatsSubscriber, etcd_client, retry_pause, wait_until
from .fleet import DynamoFleet, version_tuple

pytestmark = pytest.mark.dynamo

RELEASES = os.environ.get("WORKERMON_DYNAMO_RELEASES", "0.6.1 0.7.1 0.8.1 1.0.2").split()
VENVS = Path(os.environ.get("WORKERMON_DYNAMO_VENVS", Path(__file__).resolve().parents[2] / ".dynamo-venvs"))
BLOCKS = 64
THRESHOLD = 0.5
ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("WORKERMON_DYNAMO_RESULTS", VENVS / "results.jsonl"))


def _python_for(version: str) -> str:
    python = VENVS / version / "bin" / "python"
    if not python.exists():
        pytest.skip(f"Dynamo {version} is not set up: run scripts/setup-dynamo.sh {version}")
    return str(python)


def _release_from(release: str, oldest: Tuple[int, ...], why: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The release's Python, with the event-plane variables cleared (each test sets the plane it runs);
    skips a release older than ``oldest`` (``why``) or one that is not set up."""
    if version_tuple(release) < oldest:
        pytest.skip(why)
    for name in ("NATS_SERVER", "DYN_EVENT_PLANE", "DYN_ZMQ_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return _python_for(release)


def _only_loopback() -> bool:
    # 0.6/0.7 advertise the first non-loopback address; in a private network
    # namespace there is none, so every byte stays on loopback.
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return False
    return names == ["lo"]


class LastPublished:
    """Records each worker's last published active blocks, decoded independently of workermon."""

    def __init__(self, nats_url: str, subject: str) -> None:
        self.sub = RawNatsSubscriber(nats_url, subject)
        self.last: Dict[Tuple[int, int], int] = {}
        self.count = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="interop-subscriber")
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                subject, payload = self.sub.next(timeout=3600)
            except (OSError, ConnectionError):
                return
            if not subject.endswith(".kv_metrics"):
                continue
            if payload[:1] == b"{":
                doc = json.loads(payload)
            else:
                doc = msgspec.msgpack.decode(msgspec.msgpack.decode(payload)["payload"])
            wid = doc["worker_id"] % (1 << 64)
            value = doc.get("kv_used_blocks")
            if value is None:
                value = doc.get("active_decode_blocks")
            if value is None and doc.get("data"):
                value = doc["data"]["kv_stats"]["kv_active_blocks"]
            if value is not None:
                with self.lock:
                    self.last[(wid, 0)] = value
                    self.count += 1

    def snapshot(self) -> Dict[Tuple[int, int], int]:
        with self.lock:
            return dict(self.last)

    def close(self) -> None:
        try:
            self.sub.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sub.close()
        self.thread.join(10)


@pytest.fixture(params=RELEASES)
def release(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def servers() -> Iterator[tuple]:
    with EtcdServer() as etcd, NatsServer(jetstream=True) as nats:
        yield etcd, nats


def _record(version: str, result: Dict[str, object]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps({"release": version, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **result}) + "\n")


def test_release_interop(release: str, servers: tuple) -> None:
    python = _python_for(release)
    if version_tuple(release) < (0, 8) and not _only_loopback():
        pytest.skip("Dynamo < 0.8 advertises a non-loopback address: run inside `unshare -n` "
                    "(scripts/dynamo-interop.sh)")
    etcd, nats = servers
    fleet = DynamoFleet(python, release, etcd.url, nats.url, blocks=BLOCKS, busy_threshold=THRESHOLD)
    # Whatever subject the release uses (namespace- or endpoint-scoped): every kv_metrics one.
    published = LastPublished(nats.url, "namespace.dynamo.>")
    mon = WorkerMonitor([etcd.url], [nats.url], namespace="dynamo", busy_threshold=THRESHOLD)
    try:
        _check_fleet(release, release, _format_of(release), etcd, fleet, mon, published.snapshot)
    finally:
        published.close()


ZMQ_MODES = {
    # label: (mocker args, frontend args)
    "zmq": ((), ()),
    "zmq, dp2": (("--data-parallel-size", "2"), ()),
    "zmq, kv router": ((), ("--router-mode", "kv")),
}


@pytest.mark.parametrize("mode", list(ZMQ_MODES))
def test_release_interop_zmq_defaults(release: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1.3+ with its defaults: no DYN_EVENT_PLANE, no NATS server anywhere; workermon gets only etcd.
    (1.3 registers its channels under an older layout than 1.4+.)"""
    for name in ("NATS_SERVER", "DYN_EVENT_PLANE", "DYN_ZMQ_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    if version_tuple(release) < (1, 3):
        pytest.skip("the ZMQ event plane is the default from Dynamo 1.3 on")
    if version_tuple(release) < (1, 6) and not _only_loopback():
        pytest.skip("Dynamo 1.1-1.5 advertise a non-loopback address: run inside `unshare -n` "
                    "(scripts/dynamo-interop.sh)")
    python = _python_for(release)
    worker_args, frontend_args = ZMQ_MODES[mode]
    with EtcdServer() as etcd:
        fleet = DynamoFleet(python, release, etcd.url, None, blocks=BLOCKS, busy_threshold=THRESHOLD,
                            event_plane=None, worker_args=worker_args, frontend_args=frontend_args)
        # Nothing but the etcd endpoints (and the frontend's threshold).
        mon = WorkerMonitor(etcd_endpoints=[etcd.url], busy_threshold=THRESHOLD)
        published = ZmqLastPublished(etcd.url)
        try:
            fmt = f"card_json card; ZMQ event plane (4 frames){', dp 2' if 'dp2' in mode else ''}" + (
                ", --router-mode kv" if "kv" in mode else "")
            _check_fleet(release, f"{release} ({mode})", fmt, etcd, fleet, mon, published.snapshot,
                         before_load=published.follow)
        finally:
            published.close()


def _check_fleet(release: str, label: str, fmt: str, etcd: EtcdServer, fleet: DynamoFleet, mon: WorkerMonitor,
                 last_published: Callable[[], Dict[Tuple[int, int], int]],
                 before_load: Optional[Callable[[], None]] = None) -> None:
    result: Dict[str, object] = {"label": label, "format": "", "members": False, "totals": False,
                                 "last_values": False, "agrees_503": False, "agrees_free": False,
                                 "kill_removed": False}
    fleet.start()
    mon.start()
    try:
        _until_serving(fleet, mon)

        # Members equal the workers' cards; totals equal --num-gpu-blocks-override.
        client = etcd_client(etcd.url)
        cards = {meta.lease_id for _, meta in client.get_prefix("v1/mdc/dynamo/")}
        client.close()
        assert mon.members() == cards
        result["members"] = True
        assert {s.kv_total_blocks for s in mon.load_states().values()} == {BLOCKS}
        result["totals"] = True
        if before_load is not None:
            before_load()

        # Warm-up: one small request per worker (0.6.1 idles a core until then).
        for _ in range(fleet.workers):
            status = 0
            for _attempt in range(3):
                status, _ = fleet.chat(max_tokens=2)
                if status == 200:
                    break
            assert status == 200

        # Drive load until the frontend answers 503 because every worker is busy.
        saw_503 = threading.Event()
        statuses: List[int] = []
        seen_at_reject: List[object] = []

        def one(i: int) -> None:
            if saw_503.is_set():
                return
            status, body = fleet.chat(max_tokens=120, prompt="x" * 600, timeout=120)
            statuses.append(status)
            # "All workers are busy" is HTTP 503 up to 1.2; from 1.3 on 529 "Overloaded".
            if (status == 503 and "busy" in body.lower()) or (status == 529 and "overloaded" in body.lower()):
                result["overload_status"] = status
                saw_503.set()
                # At the moment the frontend refuses, workermon must say all are busy.
                agree = mon.wait_for(lambda: not mon.free_workers() and bool(mon.members()), 2.0)
                result["agrees_503"] = agree
                if not agree:
                    seen_at_reject.append(({w: (dict(st.kv_active_blocks), st.busy_ranks, st.data_parallel_size)
                                            for w, st in mon.load_states().items()}, mon.health().reducer,
                                           last_published()))

        with ThreadPoolExecutor(max_workers=24) as pool:
            list(pool.map(one, range(120)))
        assert saw_503.is_set(), f"no all-busy rejection from the frontend; statuses {sorted(set(statuses))}"
        assert result["agrees_503"], f"frontend said all busy, workermon did not: {seen_at_reject}"

        # Load drains: workermon reports free workers, and then the frontend accepts again.
        assert mon.wait_for(lambda: mon.busy_workers() == frozenset(), 120)
        status, _ = fleet.chat(max_tokens=2)
        assert status == 200
        result["agrees_free"] = True

        # Each worker's (and rank's) active blocks equal the last value it published.
        last = last_published()
        states = mon.load_states()
        assert last and {w for w, _ in last} <= set(states)
        assert {(w, r): states[w].kv_active_blocks.get(r) for w, r in last} == last
        result["last_values"] = True
        result["format"] = fmt

        # SIGKILL one worker: it leaves workermon's view within its lease TTL + 1 s.
        ttl = 30.0 if version_tuple(release) >= (1, 6) else 10.0
        victim = fleet.mockers[0]
        before = set(mon.members())
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert mon.wait_for(lambda: len(mon.members()) == len(before) - 1, ttl + 1.0)
        result["kill_removed"] = round(time.monotonic() - killed_at, 2)
    finally:
        _record(release, result)
        mon.stop()
        fleet.stop()


def _until_serving(fleet: DynamoFleet, mon: WorkerMonitor) -> None:
    """The monitor is ready with every worker, and the frontend lists the model."""
    assert mon.wait_ready(60)
    assert mon.wait_for(lambda: len(mon.members()) == fleet.workers, 90), fleet.logs()
    deadline = time.monotonic() + 90
    while not fleet.models_listed():  # another process's HTTP port: a bounded poll
        assert time.monotonic() < deadline, fleet.logs()
        retry_pause(0.25)


class ZmqLastPublished:
    """Each (worker, rank)'s last published kv_used_blocks, read off the workers' own ZMQ sockets
    by a plain pyzmq subscriber (frames decoded by hand, independently of workermon)."""

    def __init__(self, etcd_url: str) -> None:
        import zmq

        self.etcd_url = etcd_url
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv_metrics")
        self.sub.setsockopt(zmq.RCVTIMEO, 200)
        self.last: Dict[Tuple[int, int], int] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def follow(self, expected: int = 3) -> None:
        """Connect to every worker's kv_metrics channel, waiting (bounded) until ``expected`` are listed."""
        client = etcd_client(self.etcd_url)
        try:
            deadline = time.monotonic() + 30
            while True:
                # Both layouts: 1.4+ (v1/event_channels/namespace/dynamo/…) and 1.3 (v1/event_channels/dynamo/…).
                endpoints = set()
                for value, meta in client.get_prefix("v1/event_channels/"):
                    doc = json.loads(value)
                    if doc.get("topic") == "kv_metrics" and "/dynamo/" in meta.key.decode():
                        endpoints.add(doc["transport"]["config"]["endpoint"])
                if len(endpoints) >= expected or time.monotonic() > deadline:
                    break
                retry_pause(0.2)  # another process's registration: a bounded poll
            for endpoint in endpoints:
                self.sub.connect(endpoint)
        finally:
            client.close()
        self.thread = threading.Thread(target=self._run, name="interop-zmq-subscriber")
        self.thread.start()

    def _run(self) -> None:
        import zmq

        while not self.done.is_set():
            try:
                frames = self.sub.recv_multipart()
            except zmq.Again:
                continue
            env = msgspec.msgpack.decode(frames[3][5:])
            doc = msgspec.msgpack.decode(env["payload"])
            if doc.get("kv_used_blocks") is not None:
                with self.lock:
                    self.last[(doc["worker_id"], doc.get("dp_rank") or 0)] = doc["kv_used_blocks"]

    def snapshot(self) -> Dict[Tuple[int, int], int]:
        with self.lock:
            return dict(self.last)

    def close(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(10)
        self.sub.close(linger=0)
        self.ctx.term()


def _format_of(release: str) -> str:
    v = version_tuple(release)
    card = "top-level card" if v < (0, 7) else "card_json card"
    if v < (0, 8):
        return f"{card}; LoadEvent JSON"
    if v < (0, 9):
        return f"{card}; ActiveLoad JSON"
    if v < (1, 6):
        return f"{card}; msgpack envelope"
    return f"{card}; msgpack envelope, endpoint subject"



def _post(url: str, body: Dict[str, object], headers: Optional[Dict[str, str]] = None,
          timeout: float = 120.0) -> Tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@contextlib.contextmanager
def _loading(frontend: str, model: str, workers: List[int], max_tokens: int) -> Iterator[None]:
    """One thread per entry of ``workers`` keeps that worker busy through the frontend (named with
    x-worker-instance-id) with long requests, until the block ends; then they finish and are joined."""
    stop = threading.Event()

    def load(wid: int) -> None:
        while not stop.is_set():
            _post(f"{frontend}/v1/chat/completions",
                  {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "min_tokens": max_tokens,
                   "messages": [{"role": "user", "content": "x" * 600}]},
                  {"x-worker-instance-id": str(wid)})

    loaders = [threading.Thread(target=load, args=(wid,), name="interop-loader") for wid in workers]
    for t in loaders:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in loaders:
            t.join(240)


def test_flask_router_through_the_direct_mode_frontend(release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/flask_router.py in front of a 1.6.1 frontend in direct mode: requests run where reserve() chose."""
    python = _release_from(release, (1, 6), "the frontend's direct mode is measured on 1.6", monkeypatch)
    from examples.flask_router import create_app

    with EtcdServer() as etcd:
        fleet = DynamoFleet(python, release, etcd.url, None, blocks=BLOCKS, busy_threshold=THRESHOLD,
                            event_plane=None, frontend_args=("--router-mode", "direct"))
        mon = WorkerMonitor(etcd_endpoints=[etcd.url], busy_threshold=THRESHOLD)
        fleet.start()
        mon.start()
        try:
            _until_serving(fleet, mon)
            frontend = f"http://127.0.0.1:{fleet.http_port}"
            app = create_app(mon, frontend_url=frontend)
            model = fleet.served_model()

            def ask(max_tokens: int = 4, stream: bool = False) -> Tuple[int, Dict[str, str], str]:
                body = {"model": model, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
                        "min_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}],
                        "nvext": {"extra_fields": ["worker_id"]}}
                r = app.test_client().post("/v1/chat/completions", json=body)
                return r.status_code, dict(r.headers), r.get_data(as_text=True)

            # Each request runs on the worker reserve() chose (the frontend says where it ran).
            for stream in (False, True):
                for _ in range(fleet.workers * 2):
                    status, headers, text = ask(stream=stream)
                    assert status == 200, text
                    chosen = int(headers["X-Workermon-Worker"], 16)
                    ran_on = {int(m) for m in re.findall(r'"decode_worker_id":\s*(\d+)', text)}
                    assert ran_on == {chosen}, (chosen, text[:500])
            assert mon.health().picker["in_flight"] == 0

            # A burst spreads: while they are in flight, reservations steer new ones elsewhere.
            with ThreadPoolExecutor(max_workers=12) as pool:
                results = list(pool.map(lambda _: ask(max_tokens=40), range(12)))
            used = Counter(int(h["X-Workermon-Worker"], 16) for s, h, _ in results if s == 200)
            assert set(used) == mon.members() and max(used.values()) <= 6, used

            # All busy: load the workers through the frontend directly, then the router answers
            # 529 (as the 1.6 frontend does) with Retry-After and forwards nothing.
            with _loading(frontend, model, [wid for wid in mon.members() for _ in range(3)], max_tokens=120):
                assert mon.wait_for(lambda: not mon.free_workers(), 60), mon.load_states()
                before = app.config["forwarded"]
                r = app.test_client().post("/v1/chat/completions", json={"model": model, "messages": []})
                assert r.status_code == 529 and r.headers["Retry-After"] == "1"
                assert app.config["forwarded"] == before
        finally:
            mon.stop()
            fleet.stop()


def test_gunicorn_router_as_it_ships(release: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`gunicorn -c examples/gunicorn.conf.py` with only environment settings, in front of a real
    direct-mode frontend on a pure-ZMQ fleet: streamed and plain chat run where the router chose,
    the health endpoint reports no NATS, and stopping gunicorn takes its agent with it."""
    python = _release_from(release, (1, 6), "the frontend's direct mode is measured on 1.6", monkeypatch)
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        pytest.skip("gunicorn is not installed (pip install 'workermon[examples]')")
    with EtcdServer() as etcd:
        fleet = DynamoFleet(python, release, etcd.url, None, blocks=BLOCKS, busy_threshold=THRESHOLD,
                            event_plane=None, frontend_args=("--router-mode", "direct"))
        fleet.start()
        port = free_port()
        sock = tmp_path / "agent" / "agent.sock"
        env = dict(os.environ, WORKERMON_BIND=f"127.0.0.1:{port}", ETCD_ENDPOINTS=etcd.url, DYN_EVENT_PLANE="zmq",
                   WORKERMON_FRONTEND_URL=f"http://127.0.0.1:{fleet.http_port}", WORKERMON_AGENT_SOCKET=str(sock),
                   WORKERMON_BUSY_THRESHOLD=str(THRESHOLD), WORKERMON_TOKENIZER=str(fleet.model),
                   WORKERMON_GUNICORN_WORKERS="2", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([str(gunicorn), "-c", "examples/gunicorn.conf.py"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            model = ""
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not model:
                if fleet.models_listed():
                    model = fleet.served_model()
                else:
                    retry_pause()
            assert model, fleet.logs()
            health: Dict[str, Any] = {}
            while time.monotonic() < deadline and health.get("members") != fleet.workers:
                try:
                    with urllib.request.urlopen(base + "/_workermon/health", timeout=5) as r:
                        health = json.loads(r.read())
                except OSError:
                    retry_pause()
            assert health.get("members") == fleet.workers, health
            assert "nats" not in health["required"] and health["zmq"] == "connected", health
            assert health["strategy"] == "p2c"
            ran: Counter = Counter()
            for stream in (False, True, False, True, False, True):
                status, text, headers = _http(base + "/v1/chat/completions", {
                    "model": model, "max_tokens": 8, "stream": stream, "ignore_eos": True, "min_tokens": 8,
                    "messages": [{"role": "user", "content": "hello " * 40}],
                    "nvext": {"extra_fields": ["worker_id"]}})
                assert status == 200, text
                chosen = int(headers["X-Workermon-Worker"], 16)
                assert {int(m) for m in re.findall(r'"decode_worker_id":\s*(\d+)', text)} == {chosen}, text[:300]
                if stream:
                    assert text.count("data: ") >= 8 and text.rstrip().endswith("data: [DONE]"), text[-300:]
                ran[chosen] += 1
            assert len(ran) >= 2, ran  # p2c with bookings spreads them
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                fleet.stop()
        err = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in err, err[-3000:]
        assert not sock.exists(), "the agent should be gone with gunicorn"


def _http(url: str, body: Dict[str, object]) -> Tuple[int, str, Dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(errors="replace"), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace"), dict(err.headers)


def test_admission_and_overloaded_agree_with_the_direct_mode_frontend(release: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16, items 1-2, on a real 1.6.1 frontend in direct mode: a worker whose card differs (block
    size 32 beside 16) is refused by the frontend (400) and never chosen by workermon; it is served
    once the incumbent leaves; a 529 marked with overloaded() holds the worker busy."""
    python = _release_from(release, (1, 6), "card admission and direct mode are measured on 1.6", monkeypatch)
    from examples.flask_router import create_app

    from ..conftest import Changes

    with EtcdServer() as etcd:
        fleet = DynamoFleet(python, release, etcd.url, None, workers=1, blocks=BLOCKS, busy_threshold=THRESHOLD,
                            event_plane=None, frontend_args=("--router-mode", "direct"))
        # The KV rule off in workermon: only the frontend's own threshold refuses (529), so the
        # only way workermon learns of it is overloaded().
        mon = WorkerMonitor(etcd_endpoints=[etcd.url], busy_threshold=None, overload_hold=30.0)
        changes = Changes()
        mon.on_busy_change(changes)
        fleet.start()
        mon.start()
        try:
            _until_serving(fleet, mon)
            (a,) = mon.members()
            fleet.worker_args = ("--block-size", "32")  # the last --block-size wins
            fleet.start_worker(1)
            assert mon.wait_for(lambda: len(mon.load_states()) == 2, 90), fleet.logs()
            (b,) = set(mon.load_states()) - {a}
            assert mon.members() == {a} and mon.load_states()[b].admitted is False
            assert "kv_cache_block_size 32 (incumbent: 16)" in str(mon.why(b))
            frontend = f"http://127.0.0.1:{fleet.http_port}"
            model = fleet.served_model()
            body = {"model": model, "max_tokens": 4, "ignore_eos": True, "min_tokens": 4,
                    "messages": [{"role": "user", "content": "hello"}], "nvext": {"extra_fields": ["worker_id"]}}
            # The premise, measured: the frontend refuses the newcomer.
            assert _post(f"{frontend}/v1/chat/completions", body, {"x-worker-instance-id": str(b)})[0] == 400
            app = create_app(mon, frontend_url=frontend)
            client = app.test_client()
            for _ in range(12):
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.get_data(as_text=True)
                assert int(r.headers["X-Workermon-Worker"], 16) == a
            # The incumbent leaves (1.6 revokes its lease on SIGTERM): the frontend then serves B.
            os.killpg(fleet.mockers[0].pid, signal.SIGTERM)
            assert mon.wait_for(lambda: mon.members() == {b}, 60), mon.load_states()
            deadline = time.monotonic() + 60
            while True:  # the frontend re-admits on its own schedule: a bounded poll of its answers
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code == 200:
                    break
                assert time.monotonic() < deadline, r.get_data(as_text=True)
                retry_pause(0.5)
            ran_on = {int(m) for m in re.findall(r'"decode_worker_id":\s*(\d+)', r.get_data(as_text=True))}
            assert int(r.headers["X-Workermon-Worker"], 16) == b and ran_on == {b}
            # A real 529: load B over the frontend's threshold, then reserve it through the router.
            with _loading(frontend, model, [b] * 4, max_tokens=200):
                over = THRESHOLD * mon.load_states()[b].kv_total_blocks  # type: ignore[operator]
                assert mon.wait_for(lambda: max(mon.load_states()[b].kv_active_blocks.values(), default=0) > over,
                                    90), mon.load_states()
                while not changes.q.empty():
                    changes.q.get_nowait()
                statuses = Counter(client.post("/v1/chat/completions", json=body).status_code for _ in range(5))
                # Each 529 was marked: the worker entered the busy set, the booking went.
                assert mon.health().reducer.get("overloaded", 0) >= 1, statuses
                assert b in changes.get(timeout=10).became_busy
                assert wait_until(lambda: mon.health().picker["in_flight"] == 0, 30)
                assert not statuses.keys() - {529, 503, 200}, statuses
        finally:
            mon.stop()
            fleet.stop()
