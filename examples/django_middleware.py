"""Django middleware: 503 when every Dynamo worker is busy, else pick a free one.

Add it to ``MIDDLEWARE`` and configure the monitor in settings::

    MIDDLEWARE = ["examples.django_middleware.BusyWorkersMiddleware", ...]
    WORKERMON = {"etcd_endpoints": ["http://127.0.0.1:2379"],
                 "nats_servers": ["nats://127.0.0.1:4222"],
                 "namespace": "dynamo", "busy_threshold": 0.9}
    WORKERMON_EXEMPT_PATHS = ["/healthz"]        # optional

Views then read ``request.workermon_worker`` (the chosen worker id).  One
monitor is started per process on first use; under a pre-forking server
(gunicorn, uWSGI) that is after the fork, which is what threads need.
"""

from __future__ import annotations

import atexit
import itertools
import threading
from typing import Callable, Optional

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from workermon import WorkerMonitor

_lock = threading.Lock()
_monitor: Optional[WorkerMonitor] = None


def get_monitor() -> WorkerMonitor:
    """The process's monitor, created from ``settings.WORKERMON`` and started once."""
    global _monitor
    with _lock:
        if _monitor is None:
            mon = WorkerMonitor(**getattr(settings, "WORKERMON", {}))
            mon.start()
            mon.wait_ready(getattr(settings, "WORKERMON_READY_TIMEOUT", 5.0))
            atexit.register(mon.stop)
            _monitor = mon
        return _monitor


def reset_monitor() -> None:
    """Stop and forget the process's monitor (tests, settings changes)."""
    global _monitor
    with _lock:
        if _monitor is not None:
            _monitor.stop()
            _monitor = None


class BusyWorkersMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.exempt = tuple(getattr(settings, "WORKERMON_EXEMPT_PATHS", ()))
        self._turn = itertools.count()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(self.exempt) if self.exempt else False:
            return self.get_response(request)
        monitor = get_monitor()
        free = sorted(monitor.free_workers())
        if not free:
            message = ("All workers are busy, please retry later" if monitor.busy_workers()
                       else "No workers are available")
            resp = JsonResponse({"error": {"message": message, "type": "Service Unavailable", "code": 503}},
                                status=503)
            resp["Retry-After"] = "1"
            return resp
        request.workermon_worker = free[next(self._turn) % len(free)]  # type: ignore[attr-defined]
        return self.get_response(request)
