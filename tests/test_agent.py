"""`workermon agent` and SharedMonitor against real etcd, NATS and ZMQ, with real client processes."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from workermon import SharedMonitor, WorkerMonitor, WorkerPublisher
from workermon._agent import Agent
from workermon._protocol import FrameReader, encode_frame
from workermon._servers import EtcdServer, NatsServer, free_port

from .conftest import Changes
from .helpers import Make, card_json, card_key, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="wm-agent-")
    os.chmod(d, 0o700)
    yield os.path.join(d, "agent.sock")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def agent(make_monitor: Make, sock_path: str) -> Iterator[Agent]:
    mon = make_monitor()
    mon.start()
    assert mon.wait_ready(10)
    a = Agent(mon, sock_path).bind()
    a.start()
    yield a
    assert a.stop(5)


@pytest.fixture
def shared(sock_path: str) -> Iterator[Callable[..., SharedMonitor]]:
    made: List[SharedMonitor] = []

    def make(**kw: Any) -> SharedMonitor:
        m = SharedMonitor(sock_path, **kw).start()
        made.append(m)
        return m

    yield make
    for m in made:
        assert m.stop(5)




class Client:
    """A SharedMonitor in its own process (tests/shared_client.py)."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.shared_client", path], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.read() == {"ready": True}

    def ask(self, line: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> Any:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(10)


# --- the same view in every process ----------------------------------------------------------

def test_client_processes_see_the_agents_busy_sets_and_versions(
    agent: Agent, shared: Any, etcd_server: EtcdServer, nats_server: NatsServer, namespace: str
) -> None:
    mon = agent.monitor
    pubs = [WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
            for _ in range(3)]
    clients = [Client(agent.path) for _ in range(3)]
    local = shared()
    changes = Changes()
    assert local.wait_ready(10)
    local.on_busy_change(changes)
    try:
        assert mon.wait_for(lambda: len(mon.members()) == 3, 10)
        for k, pub in enumerate(pubs):
            pub.report(95)
            assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
        pubs[0].report(5)
        assert mon.wait_for(lambda: not mon.is_busy(pubs[0].worker_id), 10)
        want = {"version": mon.version, "busy": sorted(mon.busy_workers()), "members": sorted(mon.members())}
        for c in clients:
            assert c.ask(f"wait {mon.version}") == want
        assert local.wait_for(lambda: local.version == mon.version, 10)
        assert local.busy_workers() == mon.busy_workers() and local.members() == mon.members()
        # The initial call, then the changes (several in one push are coalesced, as in a batch).
        seen = [changes.get()]
        while seen[-1].version < mon.version:
            seen.append(changes.get())
        assert [c.version for c in seen] == sorted({c.version for c in seen})
        assert seen[-1].busy == mon.busy_workers() and seen[-1].version == mon.version
        st = local.load_state(pubs[1].worker_id)
        assert st is not None and st.busy and dict(st.kv_active_blocks) == {0: 95}
        assert "BUSY" in str(local.why(pubs[1].worker_id))
        h = local.health()
        assert h.alive and h.ready and h.members == 3
        assert local.set_thresholds(busy_threshold=0.99).busy_threshold == 0.99
        assert local.wait_for(lambda: not local.busy_workers(), 10)
    finally:
        for c in clients:
            c.close()
        for p in pubs:
            p.stop()


def test_reservations_from_four_processes_spread_evenly(agent: Agent, etcd: Any, namespace: str) -> None:
    mon = agent.monitor
    ids = [0x7100 + i for i in range(4)]
    for wid in ids:
        etcd.put(card_key(namespace, wid), card_json(10_000))
    assert mon.wait_for(lambda: mon.members() == set(ids), 10)
    clients = [Client(agent.path) for _ in range(4)]
    try:
        counts: Counter = Counter()
        for c in clients:
            counts.update(c.ask("reserve 25")["workers"])
        assert sum(counts.values()) == 100 and set(counts) == set(ids)
        # Host-wide credit: no herd.  p2c is random: with exact loads its spread over 4 workers × 100
        # exceeds 4 once in ~400 runs and 7 about never (measured by simulation); a herd is ~100.
        assert max(counts.values()) - min(counts.values()) <= 7, counts
        # Bookings live in each process's row of the agent's shared memory, counted host-wide.
        assert agent.booked_blocks() == 100
        clients[0].ask("release")  # a release is a write to this process's own row: at once
        assert agent.booked_blocks() == 75
        clients[1].proc.kill()  # a client that dies holds nothing: the agent clears its row
        clients[1].proc.wait(10)
        assert wait_until(lambda: agent.booked_blocks() == 50)
    finally:
        for c in clients:
            if c.proc.poll() is None:
                c.close()
        for wid in ids:
            etcd.delete(card_key(namespace, wid))


# --- failure: the agent killed and restarted ------------------------------------------------------

def test_agent_kill_and_restart(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str, sock_path: str,
                                shared: Any) -> None:
    env = {**os.environ, "NATS_SERVER": nats_server.url}
    cmd = [sys.executable, "-m", "workermon", "agent", "--etcd", etcd_server.url, "--nats", nats_server.url,
           "--namespace", namespace, "--socket", sock_path]
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
    agent = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = shared()
        changes = Changes()
        client.on_busy_change(changes)
        assert client.wait_ready(20) and client.wait_for(lambda: client.members() == {pub.worker_id}, 10)
        pub.report(95)
        assert client.wait_for(lambda: client.busy_workers() == {pub.worker_id}, 10)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert wait_until(lambda: not client.ready)
        # Reads go on from the last state; health and readiness say the agent is gone.
        assert client.busy_workers() == {pub.worker_id} and client.members() == {pub.worker_id}
        assert not client.wait_ready(0.2)
        h = client.health()
        assert not h.alive and not h.ready
        # reserve() picks locally, within its bound, while the agent is away.
        started = time.monotonic()
        assert client.reserve() is None  # the only member is busy
        pub.report(5)  # a change while the agent is down
        assert time.monotonic() - started < 0.5
        agent = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        assert client.wait_ready(20)
        assert client.wait_for(lambda: not client.busy_workers(), 10)
        # Callbacks resumed with the current state: the change made while the agent was down arrives.
        while True:
            c = changes.get(10)
            if pub.worker_id in c.became_free:
                assert c.busy == frozenset()
                break
        r = client.reserve()
        assert r is not None and r.worker_id == pub.worker_id and "local" not in r.reason
        r.release()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        assert not os.path.exists(sock_path)  # removed on a clean exit
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        pub.stop()


def test_local_fallback_picks_while_the_agent_is_gone(sock_path: str) -> None:
    client = SharedMonitor(sock_path).start()
    try:
        assert not client.wait_ready(0.3)
        assert client.reserve() is None and client.select() is None  # nothing known yet
        h = client.health()
        assert not h.alive and h.picker["rejected"] == 1 and h.picker["select_none"] == 1
        assert "cannot connect" in str(h.etcd.last_error)
    finally:
        assert client.stop(5)


# --- security and hostile bytes ----------------------------------------------------------------

def test_socket_is_private_and_other_users_are_refused(agent: Agent, sock_path: str) -> None:
    mode = os.stat(sock_path).st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o700
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    nobody = pwd.getpwnam("nobody").pw_uid
    # Open the door (0777 dir / 0666 socket) to show the second line: the peer check.
    os.chmod(os.path.dirname(sock_path), 0o777)
    os.chmod(sock_path, 0o666)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child becomes another user and connects
            try:
                os.setuid(nobody)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(sock_path)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                os.write(w, got[4:])
            finally:
                os._exit(0)
        os.close(w)
        answer = b""
        while chunk := os.read(r, 4096):
            answer += chunk
        os.close(r)
        os.waitpid(pid, 0)
        assert b"may not connect" in answer, answer
        assert wait_until(lambda: agent.counters.get("refused", 0) == 1)
    finally:
        os.chmod(os.path.dirname(sock_path), 0o700)
        os.chmod(sock_path, 0o600)


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff",                       # a frame of 4 GiB
    struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
    encode_frame({"no": "type"}),
])
def test_hostile_bytes_drop_the_connection_only(agent: Agent, shared: Any, payload: bytes) -> None:
    good = shared()
    assert good.wait_ready(10)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agent.path)
    s.settimeout(5)
    reader = FrameReader(1 << 30)
    frames: list = []
    while len(frames) < 2:
        frames += reader.feed(s.recv(65536))
    assert [f["t"] for f in frames][:2] == ["hello", "state"]
    s.sendall(payload)
    rest = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    s.close()  # the agent closed it
    assert agent.counters["malformed"] >= 1 and agent.is_alive()
    assert good.health().alive  # the well-behaved client is still served


