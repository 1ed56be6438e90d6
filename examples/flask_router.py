"""A Flask reverse proxy that sends each request to a free Dynamo worker.

Like Dynamo's own frontend with ``--busy-threshold``, it answers HTTP 503
"All workers are busy, please retry later" (with ``Retry-After``) when every
worker is busy, and otherwise forwards the request to a free worker, round
robin.  ``busy_workers()``/``free_workers()`` are lock-free reads of an
immutable snapshot, so calling them on every request costs well under a
microsecond.

Run it (worker URLs come from a JSON map of worker id in hex → base URL):

    WORKERMON_WORKER_URLS='{"694d967ca5efd804": "http://10.0.0.5:8000"}' \\
    ETCD_ENDPOINTS=http://127.0.0.1:2379 NATS_SERVER=nats://127.0.0.1:4222 \\
    python examples/flask_router.py --port 8080

Under gunicorn, see ``gunicorn.conf.py``: the monitor must start after fork.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional

from flask import Flask, Response, jsonify, request

from workermon import WorkerMonitor

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def create_app(monitor: WorkerMonitor, worker_url: Callable[[int], Optional[str]],
               upstream_timeout: float = 300.0) -> Flask:
    """Build the proxy around a started monitor and a worker-id → base-URL resolver."""
    app = Flask(__name__)
    turn = itertools.count()

    def unavailable(message: str) -> Response:
        resp = jsonify(error={"message": message, "type": "Service Unavailable", "code": 503})
        resp.status_code = 503
        resp.headers["Retry-After"] = "1"
        return resp

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def proxy(path: str) -> Response:
        free = [w for w in sorted(monitor.free_workers()) if worker_url(w)]
        if not free:
            if monitor.busy_workers():
                return unavailable("All workers are busy, please retry later")
            return unavailable("No workers are available")
        wid = free[next(turn) % len(free)]
        target = f"{worker_url(wid)}/{path}"
        if request.query_string:
            target += "?" + request.query_string.decode("latin-1")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Workermon-Worker"] = f"{wid:x}"
        upstream = urllib.request.Request(target, data=request.get_data() or None, headers=headers,
                                          method=request.method)
        try:
            with urllib.request.urlopen(upstream, timeout=upstream_timeout) as up:
                body, status, up_headers = up.read(), up.status, up.headers
        except urllib.error.HTTPError as err:
            body, status, up_headers = err.read(), err.code, err.headers
        except (urllib.error.URLError, OSError) as err:
            return Response(json.dumps({"error": f"worker {wid:x} unreachable: {err}"}), status=502,
                            mimetype="application/json")
        out = Response(body, status=status)
        for k, v in up_headers.items():
            if k.lower() not in HOP_BY_HOP:
                out.headers[k] = v
        out.headers["X-Workermon-Worker"] = f"{wid:x}"
        return out

    @app.get("/_workermon/health")
    def health() -> Response:
        h = monitor.health()
        return jsonify(ok=h.ok, members=h.members, busy=h.busy, etcd=h.etcd.state, nats=h.nats.state)

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
    with monitor:
        monitor.wait_ready(10)
        app = create_app(monitor, url_map_from_env(os.environ.get("WORKERMON_WORKER_URLS")))
        app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
