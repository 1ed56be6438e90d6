"""The workermon command, run for real as a subprocess."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import IO, Any, List, Tuple

import pytest

from workermon import WorkerPublisher
from workermon._servers import EtcdServer, NatsServer, free_port

CMD = [sys.executable, "-m", "workermon"]


def run(*args: str, timeout: float = 60, env: Any = None) -> subprocess.CompletedProcess:
    return subprocess.run(CMD + list(args), capture_output=True, text=True, timeout=timeout, env=env)


class Lines:
    """Reads a pipe on a thread so the test can wait for a line with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.q: "queue.Queue[str]" = queue.Queue()
        self.seen: List[str] = []
        self.t = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.t.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.q.put(line.rstrip("\n"))
        self.q.put("\0EOF")

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        while True:
            try:
                line = self.q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line with {needle!r} in {timeout} s; saw {self.seen[-20:]}") from None
            self.seen.append(line)
            if line == "\0EOF":
                raise AssertionError(f"output ended without {needle!r}; saw {self.seen[-20:]}")
            if needle in line:
                return line


def started_resources(text: str) -> List[Tuple[int, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith("started ") and "(pid " in line:
            inner = line.split("(pid ", 1)[1].rstrip(")")
            pid_s, dir_s = inner.split(", dir ")
            out.append((int(pid_s), dir_s))
    return out


def assert_cleaned_up(resources: List[Tuple[int, str]], servers: int = 2) -> None:
    assert len(resources) == servers, resources
    for pid, directory in resources:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not os.path.exists(directory), directory


@pytest.mark.integration
def test_demo_runs_and_cleans_up() -> None:
    res = run("demo", "--workers", "4", "--duration", "8", "--plain", "--seed", "7")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "+busy" in res.stdout and "-free" in res.stdout, res.stdout
    assert "4 workers" in res.stdout
    assert "demo done:" in res.stdout
    assert_cleaned_up(started_resources(res.stdout))


@pytest.mark.integration
def test_demo_over_the_zmq_event_plane() -> None:
    res = run("demo", "--workers", "3", "--duration", "6", "--plain", "--seed", "7", "--event-plane", "zmq")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "ZMQ event plane" in res.stdout and "nats-server" not in res.stdout
    assert "+busy" in res.stdout and "-free" in res.stdout, res.stdout
    assert_cleaned_up(started_resources(res.stdout), servers=1)  # etcd only


def test_watch_over_zmq_with_only_etcd(etcd_server: EtcdServer, namespace: str) -> None:
    pub = WorkerPublisher([etcd_server.url], namespace=namespace, total_kv_blocks=100, event_plane="zmq").start()
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_SERVER", "DYN_EVENT_PLANE")}
    proc = subprocess.Popen(CMD + ["watch", "--etcd", etcd_server.url, "--namespace", namespace, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert pub.wait_subscribed(20)
        pub.report(99)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line)["became_busy"] == [pub.worker_id]
    finally:
        proc.terminate()
        proc.wait(10)
        pub.stop()


def test_watch_why_explains_one_worker(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100,
                          load_format="active_load").start()
    try:
        pub.report(95)
        pub.flush()
        res = run("watch", "--etcd", etcd_server.url, "--nats", nats_server.url, "--namespace", namespace,
                  "--plain", "--duration", "1.5", "--interval", "0.5", "--why", f"{pub.worker_id:x}")
        assert res.returncode == 0, res.stderr
        assert f"worker {pub.worker_id:x}: " in res.stdout and "rank 0:" in res.stdout
        assert "busy_threshold 0.9" in res.stdout
        bad = run("watch", "--why", "not-an-id")
        assert bad.returncode == 2 and "worker id" in bad.stderr
    finally:
        pub.stop()


@pytest.mark.integration
def test_demo_json_only_changes_on_stdout() -> None:
    res = run("demo", "--workers", "3", "--duration", "5", "--json", "--seed", "3")
    assert res.returncode == 0, res.stderr
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    assert objs and all(set(o) == {"version", "time", "busy", "became_busy", "became_free", "removed"} for o in objs)
    assert [o["version"] for o in objs] == list(range(1, len(objs) + 1))
    assert_cleaned_up(started_resources(res.stderr))


@pytest.mark.integration
def test_demo_ctrl_c_cleans_up() -> None:
    proc = subprocess.Popen(CMD + ["demo", "--workers", "2", "--plain"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = Lines(proc.stdout)  # type: ignore[arg-type]
    try:
        lines.wait_for("registered 2 simulated workers")
        lines.wait_for("2 workers")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines.t.join(10)
    assert_cleaned_up(started_resources("\n".join(lines.seen + list(lines.q.queue))))


def test_watch_json_and_table(etcd_server: EtcdServer, nats_server: NatsServer, namespace: str) -> None:
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=100).start()
    proc = subprocess.Popen(
        CMD + ["watch", "--etcd", etcd_server.url, "--nats", nats_server.url, "--namespace", namespace,
               "--busy-threshold", "0.5", "--json", "--duration", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc.stdout)  # type: ignore[arg-type]
    stop = threading.Event()

    def keep_reporting() -> None:
        # Core NATS keeps nothing for late subscribers: report until seen.
        while not stop.wait(0.2):
            pub.report(60)

    t = threading.Thread(target=keep_reporting)
    t.start()
    try:
        change = json.loads(lines.wait_for('"became_busy"'))
        assert change["became_busy"] == [pub.worker_id] and change["version"] == 1
    finally:
        stop.set()
        t.join()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        pub.stop()
    res = run("watch", "--etcd", etcd_server.url, "--nats", nats_server.url, "--namespace", namespace,
              "--plain", "--duration", "1")
    assert res.returncode == 0 and "0 workers, 0 busy" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["watch", "--etcd", f"http://127.0.0.1:{free_port()}", "--connect-timeout", "1"], "cannot reach etcd"),
        (["watch", "--etcd", "ftp://nowhere"], "scheme must be http or https"),
        (["watch", "--nats", "nats://127.0.0.1:99999"], "bad port"),
        (["watch", "--busy-threshold", "1.5"], "between 0 and 1"),
        (["watch", "--busy-threshold", "abc"], "not a number"),
        (["watch", "--namespace", "a.b"], "namespace"),
        (["demo", "--workers", "0"], "--workers"),
        ([], "required"),
    ],
)
def test_user_mistakes_are_one_line(args: List[str], message: str) -> None:
    res = run(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr


def test_nats_unreachable_is_one_line(etcd_server: EtcdServer) -> None:
    res = run("watch", "--etcd", etcd_server.url, "--nats", f"nats://127.0.0.1:{free_port()}",
              "--connect-timeout", "1")
    assert res.returncode == 2 and "cannot reach NATS" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_server_binaries_is_one_line() -> None:
    env = dict(os.environ, WORKERMON_NATS_SERVER_BIN="/nonexistent/nats-server")
    res = run("demo", "--duration", "1", env=env)
    assert res.returncode == 2 and "WORKERMON_NATS_SERVER_BIN" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