@pytest.mark.parametrize("request_, error", [
    ({"t": "shutdown", "id": 1}, "unknown request"),
    ({"t": "why", "id": 1, "worker_id": float("inf")}, "must be an integer"),
    ({"t": "why", "id": 1, "worker_id": 5, "blocks": -1}, "blocks"),
    ({"t": "load_state", "id": 1, "worker_id": "x"}, "must be an integer"),
    ({"t": "set_thresholds", "id": 1, "changes": {"busy_threshold": 7}}, "busy_threshold"),
    ({"t": "set_thresholds", "id": 1, "changes": {"no_such_option": 1}}, "no_such_option"),
    ({"t": "set_thresholds", "id": 1, "changes": [1]}, "map"),
])
def test_bad_arguments_get_an_error_reply_and_keep_the_connection(agent: Agent, request_: Any, error: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agent.path)
    s.settimeout(5)
    reader = FrameReader(1 << 30)
    try:
        frames: list = []
        while len(frames) < 2:
            frames += reader.feed(s.recv(65536))
        s.sendall(encode_frame(request_) + encode_frame({"t": "ping", "id": 2}))
        replies: list = []
        while len(replies) < 2:
            replies += [f for f in reader.feed(s.recv(65536)) if f["t"] in ("reply", "pong")]
        assert replies[0]["t"] == "reply" and error in replies[0]["error"], replies[0]
        assert replies[1]["t"] == "pong"  # the same connection answers on
    finally:
        s.close()


