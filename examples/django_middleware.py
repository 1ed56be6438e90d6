"""Django middleware: reserve a Dynamo worker per request, 529 (as Dynamo 1.3+) when none can take it.

Add it to ``MIDDLEWARE`` and configure the monitor in settings::

    MIDDLEWARE = ["examples.django_middleware.BusyWorkersMiddleware", ...]
    WORKERMON = {"etcd_endpoints": ["http://127.0.0.1:2379"],
                 "nats_servers": ["nats://127.0.0.1:4222"],
                 "namespace": "dynamo", "busy_threshold": 0.9}
    WORKERMON_EXEMPT_PATHS = ["/healthz"]        # optional
    WORKERMON_OVERLOAD_STATUS = 529              # optional: 503 for clients of Dynamo before 1.3
    WORKERMON_STRATEGY = "kv"                    # optional: by cached prefix (WORKERMON["kv_index"] = True)

Views then read ``request.workermon_worker`` (the chosen worker id) and
``request.workermon_reservation``; with ``WORKERMON_FRONTEND_URL`` the
middleware forwards ``/v1/…`` to a Dynamo frontend in direct mode.  One
monitor is started per process on first use; under a pre-forking server
(gunicorn, uWSGI) that is after the fork, which is what threads need.
"""

from __future__ import annotations

import atexit
import threading
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional, Tuple

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from workermon import Reservation, WorkerMonitor

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
    """Reserve a worker for each request; 503 with ``Retry-After`` when none can take it.

    Views read ``request.workermon_reservation`` (worker id, ``dp_rank``) and
    ``request.workermon_worker``; for Dynamo, ``dynamo_headers(request)`` gives
    the frontend's direct-mode headers.  With ``WORKERMON_FRONTEND_URL`` set,
    requests under ``WORKERMON_FORWARD_PREFIX`` (default ``/v1/``) are
    forwarded to that frontend here, as the Flask example does: on a 529 from
    the frontend the reservation is marked ``overloaded()`` (released, the
    worker held busy as the frontend does) and the request is retried once on
    another worker.  The reservation is released when the server closes the
    response, which it does for every response (streamed or not, HEAD included).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.exempt = tuple(getattr(settings, "WORKERMON_EXEMPT_PATHS", ()))
        self.frontend = getattr(settings, "WORKERMON_FRONTEND_URL", None)
        self.prefix = getattr(settings, "WORKERMON_FORWARD_PREFIX", "/v1/")
        self.status = int(getattr(settings, "WORKERMON_OVERLOAD_STATUS", 529))  # Dynamo 1.3+; 503 before
        # "kv": pick by cached prefix (settings.WORKERMON needs "kv_index": True) and forward the token ids.
        self.kv = getattr(settings, "WORKERMON_STRATEGY", None) == "kv"

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(self.exempt) if self.exempt else False:
            return self.get_response(request)
        monitor = get_monitor()
        excluded: Tuple[int, ...] = ()
        forwarding = bool(self.frontend) and request.path.startswith(self.prefix)
        body = request.body if forwarding else b""
        for attempt in (1, 2):
            if self.kv and forwarding and request.method == "POST":
                res, body = monitor.reserve_kv_request(request.body, exclude=excluded)
            else:
                res = monitor.reserve(exclude=excluded)
            if res is None:
                return _unavailable(monitor, self.status)
            request.workermon_reservation = res  # type: ignore[attr-defined]
            request.workermon_worker = res.worker_id  # type: ignore[attr-defined]
            try:
                if forwarding:
                    response = self._forward(request, res, body)
                    if response.status_code in OVERLOAD_STATUSES:
                        response.close()
                        res.overloaded()
                        excluded += (res.worker_id,)
                        if attempt == 1:
                            continue
                        return _unavailable(monitor, self.status)
                else:
                    response = self.get_response(request)
            except BaseException:
                res.release()
                raise
            return _release_when_done(response, res)
        return _unavailable(monitor, self.status)

    def _forward(self, request: HttpRequest, res: Reservation, body: bytes) -> HttpResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.update(dynamo_headers(request))
        url = f"{str(self.frontend).rstrip('/')}{request.get_full_path()}"
        req = urllib.request.Request(url, data=body or None, headers=headers, method=request.method)
        try:
            up = urllib.request.urlopen(req, timeout=300)
        except urllib.error.HTTPError as err:
            up = err
        status = getattr(up, "status", None) or up.code
        out = StreamingHttpResponse(iter(lambda: up.read1(65536), b""), status=status,
                                    content_type=up.headers.get("Content-Type", "application/json"))
        out["X-Workermon-Worker"] = f"{res.worker_id:x}"
        out._resource_closers.append(up.close)  # closed with the response
        return out


OVERLOAD_STATUSES = (529, 503)  # the frontend's overload answers: 529 from Dynamo 1.3 on, 503 before
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


def dynamo_headers(request: HttpRequest) -> Dict[str, str]:
    """The 1.6 frontend's direct-mode headers for the reserved worker (id in decimal, rank)."""
    res = request.workermon_reservation  # type: ignore[attr-defined]
    return {"x-worker-instance-id": str(res.worker_id), "x-dp-rank": str(res.dp_rank)}


def _unavailable(monitor: WorkerMonitor, status: int) -> HttpResponse:
    message = "All workers are busy, please retry later" if monitor.members() else "No workers are available"
    resp = JsonResponse({"error": {"message": message, "type": "Service Overloaded", "code": status}}, status=status)
    resp.reason_phrase = "Service Overloaded" if status == 529 else resp.reason_phrase
    resp["Retry-After"] = "1"
    return resp


def _release_when_done(response: HttpResponse, res: Reservation) -> HttpResponse:
    if getattr(response, "streaming", False):
        # The server closes every response when it is done with it — after the
        # last chunk, when the client went away, or without reading it at all
        # (HEAD replaces a streamed body): the booking ends there.
        response._resource_closers.append(res.release)  # type: ignore[attr-defined]
    else:
        res.release()
    return response
