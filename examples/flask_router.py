"""A Flask router that picks the Dynamo worker for each request — runs as it ships.

Dynamo's workers speak Dynamo's own request plane, not HTTP; the way in is the
frontend's direct mode (``python -m dynamo.frontend --router-mode direct``),
which runs a request on the worker named by the header ``x-worker-instance-id``
(its id in decimal) and ``x-dp-rank``.  For each OpenAI request this router:

1. sizes the request (its prompt's tokens, by the model's tokenizer when
   ``WORKERMON_TOKENIZER`` names it, else estimated) and ``reserve(blocks=…)``s
   a worker and rank for it: the booking counts in every router process on the
   host until the worker's next load report shows the request;
2. forwards the request to the frontend with those two headers, over a
   keep-alive connection, relaying the answer (streamed or not) as it arrives;
3. releases the reservation when the response is closed — which the WSGI
   server does for every response, streamed or not, read to the end or not;
4. on an overload answer from the frontend (529 from Dynamo 1.3 on; 503
   before) calls ``reservation.overloaded()`` (the worker is held busy until
   its next report, as the frontend does) and retries on another worker;
5. answers the overload status itself (``WORKERMON_OVERLOAD_STATUS``, default
   529 as Dynamo 1.6) with ``Retry-After`` when every worker is busy.

Run it under gunicorn (one host agent, many router processes; see
``gunicorn.conf.py``)::

    ETCD_ENDPOINTS=http://127.0.0.1:2379 WORKERMON_FRONTEND_URL=http://127.0.0.1:8000 \\
    gunicorn -c examples/gunicorn.conf.py

or alone, with its own monitor: ``python examples/flask_router.py --port 8080``.

Settings (environment; see :meth:`RouterSettings.from_env`):
``WORKERMON_FRONTEND_URL``, ``WORKERMON_STRATEGY`` (default: the agent's;
``kv``: KV mode, below),
``WORKERMON_OVERLOAD_STATUS``, ``WORKERMON_TOKENIZER`` (``tokenizer.json`` or
its directory), ``WORKERMON_BLOCK_SIZE`` (the fleet's KV block size, default
16), ``WORKERMON_SIZE_REQUESTS`` (``0``: book one block per request),
``WORKERMON_ATTEMPTS``, ``WORKERMON_UPSTREAM_TIMEOUT``.

KV mode (``WORKERMON_STRATEGY=kv``): each process follows every worker's KV
events (``WorkerMonitor(kv_index=True)``), tokenizes each prompt once with the
model's own tokenizer, ``reserve(strategy="kv", prompt=…)``s by cached prefix
and load as Dynamo's KV router does, and forwards the token ids it hashed as
``"nvext": {"token_data": …}``, so the worker runs exactly those tokens.

For backends that are not Dynamo (each worker id has its own HTTP base URL), a
plain "worker URL" mode forwards straight to the worker instead:
``WORKERMON_WORKER_URLS='{"694d967ca5efd804": "http://10.0.0.5:8000"}'``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request

from workermon import Reservation, SharedMonitor, WorkerMonitor, load_tokenizer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
OVERLOAD_STATUSES = (529, 503)  # Dynamo's overload answers: 529 from 1.3 on, 503 before
_REASONS = {503: "Service Unavailable", 529: "Service Overloaded"}


@dataclass(frozen=True)
class RouterSettings:
    """How the router forwards; every field has an environment variable (``from_env``)."""

    frontend_url: Optional[str] = None
    strategy: Optional[str] = None          # None: the monitor's default (the agent's, for SharedMonitor)
    overload_status: int = 529              # what the router answers when no worker can take a request
    block_size: int = 16                    # the fleet's kv_cache_block_size
    size_requests: bool = True              # reserve(blocks=prompt blocks); False: one block per request
    tokenizer: Optional[str] = None         # tokenizer.json (or its directory) to count prompt tokens
    attempts: int = 2                       # workers tried per request (each 529 moves on to another)
    upstream_timeout: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "RouterSettings":
        def get(name: str, default: str) -> str:
            return environ.get(name, "").strip() or default

        return cls(
            frontend_url=environ.get("WORKERMON_FRONTEND_URL") or None,
            strategy=environ.get("WORKERMON_STRATEGY") or None,
            overload_status=int(get("WORKERMON_OVERLOAD_STATUS", "529")),
            block_size=int(get("WORKERMON_BLOCK_SIZE", "16")),
            size_requests=get("WORKERMON_SIZE_REQUESTS", "1") not in ("0", "false", "no", "off"),
            tokenizer=environ.get("WORKERMON_TOKENIZER") or None,
            attempts=int(get("WORKERMON_ATTEMPTS", "2")),
            upstream_timeout=float(get("WORKERMON_UPSTREAM_TIMEOUT", "300")),
        )

    def __post_init__(self) -> None:
        if self.overload_status not in range(400, 600):
            raise ValueError(f"overload_status must be an HTTP error status, got {self.overload_status}")
        if self.block_size < 1 or self.attempts < 1 or not self.upstream_timeout > 0:
            raise ValueError("block_size and attempts must be >= 1, upstream_timeout > 0")


class PromptSizer:
    """How many KV blocks a request's prompt takes: its tokens over the block size.

    With a tokenizer (HF ``tokenizers``; ``WORKERMON_TOKENIZER``) the count is
    the model's own, before the chat template's few tokens; without one it is
    estimated as UTF-8 bytes / 4 (English text with a BPE vocabulary).
    Token ids given in the request (``prompt`` as ids, ``nvext.token_data``)
    are counted as they are.
    """

    def __init__(self, block_size: int, tokenizer: Optional[str] = None) -> None:
        self.block_size = block_size
        self._path = tokenizer
        self._tok: Any = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        if self._path is None:
            return None
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    self._tok = load_tokenizer(self._path)  # pip install 'workermon[kv]'
        return self._tok

    def tokens(self, body: Any) -> int:
        if not isinstance(body, dict):
            return 0
        nvext = body.get("nvext")
        if isinstance(nvext, dict) and isinstance(nvext.get("token_data"), list):
            return len(nvext["token_data"])
        texts = []
        ids = 0
        messages = body.get("messages")
        if isinstance(messages, list):
            for m in messages:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            texts.append(prompt)
        elif isinstance(prompt, list):
            for p in prompt:
                if isinstance(p, int):
                    ids += 1
                elif isinstance(p, str):
                    texts.append(p)
                elif isinstance(p, list):
                    ids += len(p)
        tok = self._tokenizer()
        if tok is not None:
            return ids + sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)) if texts else ids
        return ids + sum(len(t.encode("utf-8", "replace")) for t in texts) // 4

    def blocks(self, body: Any) -> int:
        """The prompt's blocks (at least 1: a request always takes a block)."""
        return max(1, math.ceil(self.tokens(body) / self.block_size))


