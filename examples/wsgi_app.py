"""A tiny WSGI app whose monitor is connected (or started) by gunicorn's post_fork.

With the host agent (``WORKERMON_MODE=agent``, the default of
``gunicorn.conf.py``) each process uses a ``SharedMonitor``; with
``WORKERMON_MODE=per-process`` its own ``WorkerMonitor``.  ``GET /`` reserves a
worker for the request (answering with its id, then releasing it) or answers
503 with Retry-After when none can take it; ``GET /workers`` shows the
process's view as JSON.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Iterable, List, Optional, Tuple

from workermon import SharedMonitor, WorkerMonitor

_monitor: Optional[Any] = None
_lock = threading.Lock()


def start_monitor() -> Any:
    """Connect (agent mode) or create and start this process's monitor (idempotent)."""
    global _monitor
    with _lock:
        if _monitor is None:
            mon: Any
            if os.environ.get("WORKERMON_MODE", "agent") == "agent":
                mon = SharedMonitor(os.environ.get("WORKERMON_AGENT_SOCKET"))
            else:
                mon = WorkerMonitor(
                    namespace=os.environ.get("DYN_NAMESPACE", "dynamo"),
                    busy_threshold=float(os.environ.get("WORKERMON_BUSY_THRESHOLD", "0.9")),
                )
            mon.start()
            mon.wait_ready(10)
            _monitor = mon
        return _monitor


def stop_monitor() -> None:
    global _monitor
    with _lock:
        if _monitor is not None:
            _monitor.stop()
            _monitor = None


def monitor() -> Any:
    return _monitor if _monitor is not None else start_monitor()


StartResponse = Callable[[str, List[Tuple[str, str]]], Any]


def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    mon = monitor()
    if environ.get("PATH_INFO") == "/workers":
        body = json.dumps({"pid": os.getpid(), "members": sorted(mon.members()),
                           "busy": sorted(mon.busy_workers())}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    reservation = mon.reserve()
    if reservation is None:
        start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
        return [b'{"error": "All workers are busy, please retry later"}']
    with reservation:  # a real app forwards the request here (see flask_router.py)
        body = json.dumps({"pid": os.getpid(), "worker": f"{reservation.worker_id:x}"}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
