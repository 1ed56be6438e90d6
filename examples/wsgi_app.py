"""A tiny WSGI app whose per-process monitor is started by gunicorn's post_fork.

``GET /`` answers 503 with Retry-After when every worker is busy, else names
a free worker; ``GET /workers`` shows the process's view as JSON.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Iterable, List, Optional, Tuple

from workermon import WorkerMonitor

_monitor: Optional[WorkerMonitor] = None
_lock = threading.Lock()


def start_monitor() -> WorkerMonitor:
    """Create and start this process's monitor from the environment (idempotent)."""
    global _monitor
    with _lock:
        if _monitor is None:
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


def monitor() -> WorkerMonitor:
    return _monitor if _monitor is not None else start_monitor()


StartResponse = Callable[[str, List[Tuple[str, str]]], Any]


def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    mon = monitor()
    if environ.get("PATH_INFO") == "/workers":
        body = json.dumps({"pid": os.getpid(), "members": sorted(mon.members()),
                           "busy": sorted(mon.busy_workers())}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    free = sorted(mon.free_workers())
    if not free:
        start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
        return [b'{"error": "All workers are busy, please retry later"}']
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"pid": os.getpid(), "worker": f"{free[0]:x}"}).encode()]
