"""The host agent when things go wrong: hung, killed and restarted with bookings held, an impostor,
a squatted or shared directory, out of descriptors, 10,000 workers, and picking while it is gone.
Real agent processes (``python -m workermon agent``), real etcd and ZMQ workers, real client threads."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

from workermon import SharedMonitor, WorkerPublisher
from workermon._agent import Agent
from workermon._servers import EtcdServer, free_port

from .conftest import Changes
from .helpers import Make, card_json, card_key, etcd_client



@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="wm-agentf-")
    os.chmod(d, 0o700)
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


# python -c this N workermon-args...: RLIMIT_NOFILE = N, then ``python -m workermon`` with the args.
_WITH_FD_LIMIT = ("import resource, runpy, sys; n = int(sys.argv.pop(1)); "
                  "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); sys.argv[0] = 'workermon'; "
                  "runpy.run_module('workermon', run_name='__main__', alter_sys=True)")


class AgentProcess:
    """``python -m workermon agent`` on the ZMQ plane (no NATS), killable and restartable."""

    def __init__(self, etcd_url: str, namespace: str, path: str, *extra: str,
                 limit_fds: Optional[int] = None) -> None:
        self.cmd = [sys.executable, "-m", "workermon", "agent", "--etcd", etcd_url, "--namespace", namespace,
                    "--event-plane", "zmq", "--socket", path, *extra]
        self.limit_fds = limit_fds
        self.proc: Optional["subprocess.Popen[str]"] = None
        # Its stderr goes to a file beside nothing the agent serves, so a failing test can show it.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="wm-agent-", suffix=".log")
        self.start()

    def start(self) -> None:
        # No preexec_fn: this process runs gRPC threads, and a child that runs Python between fork and
        # exec can deadlock on a lock one of them held (seen: gRPC's fork handler, then no agent at all).
        # The descriptor limit is set by the child itself, before it runs the agent.
        cmd = self.cmd
        if self.limit_fds is not None:
            cmd = [sys.executable, "-c", _WITH_FD_LIMIT, str(self.limit_fds), *self.cmd[3:]]
        env = {k: v for k, v in os.environ.items() if k not in ("NATS_SERVER", "DYN_EVENT_PLANE")}
        self.proc = subprocess.Popen(cmd, env=env, stderr=self.log, stdout=subprocess.DEVNULL, text=True)

    def output(self) -> str:
        """What the agent has written to stderr so far (for assertion messages)."""
        with open(self.log.name) as f:
            return f.read()

    def wait_output(self, text: str, timeout: float) -> bool:
        """Whether ``text`` appears on the agent's stderr within ``timeout`` (a file another process writes:
        there is nothing to wait on but the file, so it is read every 50 ms up to the bound)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() >= deadline or (self.proc is not None and self.proc.poll() is not None):
                return text in self.output()
            time.sleep(0.05)
        return True

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> str:
        """SIGTERM (after SIGCONT, in case it is stopped); its stderr."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        err = self.output()
        self.log.close()
        return err

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hung_agent_never_blocks_16_request_threads(etcd_server: EtcdServer, namespace: str, sock_dir: str,
                                                    zworkers: Any) -> None:
    for _ in range(4):
        zworkers()
    path = os.path.join(sock_dir, "agent.sock")
    agent = AgentProcess(etcd_server.url, namespace, path)
    client = SharedMonitor(path, hung_after=1.0, request_timeout=0.5).start()
    stop = threading.Event()
    worst: List[float] = []
    errors: List[BaseException] = []

    def route() -> None:
        slowest = 0.0
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = client.reserve()
                if r is not None:
                    r.release()
                slowest = max(slowest, time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        worst.append(slowest)

    threads = [threading.Thread(target=route) for _ in range(16)]
    try:
        assert client.wait_ready(20), agent.output()[-3000:]
        assert client.wait_for(lambda: len(client.members()) == 4, 10)
        for t in threads:
            t.start()
        agent.signal(signal.SIGSTOP)
        started = time.monotonic()
        # Not ready within hung_after (+ one heartbeat) of the agent stopping.
        assert client.wait_for(lambda: not client.ready, 5)
        assert time.monotonic() - started < 1.0 + 1.5
        t0 = time.monotonic()
        h = client.health()  # answered locally within request_timeout
        assert time.monotonic() - t0 < 1.0 and not h.alive
        assert client.reserve() is not None  # picking goes on over the last state
        agent.signal(signal.SIGCONT)
        assert client.wait_ready(10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        agent.stop()
        assert client.stop(5)
    assert not errors, errors
    # Every reserve()+release() on 16 threads returned promptly while the agent was stopped.
    assert len(worst) == 16 and max(worst) < 0.25, max(worst)


def test_stop_returns_within_its_bound_while_the_agent_is_hung(etcd_server: EtcdServer, namespace: str,
                                                              sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    agent = AgentProcess(etcd_server.url, namespace, path)
    client = SharedMonitor(path).start()
    try:
        assert client.wait_ready(20), agent.output()[-3000:]
        agent.signal(signal.SIGSTOP)
        # A send that fills the socket while the agent reads nothing still never blocks.
        for _ in range(20_000):
            client.overloaded(1)
        t0 = time.monotonic()
        assert client.stop(2.0)
        assert time.monotonic() - t0 < 2.5
    finally:
        agent.stop()


def test_restart_with_reservations_held(etcd_server: EtcdServer, namespace: str, sock_dir: str,
                                        zworkers: Any) -> None:
    pub = zworkers()
    path = os.path.join(sock_dir, "agent.sock")
    agent = AgentProcess(etcd_server.url, namespace, path)
    client = SharedMonitor(path).start()
    changes = Changes()
    try:
        assert client.wait_ready(20), agent.output()[-3000:]
        assert client.wait_for(lambda: client.members() == {pub.worker_id}, 10)
        client.on_busy_change(changes)
        assert changes.get().version == client.version  # first called with the current state
        assert pub.wait_subscribed(10)
        for blocks in (950, 10, 950, 10):  # four busy-set changes in this agent's lifetime
            pub.report(blocks)
            changes.get()
        before = client.version
        assert before >= 4
        old = client.reserve()
        assert old is not None
        agent.kill()
        assert client.wait_for(lambda: not client.ready, 5)
        agent.start()
        assert client.wait_ready(20), agent.output()[-3000:]
        assert client.version >= before  # a new agent counts from 0; the client never goes backwards
        # The dead agent's shared memory is unmapped: one mapping of fleet.shm, the new agent's.
        maps = Path("/proc/self/maps").read_text().splitlines()
        assert len([m for m in maps if os.path.join(sock_dir, "fleet.shm") in m]) == 1, maps
        new = client.reserve()
        assert new is not None and new.worker_id == pub.worker_id
        assert client.why(pub.worker_id).ranks[0].booked_blocks == 1  # only the new booking exists
        old.release()  # belongs to the dead agent's lifetime: frees nothing of the new one
        assert client.why(pub.worker_id).ranks[0].booked_blocks == 1
        new.release()
        assert client.why(pub.worker_id).ranks[0].booked_blocks == 0
        pub.report(950)
        c = changes.get()
        assert c.version > before and c.busy == {pub.worker_id}
    finally:
        agent.stop()
        assert client.stop(5)


def test_picking_while_the_agent_is_gone_keeps_the_rules(etcd_server: EtcdServer, namespace: str, sock_dir: str,
                                                        zworkers: Any) -> None:
    a = zworkers(display_name="model-a", data_parallel_size=2, data_parallel_start_rank=4, worker_type="decode")
    b = zworkers(display_name="model-b", total_kv_blocks=100)
    path = os.path.join(sock_dir, "agent.sock")
    agent = AgentProcess(etcd_server.url, namespace, path)
    client = SharedMonitor(path, overflow="refuse").start()  # the prediction's room, strictly
    try:
        assert client.wait_ready(20), agent.output()[-3000:]
        assert client.wait_for(lambda: client.members() == {a.worker_id, b.worker_id}, 10)
        agent.kill()
        assert client.wait_for(lambda: not client.ready, 5)
        for _ in range(20):
            r = client.reserve(model="model-a")
            assert r is not None and r.worker_id == a.worker_id and r.dp_rank in (4, 5)
            r.release()
            r = client.reserve(worker_type="decode")
            assert r is not None and r.worker_id == a.worker_id
            r.release()
            r = client.reserve(model="model-b")
            assert r is not None and r.worker_id == b.worker_id and r.dp_rank == 0
            r.release()
        assert client.reserve(model="model-b", blocks=91) is None  # 91 > 0.9 × 100: the rule holds
        held = [client.reserve(model="model-b", blocks=30) for _ in range(4)]
        assert [r is not None for r in held] == [True, True, True, False]  # bookings still count
        client._picker.overflow = "steer"  # the default: the rule still holds, the prediction steers
        steered = client.reserve(model="model-b", blocks=91)
        assert steered is not None and steered.worker_id == b.worker_id and "steer" in steered.reason
        steered.release()
        for r in held:
            if r is not None:
                r.release()
        changes = Changes()
        client.on_busy_change(changes)  # registered while the agent is gone: the last state, at once
        assert changes.get(5).busy == frozenset()
    finally:
        agent.stop()
        assert client.stop(5)


def test_an_agent_started_before_etcd_waits_for_it(namespace: str, sock_dir: str) -> None:
    """A daemon outlives a late etcd: unready, it serves, says why once, and becomes ready when etcd comes."""
    etcd = EtcdServer()  # its port is chosen, nothing listens on it yet
    path = os.path.join(sock_dir, "agent.sock")
    agent = AgentProcess(etcd.url, namespace, path, "--connect-timeout", "1")
    client = SharedMonitor(path).start()
    try:
        assert agent.wait_output("not ready: cannot reach etcd", 30), agent.output()[-3000:]
        assert agent.proc is not None and agent.proc.poll() is None  # still running, still serving
        assert not client.ready
        etcd.start()
        pub = WorkerPublisher([etcd.url], namespace=namespace, event_plane="zmq", total_kv_blocks=100).start()
        try:
            assert client.wait_ready(30), agent.output()[-3000:]
            assert client.wait_for(lambda: client.members() == {pub.worker_id}, 10)
        finally:
            pub.stop()
        assert agent.wait_output("workermon agent serving", 10), agent.output()[-3000:]
    finally:
        err = agent.stop()
        assert client.stop(5)
        etcd.close()
    assert err.count("still trying") == 1, err[-3000:]


def test_sticky_or_shared_directories_are_refused(make_monitor: Make) -> None:
    shared_dir = tempfile.mkdtemp(prefix="wm-sticky-")
    os.chmod(shared_dir, 0o1777)
    try:
        mon = make_monitor()
        with pytest.raises(PermissionError, match="writable by others.*sticky"):
            Agent(mon, os.path.join(shared_dir, "agent.sock")).bind()
        client = SharedMonitor(os.path.join(shared_dir, "agent.sock")).start()
        try:
            assert not client.wait_ready(0.5)
            assert "writable by others" in str(client.last_error)
        finally:
            assert client.stop(5)
    finally:
        os.rmdir(shared_dir)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_a_directory_squatted_by_another_user_is_refused_by_both_ends(make_monitor: Make) -> None:
    parent = tempfile.mkdtemp(prefix="wm-squat-")
    os.chmod(parent, 0o755)
    nobody = pwd.getpwnam("nobody").pw_uid
    squatted = os.path.join(parent, f"workermon-{os.getuid()}")
    path = os.path.join(squatted, "agent.sock")
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    os.mkdir(squatted, 0o700)
    os.chown(squatted, nobody, -1)  # as if the other user had made it first
    pid = os.fork()
    if pid == 0:  # the impostor: another user serving a made-up fleet at the expected path
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            srv.listen(8)
            os.write(ready_w, b"x")
            os.read(stop_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        client = SharedMonitor(path).start()
        try:
            assert not client.wait_ready(0.5)
            assert f"belongs to uid {nobody}" in str(client.last_error), client.last_error
            assert client.members() == frozenset()  # nothing of the impostor's was believed
        finally:
            assert client.stop(5)
        mon = make_monitor()
        with pytest.raises(PermissionError, match=f"belongs to uid {nobody}"):
            Agent(mon, path).bind()
    finally:
        os.write(stop_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, stop_r, stop_w):
            os.close(fd)
        subprocess.run(["rm", "-rf", parent], check=True)


def test_socket_option_never_deletes_a_file_and_a_metrics_failure_cleans_up(etcd_server: EtcdServer,
                                                                          namespace: str, sock_dir: str) -> None:
    precious = os.path.join(sock_dir, "notes.txt")
    with open(precious, "w") as f:
        f.write("keep me")
    res = subprocess.run([sys.executable, "-m", "workermon", "agent", "--etcd", etcd_server.url, "--socket", precious],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a socket" in res.stderr, res.stderr
    assert open(precious).read() == "keep me"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        path = os.path.join(sock_dir, "agent.sock")
        res = subprocess.run([sys.executable, "-m", "workermon", "agent", "--etcd", etcd_server.url,
                              "--namespace", namespace, "--socket", path,
                              "--metrics-port", str(busy.getsockname()[1])],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "cannot serve metrics" in res.stderr, res.stderr
        assert sorted(os.listdir(sock_dir)) == ["notes.txt"]  # no socket, no shared memory left behind
    finally:
        busy.close()


def test_out_of_descriptors_backs_off_and_logs_once(etcd_server: EtcdServer, namespace: str, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "agent.sock")
    agent = AgentProcess(etcd_server.url, namespace, path, limit_fds=48)
    conns: List[socket.socket] = []
    try:
        probe = SharedMonitor(path).start()
        assert probe.wait_ready(20), agent.output()[-3000:]
        assert probe.stop(5)
        for _ in range(60):  # more than it has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(path)  # the kernel queues it even when the agent cannot accept
            conns.append(s)
        cpu0 = agent.cpu_seconds()
        time.sleep(2.0)  # measuring a rate over a fixed interval, not ordering events
        spent = agent.cpu_seconds() - cpu0
        assert spent < 0.4, f"the agent spent {spent:.2f} s of CPU in 2 s while out of descriptors"
        for s in conns:
            s.close()
        conns.clear()
        late = SharedMonitor(path).start()  # accepting resumes once descriptors are free
        try:
            assert late.wait_ready(20), agent.output()[-3000:]
        finally:
            assert late.stop(5)
    finally:
        for s in conns:
            s.close()
        err = agent.stop()
    assert err.count("cannot accept connections") == 1, err[-2000:]


def test_ten_thousand_workers(agent_at: Any, etcd_server: EtcdServer, namespace: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from workermon.prometheus import serve

    client = etcd_client(etcd_server.url)
    ids = [0x5000_0000 + i for i in range(10_000)]
    try:
        for i in range(0, len(ids), 100):
            client.transaction(compare=[], success=[
                client.transactions.put(card_key(namespace, wid), card_json(1000)) for wid in ids[i:i + 100]],
                failure=[])
        shared = agent_at()
        assert shared.wait_ready(30) and shared.wait_for(lambda: len(shared.members()) == 10_000, 60)
        states = shared.load_states()
        assert len(states) == 10_000 and states[ids[-1]].kv_total_blocks == 1000
        assert shared.load_state(ids[5]).worker_id == ids[5]  # type: ignore[union-attr]
        assert shared.load_state(1) is None
        assert shared.why(ids[7]).member
        r = shared.reserve()
        assert r is not None and r.worker_id in set(ids)
        port = free_port()
        server, thread = serve(shared, port)
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
                text = resp.read().decode()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            assert fams["workermon_members"].samples[0].value == 10_000
            assert len(fams["workermon_worker_busy"].samples) == 10_000
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        r.release()
        assert shared.health().alive  # nothing of this dropped the connection
    finally:
        client.delete_prefix(f"v1/mdc/{namespace}/")
        client.close()


@pytest.fixture
def agent_at(make_monitor: Make, sock_dir: str) -> Iterator[Callable[[], SharedMonitor]]:
    mon = make_monitor(event_plane="nats")
    mon.start()
    assert mon.wait_ready(10)
    a = Agent(mon, os.path.join(sock_dir, "agent.sock")).bind()
    a.start()
    made: List[SharedMonitor] = []

    def make() -> SharedMonitor:
        m = SharedMonitor(a.path, request_timeout=30).start()
        made.append(m)
        return m

    yield make
    for m in made:
        assert m.stop(5)
    assert a.stop(5)
