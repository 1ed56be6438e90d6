"""gunicorn configuration: one workermon agent per host, a SharedMonitor in every worker.

    gunicorn -c examples/gunicorn.conf.py examples.wsgi_app:app

The master starts ``workermon agent`` as a child process (``on_starting``) —
one etcd watch, one NATS/ZMQ subscription and one decode of each load report
for the whole host — and stops it on exit.  Each worker process connects a
``SharedMonitor`` in ``post_fork``: reads stay lock-free in the worker, and
``reserve()`` books host-wide, so the workers do not herd.  (Instead of the
master, a systemd unit or a sidecar container can run ``workermon agent``; see
the README.)

``WORKERMON_MODE=per-process`` keeps the older shape: one WorkerMonitor per
worker process, also started in ``post_fork`` — threads do not survive
``fork()``, so nothing may be started in the master.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional

bind = os.environ.get("WORKERMON_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("WORKERMON_GUNICORN_WORKERS", "2"))
worker_class = "gthread"
threads = 4
preload_app = True   # safe: nothing with threads exists before the fork

_agent: Optional["subprocess.Popen[bytes]"] = None


def on_starting(server: Any) -> None:
    global _agent
    if os.environ.get("WORKERMON_MODE", "agent") != "agent":
        return
    from workermon._protocol import default_socket_path

    sock = os.environ.setdefault("WORKERMON_AGENT_SOCKET", default_socket_path())
    # A child process, not a thread: the master forks the workers, and gRPC
    # (the etcd client) must not have run in a process that forks.
    _agent = subprocess.Popen([sys.executable, "-m", "workermon", "agent", "--socket", sock,
                               "--busy-threshold", os.environ.get("WORKERMON_BUSY_THRESHOLD", "0.9")])
    server.log.info("started workermon agent (pid %s) on %s", _agent.pid, sock)


def on_exit(server: Any) -> None:
    if _agent is not None and _agent.poll() is None:
        _agent.terminate()
        _agent.wait(10)


def post_fork(server: Any, worker: Any) -> None:
    from examples import wsgi_app

    wsgi_app.start_monitor()


def worker_exit(server: Any, worker: Any) -> None:
    from examples import wsgi_app

    wsgi_app.stop_monitor()