class Upstream:
    """Keep-alive HTTP connections to the frontend (or workers), one per thread per base URL."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def request(self, base: str, method: str, path: str, body: Optional[bytes],
                headers: Dict[str, str]) -> Tuple[http.client.HTTPResponse, Callable[[bool], None]]:
        """Send one request; returns the response and ``done(reusable)`` to call once it is finished with."""
        pool: Dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        parts = urlsplit(base)
        target = parts.path.rstrip("/") + "/" + path.lstrip("/")
        for fresh in (False, True):
            conn = None if fresh else pool.pop(base, None)
            reused = conn is not None
            if conn is None:
                cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=self.timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if reused:
                    continue  # the server closed an idle keep-alive connection: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise

            def done(reusable: bool, conn: http.client.HTTPConnection = conn,
                     resp: http.client.HTTPResponse = resp) -> None:
                if reusable and not resp.will_close and base not in pool:
                    pool[base] = conn
                else:
                    conn.close()

            return resp, done
        raise AssertionError("unreachable")


def create_app(
    monitor: Any = None,
    frontend_url: Optional[str] = None,
    worker_url: Optional[Callable[[int], Optional[str]]] = None,
    upstream_timeout: Optional[float] = None,
    *,
    settings: Optional[RouterSettings] = None,
) -> Flask:
    """Build the router.  With no arguments everything comes from the environment.

    ``monitor``: a started ``WorkerMonitor`` or ``SharedMonitor``; None
    connects a ``SharedMonitor`` to the host agent on first use in each
    process (so the app can be built before gunicorn forks: ``preload_app``).
    Give ``frontend_url`` (Dynamo: the frontend in direct mode; default
    ``$WORKERMON_FRONTEND_URL``) or ``worker_url`` (other backends: worker id →
    base URL).
    """
    settings = settings or RouterSettings.from_env()
    frontend_url = frontend_url or (settings.frontend_url if worker_url is None else None)
    if (frontend_url is None) == (worker_url is None):
        raise ValueError("give frontend_url (Dynamo; $WORKERMON_FRONTEND_URL) or worker_url (other backends), "
                         "not both")
    timeout = upstream_timeout if upstream_timeout is not None else settings.upstream_timeout
    app = Flask(__name__)
    app.config["forwarded"] = 0
    sizer = PromptSizer(settings.block_size, settings.tokenizer)
    upstream = Upstream(timeout)
    holder = _MonitorHolder(monitor)
    app.extensions["workermon"] = holder
    overload_status = settings.overload_status

    def refuse(message: str) -> Response:
        resp = jsonify(error={"message": message, "type": _REASONS.get(overload_status, "Unavailable"),
                              "code": overload_status})
        resp.status = f"{overload_status} {_REASONS.get(overload_status, 'Unavailable')}"
        resp.headers["Retry-After"] = "1"
        return resp

    def forward_headers(res: Reservation) -> Tuple[str, Dict[str, str]]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and not k.lower().startswith(("x-worker-instance-id",
                                                                                "x-dynamo-worker-instance-id",
                                                                                "x-dp-rank"))}
        if frontend_url is not None:
            # Direct mode: the worker id in decimal (the lease id), and its rank.
            headers["x-worker-instance-id"] = str(res.worker_id)
            headers["x-dp-rank"] = str(res.dp_rank)
            return frontend_url, headers
        assert worker_url is not None
        return worker_url(res.worker_id) or "", headers

    def size_of(body: Optional[bytes]) -> Optional[int]:
        if not settings.size_requests or not body or request.method != "POST":
            return None
        try:
            return sizer.blocks(json.loads(body))
        except ValueError:
            return None  # not JSON: the frontend will say what is wrong with it

    kv_mode = settings.strategy == "kv"

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def route(path: str) -> Response:
        mon = holder.get()
        body = request.get_data() or None
        blocks = None if kv_mode else size_of(body)  # KV mode counts the prompt's tokens itself
        if request.query_string:
            path += "?" + request.query_string.decode("latin-1")
        excluded: Tuple[int, ...] = ()
        for attempt in range(1, settings.attempts + 1):
            if kv_mode and request.method == "POST":
                res, body = mon.reserve_kv_request(body or b"", exclude=excluded)
            else:
                res = mon.reserve(strategy=None if kv_mode else settings.strategy, exclude=excluded, blocks=blocks)
            if res is None:
                if not mon.members():
                    return refuse("No workers are available")
                return refuse("All workers are busy, please retry later")
            base, headers = forward_headers(res)
            if not base:
                res.release()
                excluded += (res.worker_id,)
                continue
            try:
                up, done = upstream.request(base, request.method, path, body, headers)
            except (OSError, http.client.HTTPException) as err:
                res.release()
                return Response(json.dumps({"error": f"worker {res.worker_id:x} unreachable: {err}"}), status=502,
                                mimetype="application/json")
            app.config["forwarded"] += 1
            if up.status in OVERLOAD_STATUSES:
                # The frontend holds the named worker over its threshold: remember
                # it as the frontend does, and try another one.
                up.read()
                done(True)
                res.overloaded()
                excluded += (res.worker_id,)
                continue
            return relay(up, done, res)
        return refuse("All workers are busy, please retry later")

    def relay(up: http.client.HTTPResponse, done: Callable[[bool], None], res: Reservation) -> Response:
        finished = [False]

        def close() -> None:
            if not finished[0]:
                finished[0] = True
                done(False)  # not read to the end: the connection cannot be reused
            res.release()    # idempotent: whichever comes first

        length = up.getheader("Content-Length")
        streamed = length is None or "event-stream" in (up.getheader("Content-Type") or "")
        if not streamed:
            data = up.read()
            finished[0] = True
            done(True)
            res.release()  # the whole answer is here: the worker is done with it
            out = Response(data, status=up.status)
        else:
            def chunks() -> Iterator[bytes]:
                try:
                    while True:
                        data = up.read1(65536)  # what has arrived: server-sent events pass as they come
                        if not data:
                            finished[0] = True
                            done(True)
                            return
                        yield data
                finally:
                    close()

            out = Response(chunks(), status=up.status)
        # The WSGI server closes every response once it is done with it, even
        # one whose body it never reads (HEAD, 204, 304) or a client that went away.
        out.call_on_close(close)
        for k, v in up.getheaders():
            if k.lower() not in HOP_BY_HOP:
                out.headers[k] = v
        out.headers["X-Workermon-Worker"] = f"{res.worker_id:x}"
        out.headers["X-Workermon-Rank"] = str(res.dp_rank)
        return out

    @app.get("/_workermon/health")
    def health() -> Response:
        mon = holder.get()
        h = mon.health()
        # A plane not required (e.g. NATS tried as a best effort beside a ZMQ fleet) says so.
        planes = {name: getattr(h, name).state + ("" if name in h.required else " (not required)")
                  for name in ("etcd", "nats", "zmq")}
        return jsonify(ok=h.ok, members=h.members, busy=h.busy, required=list(h.required), **planes,
                       strategy=getattr(mon, "strategy", None), forwarded=app.config["forwarded"])

    return app


class _MonitorHolder:
    """The app's monitor: the one given, else one connected on first use in this process.

    That is a ``SharedMonitor`` on the host agent, or with
    ``WORKERMON_MODE=per-process`` a ``WorkerMonitor`` of its own.
    """

    def __init__(self, monitor: Any) -> None:
        self._given = monitor
        self._own: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._given is not None:
            return self._given
        own = self._own
        if own is not None and self._pid == os.getpid():
            return own
        with self._lock:
            if self._own is None or self._pid != os.getpid():
                # After fork a parent's connection is not ours: connect anew (never start threads before fork).
                mon: Any
                kv = os.environ.get("WORKERMON_STRATEGY") == "kv"
                if os.environ.get("WORKERMON_MODE", "agent") == "per-process" or kv:
                    # KV mode follows every worker's KV events in this process (the agent shares no index).
                    mon = WorkerMonitor(namespace=os.environ.get("DYN_NAMESPACE", "dynamo"),
                                        busy_threshold=float(os.environ.get("WORKERMON_BUSY_THRESHOLD", "0.9")),
                                        strategy="p2c" if kv else os.environ.get("WORKERMON_STRATEGY") or "p2c",
                                        overflow=os.environ.get("WORKERMON_OVERFLOW") or "steer", kv_index=kv)
                else:
                    mon = SharedMonitor()
                mon.start()
                mon.wait_ready(10)
                self._own, self._pid = mon, os.getpid()
            return self._own

    def close(self) -> None:
        with self._lock:
            if self._own is not None and self._pid == os.getpid():
                self._own.stop()
            self._own = None


def url_map_from_env(text: Optional[str]) -> Callable[[int], Optional[str]]:
    mapping: Dict[int, str] = {int(k, 16): v.rstrip("/") for k, v in json.loads(text or "{}").items()}
    return mapping.get


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--busy-threshold", type=float,
                        default=float(os.environ.get("WORKERMON_BUSY_THRESHOLD", "0.9")))
    args = parser.parse_args()
    settings = RouterSettings.from_env()
    kv = settings.strategy == "kv"
    monitor = WorkerMonitor(busy_threshold=args.busy_threshold, namespace=os.environ.get("DYN_NAMESPACE", "dynamo"),
                            strategy="p2c" if kv else settings.strategy or "p2c",  # type: ignore[arg-type]
                            kv_index=kv)
    with monitor:
        monitor.wait_ready(10)
        if settings.frontend_url:
            app = create_app(monitor, settings=settings)
        else:
            app = create_app(monitor, worker_url=url_map_from_env(os.environ.get("WORKERMON_WORKER_URLS")),
                             settings=settings)
        app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
