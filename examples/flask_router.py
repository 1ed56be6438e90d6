"""A Flask router that picks the Dynamo worker for each request.

Dynamo's workers speak Dynamo's own request plane, not HTTP; the way in is the
1.6 frontend's direct mode (``python -m dynamo.frontend --router-mode direct``),
which runs a request on the worker named by the header ``x-worker-instance-id``
(its id in decimal) and ``x-dp-rank``.  So for each OpenAI request this
router:

1. ``monitor.reserve()``s a worker (and rank): p2c over the free workers, with
   credit for what it has just routed, so 64 threads do not herd onto one;
2. forwards the request to the frontend with those two headers;
3. releases the reservation when the response is closed — which the WSGI
   server does for every response, streamed or not, read to the end or not
   (HEAD, 204 and 304 included, whose bodies are never read);
4. on a 529 "Overloaded" from the frontend (it applies its threshold to the
   named worker too) calls ``reservation.overloaded()`` (released, and the
   worker held busy until its next load report, as the frontend does) and
   retries once on another worker (``exclude=``);
5. answers 503 with ``Retry-After`` when ``reserve()`` gives None, without
   sending anything to the frontend.

Run it:

    ETCD_ENDPOINTS=http://127.0.0.1:2379 WORKERMON_FRONTEND_URL=http://127.0.0.1:8000 \\
    python examples/flask_router.py --port 8080

For backends that are not Dynamo (each worker id has its own HTTP base URL), a
plain "worker URL" mode forwards straight to the worker instead:
``WORKERMON_WORKER_URLS='{"694d967ca5efd804": "http://10.0.0.5:8000"}'``.

Under gunicorn, see ``gunicorn.conf.py``: the monitor must start after fork.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from flask import Flask, Response, jsonify, request

from workermon import Reservation, WorkerMonitor

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
OVERLOADED = 529


def create_app(
    monitor: Any,
    frontend_url: Optional[str] = None,
    worker_url: Optional[Callable[[int], Optional[str]]] = None,
    upstream_timeout: float = 300.0,
) -> Flask:
    """Build the router around a started monitor (``WorkerMonitor`` or ``SharedMonitor``).

    Give ``frontend_url`` (Dynamo: the frontend in direct mode) or ``worker_url``
    (other backends: worker id → base URL).
    """
    if (frontend_url is None) == (worker_url is None):
        raise ValueError("give frontend_url (Dynamo) or worker_url (other backends), not both")
    app = Flask(__name__)
    app.config["forwarded"] = 0

    def unavailable(message: str) -> Response:
        resp = jsonify(error={"message": message, "type": "Service Unavailable", "code": 503})
        resp.status_code = 503
        resp.headers["Retry-After"] = "1"
        return resp

    def target_for(res: Reservation, path: str) -> Tuple[str, Dict[str, str]]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-worker-instance-id")}
        if frontend_url is not None:
            # Direct mode: the worker id in decimal (the lease id), and its rank.
            headers["x-worker-instance-id"] = str(res.worker_id)
            headers["x-dp-rank"] = str(res.dp_rank)
            base = frontend_url
        else:
            assert worker_url is not None
            base = worker_url(res.worker_id) or ""
        url = f"{base.rstrip('/')}/{path}"
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        return url, headers

    def open_upstream(res: Reservation, path: str, body: Optional[bytes]) -> Any:
        url, headers = target_for(res, path)
        req = urllib.request.Request(url, data=body, headers=headers, method=request.method)
        app.config["forwarded"] += 1
        try:
            return urllib.request.urlopen(req, timeout=upstream_timeout)
        except urllib.error.HTTPError as err:
            return err  # an HTTPError is a response too (status, headers, body)

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def route(path: str) -> Response:
        body = request.get_data() or None
        excluded: Tuple[int, ...] = ()
        for attempt in (1, 2):
            res = monitor.reserve(exclude=excluded)
            if res is None:
                busy = bool(monitor.busy_workers()) or attempt == 2
                return unavailable("All workers are busy, please retry later" if busy else "No workers are available")
            if worker_url is not None and not worker_url(res.worker_id):
                res.release()
                excluded += (res.worker_id,)
                continue
            try:
                up = open_upstream(res, path, body)
            except (urllib.error.URLError, OSError) as err:
                res.release()
                return Response(json.dumps({"error": f"worker {res.worker_id:x} unreachable: {err}"}), status=502,
                                mimetype="application/json")
            status = getattr(up, "status", None) or up.code
            if status == OVERLOADED:
                # The frontend holds the named worker over its threshold: remember it
                # as the frontend does, and try another one.
                up.close()
                res.overloaded()
                excluded += (res.worker_id,)
                if attempt == 1:
                    continue
                return unavailable("All workers are busy, please retry later")
            return relay(up, status, res)
        return unavailable("All workers are busy, please retry later")

    def relay(up: Any, status: int, res: Reservation) -> Response:
        def done() -> None:
            up.close()
            res.release()  # idempotent: whichever of the two below comes first

        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    line = up.readline()  # line by line: server-sent events arrive as they are sent
                    if not line:
                        return
                    yield line
            finally:
                done()

        out = Response(chunks(), status=status)
        # The WSGI server closes every response once it is done with it, even
        # one whose body it never reads (HEAD, 204, 304; the body generator
        # never starts then) or a client that went away mid-stream.
        out.call_on_close(done)
        for k, v in up.headers.items():
            if k.lower() not in HOP_BY_HOP:
                out.headers[k] = v
        out.headers["X-Workermon-Worker"] = f"{res.worker_id:x}"
        out.headers["X-Workermon-Rank"] = str(res.dp_rank)
        return out

    @app.get("/_workermon/health")
    def health() -> Response:
        h = monitor.health()
        return jsonify(ok=h.ok, members=h.members, busy=h.busy, etcd=h.etcd.state, nats=h.nats.state,
                       zmq=h.zmq.state, forwarded=app.config["forwarded"])

    return app


def url_map_from_env(text: Optional[str]) -> Callable[[int], Optional[str]]:
    mapping: Dict[int, str] = {int(k, 16): v.rstrip("/") for k, v in json.loads(text or "{}").items()}
    return mapping.get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--busy-threshold", type=float, default=0.9)
    args = parser.parse_args()
    monitor = WorkerMonitor(busy_threshold=args.busy_threshold, namespace=os.environ.get("DYN_NAMESPACE", "dynamo"))
    frontend = os.environ.get("WORKERMON_FRONTEND_URL")
    with monitor:
        monitor.wait_ready(10)
        if frontend:
            app = create_app(monitor, frontend_url=frontend)
        else:
            app = create_app(monitor, worker_url=url_map_from_env(os.environ.get("WORKERMON_WORKER_URLS")))
        app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
