"""gunicorn configuration: the Flask router in front of a Dynamo frontend, as it ships.

    ETCD_ENDPOINTS=http://127.0.0.1:2379 WORKERMON_FRONTEND_URL=http://127.0.0.1:8000 \\
    gunicorn -c examples/gunicorn.conf.py

(from the repository root).  The master starts one ``workermon agent`` as a
child process (``on_starting``) — one etcd watch, one event-plane subscription
and one decode of each load report for the whole host — and stops it on exit.
Every router process connects a ``SharedMonitor`` on its first request (never
before the fork): reads are lock-free in the process, and ``reserve()`` books
host-wide, so the processes do not herd.

Settings by environment (defaults in brackets):

- ``WORKERMON_BIND`` [127.0.0.1:8080], ``WORKERMON_GUNICORN_WORKERS`` [CPUs, at
  least 2; 1 in KV mode], ``WORKERMON_GUNICORN_THREADS`` [32; 64 in KV mode];
- ``WORKERMON_FRONTEND_URL``; ``WORKERMON_STRATEGY`` [p2c; ``kv``: pick by
  cached prefix, a ``WorkerMonitor(kv_index=True)`` per process, no agent];
  ``WORKERMON_OVERFLOW`` [steer]; ``WORKERMON_BUSY_THRESHOLD`` [0.9: use the
  frontend's ``--busy-threshold``]; ``WORKERMON_OVERLOAD_STATUS`` [529];
  ``WORKERMON_TOKENIZER``, ``WORKERMON_BLOCK_SIZE`` [16] (request sizing, see
  ``flask_router.py``);
- Dynamo's own: ``ETCD_ENDPOINTS``, ``DYN_NAMESPACE``, ``DYN_EVENT_PLANE``
  (``zmq`` for a 1.6 fleet without NATS: NATS is then never tried),
  ``NATS_SERVER``.

Sizing: one thread carries one request for its whole life, streamed answers
included, so ``workers × threads`` must exceed the streams in flight at peak:
arrival rate × mean request time (TTFT + output tokens × inter-token time),
with room for bursts — 2 × the mean.  7 req/s of 150-token streams lasting
~3 s needs ~21 on average, ~42 in bursts: 2 × 32 = 64 leaves room.  A thread
that waits on the frontend holds no CPU; the CPU cost is ~1–2 ms per request
(measured by ``python -m bench e2e``), so a process per core is enough.

``WORKERMON_APP=wsgi_app`` serves the small demo app (``examples.wsgi_app``)
instead; ``WORKERMON_MODE=per-process`` gives each process its own
``WorkerMonitor`` (started in ``post_fork``) and no agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Optional

bind = os.environ.get("WORKERMON_BIND", "127.0.0.1:8080")
# KV mode keeps its index and its bookings per process, so one process (with more threads) sees every
# request it routed; several would each count only their own and pile onto the same cached worker.
_kv = os.environ.get("WORKERMON_STRATEGY") == "kv"
workers = int(os.environ.get("WORKERMON_GUNICORN_WORKERS", "0")) or (1 if _kv else max(2, os.cpu_count() or 2))
worker_class = "gthread"
threads = int(os.environ.get("WORKERMON_GUNICORN_THREADS", "0")) or (64 if _kv else 32)
# Streams last as long as the model writes; the router itself never waits longer than its upstream timeout.
timeout = 0 if os.environ.get("WORKERMON_GUNICORN_TIMEOUT") == "0" else int(os.environ.get(
    "WORKERMON_GUNICORN_TIMEOUT", "330"))
keepalive = 5
preload_app = True            # safe: the app connects its monitor on first use, after the fork
control_socket_disable = True  # gunicorn 27+: no control socket under ~/.gunicorn
wsgi_app = ("examples.wsgi_app:app" if os.environ.get("WORKERMON_APP") == "wsgi_app"
            else "examples.flask_router:create_app()")

_agent: Optional["subprocess.Popen[bytes]"] = None


def on_starting(server: Any) -> None:
    global _agent
    if os.environ.get("WORKERMON_MODE", "agent") != "agent" or os.environ.get("WORKERMON_STRATEGY") == "kv":
        return  # per-process monitors (KV mode follows the KV events in each process)
    from workermon._protocol import default_socket_path

    sock = os.environ.setdefault("WORKERMON_AGENT_SOCKET", default_socket_path())
    # A child process, not a thread: the master forks the workers, and gRPC
    # (the etcd client) must not have run in a process that forks.
    cmd = [sys.executable, "-m", "workermon", "agent", "--socket", sock,
           "--busy-threshold", os.environ.get("WORKERMON_BUSY_THRESHOLD", "0.9"),
           "--strategy", os.environ.get("WORKERMON_STRATEGY", "p2c"),
           "--overflow", os.environ.get("WORKERMON_OVERFLOW", "steer")]
    plane = os.environ.get("DYN_EVENT_PLANE", "").strip().lower()
    if plane in ("nats", "zmq"):
        cmd += ["--event-plane", plane]
    _agent = subprocess.Popen(cmd)
    # Bounded: the routers connect on their first request and keep retrying.
    deadline = time.monotonic() + 10
    while not os.path.exists(sock) and time.monotonic() < deadline and _agent.poll() is None:
        time.sleep(0.05)
    server.log.info("started workermon agent (pid %s) on %s", _agent.pid, sock)


def on_exit(server: Any) -> None:
    if _agent is not None and _agent.poll() is None:
        _agent.terminate()
        try:
            _agent.wait(10)
        except subprocess.TimeoutExpired:  # a hung agent: do not leave it behind
            _agent.kill()
            _agent.wait(5)


def _demo_app(server: Any) -> bool:
    return "wsgi_app" in str(getattr(server.app, "app_uri", "") or "") or os.environ.get("WORKERMON_APP") == "wsgi_app"


def post_fork(server: Any, worker: Any) -> None:
    if _demo_app(server):
        from examples import wsgi_app

        wsgi_app.start_monitor()


def post_worker_init(worker: Any) -> None:
    # Connect (or start) this process's monitor now, after the fork, so that no
    # request waits for it (a per-process KV index starts listing at once too).
    holder = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("workermon")
    if holder is not None:
        try:
            holder.get()
        except Exception:  # noqa: BLE001 - the first request retries and reports it
            worker.log.exception("workermon: could not connect this process's monitor yet")


def worker_exit(server: Any, worker: Any) -> None:
    if _demo_app(server):
        from examples import wsgi_app

        wsgi_app.stop_monitor()
    else:
        app = getattr(worker, "wsgi", None)
        holder = getattr(app, "extensions", {}).get("workermon") if app is not None else None
        if holder is not None:
            holder.close()