def test_frame_reader_bounds() -> None:
    r = FrameReader(max_frame=10)
    with pytest.raises(ValueError):
        r.feed(struct.pack(">I", 11))
    r2 = FrameReader()
    frame = encode_frame({"t": "state", "x": 1})
    assert r2.feed(frame[:3]) == [] and r2.feed(frame[3:]) == [{"t": "state", "x": 1}]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_shared_monitor_across_fork_raises(agent: Agent, shared: Any) -> None:
    m = shared()
    assert m.wait_ready(10)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            m.busy_workers()
            code = 3
        except RuntimeError as exc:
            code = 0 if "post_fork" in str(exc) else 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# --- one NATS connection per host --------------------------------------------------------------

def test_one_nats_connection_per_host(etcd_server: EtcdServer, namespace: str, sock_path: str) -> None:
    mport = free_port()
    with NatsServer(extra_args=["-m", str(mport)]) as nats:
        mon = WorkerMonitor([etcd_server.url], [nats.url], namespace=namespace)
        mon.start()
        a = Agent(mon, sock_path).bind()
        a.start()
        clients = [Client(sock_path) for _ in range(4)]
        try:
            assert mon.wait_ready(10)
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/connz", timeout=5) as r:
                conns = json.loads(r.read())["connections"]
            assert [c.get("name") for c in conns].count("workermon") == 1
        finally:
            for c in clients:
                c.close()
            assert a.stop(5)
            assert mon.stop(5)


