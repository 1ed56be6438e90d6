"""The WSGI app of bench.host: one reserve()/release() per request (or none, WORKERMON_MODE=none)."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, List, Optional, Tuple

_monitor: Optional[Any] = None
_lock = threading.Lock()
MODE = os.environ.get("WORKERMON_MODE", "agent")


def _get() -> Any:
    global _monitor
    with _lock:
        if _monitor is None:
            from workermon import SharedMonitor, WorkerMonitor

            mon: Any = (SharedMonitor(os.environ["WORKERMON_AGENT_SOCKET"]) if MODE == "agent"
                        else WorkerMonitor(namespace=os.environ["DYN_NAMESPACE"]))
            mon.start()
            mon.wait_ready(30)
            _monitor = mon
        return _monitor


def app(environ: dict, start_response: Callable[[str, List[Tuple[str, str]]], Any]) -> Iterable[bytes]:
    if MODE == "none":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"7"]
    mon = _get()
    if environ.get("PATH_INFO") == "/ready":
        ok = mon.wait_ready(0) and len(mon.members()) == 200
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b""]
    r = mon.reserve()
    if r is None:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"busy"]
    with r:
        body = b"%x" % r.worker_id
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