def test_agent_over_the_zmq_plane(etcd_server: EtcdServer, namespace: str, sock_path: str, shared: Any) -> None:
    mon = WorkerMonitor([etcd_server.url], None, namespace=namespace, event_plane="zmq")
    mon.start()
    a = Agent(mon, sock_path).bind()
    a.start()
    pub = WorkerPublisher([etcd_server.url], namespace=namespace, total_kv_blocks=100, event_plane="zmq").start()
    try:
        client = shared()
        assert client.wait_ready(10) and mon.wait_ready(10)
        assert pub.wait_subscribed(10)
        pub.report(99)
        assert client.wait_for(lambda: client.busy_workers() == {pub.worker_id}, 10)
        assert client.reserve() is None  # host-wide: the only worker is busy
        assert client.health().zmq.state == "connected"
    finally:
        pub.stop()
        assert a.stop(5)
        assert mon.stop(5)


def test_shared_monitors_follow_the_agents_strategy_unless_they_set_one(
        make_monitor: Make, sock_path: str, shared: Any) -> None:
    # `workermon agent --strategy least_loaded --overflow refuse`: every router
    # process that names no strategy of its own picks that way.
    mon = make_monitor(strategy="least_loaded", overflow="refuse")
    mon.start()
    assert mon.wait_ready(10)
    a = Agent(mon, sock_path).bind()
    a.start()
    try:
        follower = shared()
        own = shared(strategy="random", overflow="steer")
        assert follower.wait_ready(10) and own.wait_ready(10)
        assert (follower.strategy, follower.overflow) == ("least_loaded", "refuse")
        assert (own.strategy, own.overflow) == ("random", "steer")
    finally:
        assert a.stop(5)


def _shm_load(client: SharedMonitor, wid: int) -> Any:
    """The reported load of ``wid``'s first rank as the client's shared memory holds it now (None: no row)."""
    picker = client._picker
    fleet = picker._fleet
    slot = fleet.scan(fleet.header().slots_used).get(wid) if fleet is not None else None
    row = fleet.read_slot(slot) if fleet is not None and slot is not None else None
    return None if row is None else row.ranks[0][0]


def test_a_booking_counts_until_released_when_reports_leave_it_out(agent: Agent, etcd: Any, namespace: str,
                                                                   publisher: Any, shared: Any,
                                                                   make_monitor: Make) -> None:
    """A request queued in the engine holds no KV blocks, so the worker's next report leaves it out: its
    booking still counts until released (predicted load = max(report + booked since, unreleased
    bookings)), host-wide through the shared memory and in a WorkerMonitor alike."""
    from .helpers import load_event

    wid = 0x7200
    etcd.put(card_key(namespace, wid), card_json(100))
    client = shared(overflow="refuse")
    local = make_monitor(overflow="refuse").start()
    try:
        for mon in (client, local):
            assert mon.wait_ready(10) and mon.wait_for(lambda: mon.members() == {wid}, 10)
        for mon in (client, local):
            held = mon.reserve(blocks=60)
            assert held is not None and held.worker_id == wid
            publisher.publish(f"namespace.{namespace}.kv_metrics", load_event(wid, 10))  # queued: 10, not 70
            publisher.flush()
            if mon is client:
                assert wait_until(lambda: _shm_load(client, wid) == 10)
            else:
                def reported() -> Any:
                    st = local.load_state(wid)
                    return None if st is None else dict(st.kv_active_blocks)
                assert local.wait_for(lambda: reported() == {0: 10}, 10)
            assert mon.reserve(blocks=40) is None  # max(10 + 0, 60) + 40 > 0.9 × 100
            small = mon.reserve(blocks=25)  # 60 + 25 ≤ 90
            assert small is not None
            small.release()
            held.release()
            later = mon.reserve(blocks=40)  # 10 + 40 ≤ 90 once the booking is released
            assert later is not None
            later.release()
            publisher.publish(f"namespace.{namespace}.kv_metrics", load_event(wid, 0))
            publisher.flush()
            assert wait_until(lambda: _shm_load(client, wid) == 0)
    finally:
        etcd.delete(card_key(namespace, wid))
