"""The ``workermon`` command: ``watch`` a real fleet, or run a local ``demo``.

User mistakes (unreachable servers, malformed URLs, thresholds out of range,
missing server binaries) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
from typing import Any, Dict, List, NoReturn, Optional, Sequence, TextIO, Tuple

from . import __version__
from ._model import BusyChange, WorkerLoadState
from ._picker import OVERFLOW, STRATEGIES
from ._monitor import FROM_ENV, WorkerMonitor
from .options import TLS, EtcdOptions, NatsOptions

log = logging.getLogger("workermon.cli")

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


# --- rendering -----------------------------------------------------------------------------


def render_table(states: Dict[int, WorkerLoadState], busy_threshold: Optional[float], width: int = 100) -> str:
    header = f"{'WORKER':<18} {'KV TOTAL':>9} {'ACTIVE (per rank)':<22} {'UTIL':>6} {'BUSY':<4} {'LAST':>7}"
    lines = [header, "-" * min(width, len(header))]
    for wid in sorted(states):
        st = states[wid]
        total = "?" if st.kv_total_blocks is None else str(st.kv_total_blocks)
        ranks = ",".join(f"{r}:{v}" for r, v in sorted(st.kv_active_blocks.items())) or "-"
        util = st.utilization
        util_s = "-" if util is None else f"{util * 100:5.1f}%"
        age = "-" if st.last_report_age is None else f"{st.last_report_age:6.1f}s"
        lines.append(f"{wid:<18x} {total:>9} {ranks:<22.22} {util_s:>6} {'YES' if st.busy else 'no':<4} {age:>7}")
    busy = sum(1 for s in states.values() if s.busy)
    rule = "KV rule off" if busy_threshold is None else f"threshold {busy_threshold:g}"
    lines.append(f"{len(states)} workers, {busy} busy ({rule})")
    return "\n".join(lines)


def change_line(change: BusyChange) -> str:
    def ids(s: frozenset[int]) -> str:
        return ",".join(f"{w:x}" for w in sorted(s)) or "-"

    parts = [f"v{change.version}", f"busy={len(change.busy)}"]
    if change.became_busy:
        parts.append(f"+busy {ids(change.became_busy)}")
    if change.became_free:
        parts.append(f"-free {ids(change.became_free)}")
    if change.removed:
        parts.append(f"gone {ids(change.removed)}")
    return time.strftime("%H:%M:%S ") + " ".join(parts)


def change_json(change: BusyChange) -> str:
    return json.dumps(
        {
            "version": change.version,
            "time": time.time(),
            "busy": sorted(change.busy),
            "became_busy": sorted(change.became_busy),
            "became_free": sorted(change.became_free),
            "removed": sorted(change.removed),
        }
    )


class View:
    """Prints what a running monitor sees: a refreshing table and change lines."""

    def __init__(self, mon: WorkerMonitor, out: TextIO, as_json: bool, plain: bool, interval: float,
                 why: Optional[int] = None) -> None:
        self.mon = mon
        self.why = why
        self.out = out
        self.as_json = as_json
        self.live = not plain and not as_json and out.isatty()
        self.interval = interval
        self.changes: "queue.Queue[BusyChange]" = queue.Queue()
        self.recent: List[str] = []
        self.counts = {"became_busy": 0, "became_free": 0, "removed": 0}

    def attach(self) -> None:
        self.mon.on_busy_change(self.changes.put)

    def run(self, until: Optional[float], stopping: threading.Event) -> None:
        next_draw = 0.0
        while not stopping.is_set():
            now = time.monotonic()
            if until is not None and now >= until:
                break
            timeout = max(0.0, min(next_draw - now, (until - now) if until else 3600))
            try:
                change = self.changes.get(timeout=timeout)
                self._show_change(change)
                continue
            except queue.Empty:
                pass
            if time.monotonic() >= next_draw:
                if not self.as_json:
                    self._draw()
                next_draw = time.monotonic() + self.interval
        while True:
            try:
                self._show_change(self.changes.get_nowait())
            except queue.Empty:
                break

    def _show_change(self, change: BusyChange) -> None:
        for k in self.counts:
            self.counts[k] += len(getattr(change, k))
        if self.as_json:
            print(change_json(change), file=self.out, flush=True)
            return
        line = change_line(change)
        if self.live:
            self.recent = (self.recent + [line])[-10:]
        else:
            print(line, file=self.out, flush=True)

    def _draw(self) -> None:
        table = render_table(self.mon.load_states(), self.mon.thresholds.busy_threshold)
        if self.why is not None:
            table += "\n\n" + str(self.mon.why(self.why))
        if self.live:
            self.out.write("\x1b[H\x1b[2J")
            h = self.mon.health()
            self.out.write(f"workermon {__version__} — etcd {h.etcd.state}, nats {h.nats.state}  (Ctrl-C to quit)\n\n")
            self.out.write(table + "\n\nrecent changes:\n" + ("\n".join(self.recent) or "  none yet") + "\n")
            self.out.flush()
        else:
            print(table, file=self.out, flush=True)


# --- commands ------------------------------------------------------------------------------


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _worker_id(text: str) -> int:
    t = text.strip().lower()
    try:
        value = int(t, 10) if t.isdigit() and len(t) > 16 else int(t[2:] if t.startswith("0x") else t, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a worker id (hex or decimal): {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"not a 64-bit worker id: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--busy-threshold", type=_threshold, default=0.9, metavar="F",
                   help="busy when active KV blocks > F × total (Dynamo's --busy-threshold; default 0.9)")
    p.add_argument("--json", action="store_true", help="print one JSON object per busy-set change, nothing else")
    p.add_argument("--plain", action="store_true", help="no screen refresh: print the table every --interval")
    p.add_argument("--interval", type=_positive, default=None, metavar="S",
                   help="table refresh period (default 1 s live, 5 s plain)")
    p.add_argument("--duration", type=_positive, default=None, metavar="S", help="exit after S seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="log warnings and reconnects to stderr")


def _unready_reason(mon: WorkerMonitor, timeout: float) -> Optional[str]:
    """None once ``mon`` is ready within ``timeout``; else what it is still waiting for, in words."""
    if mon.wait_ready(timeout):
        return None
    etcd = mon.config.etcd_endpoints or ()
    nats = mon.config.nats_servers or ()
    h = mon.health()
    if h.etcd.state != "connected":
        return (f"cannot reach etcd at {', '.join(etcd)} within {timeout:g} s"
                + (f" ({h.etcd.last_error})" if h.etcd.last_error else ""))
    if "zmq" in h.required and h.zmq.state != "connected":
        return (f"the ZMQ event plane did not come up within {timeout:g} s"
                + (f" ({h.zmq.last_error})" if h.zmq.last_error else ""))
    return (f"cannot reach NATS at {', '.join(nats)} within {timeout:g} s"
            + (f" ({h.nats.last_error})" if h.nats.last_error else ""))


def _wait_ready_or_explain(mon: WorkerMonitor, timeout: float) -> None:
    reason = _unready_reason(mon, timeout)
    if reason is not None:
        raise UserError(reason)


def _tls_from_args(ca: Optional[str], cert: Optional[str], key: Optional[str]) -> Optional[TLS]:
    return TLS(ca, cert, key) if (ca or cert or key) else None


def _security_from_args(args: argparse.Namespace) -> Tuple[Optional[EtcdOptions], Optional[NatsOptions]]:
    """The flags' TLS and users; passwords only from the environment (never argv).  What no flag
    sets is left to Dynamo's variables (ETCD_AUTH_*, NATS_AUTH_*, NATS_TLS_*), read by the monitor."""
    etcd_tls = _tls_from_args(args.etcd_ca, args.etcd_cert, args.etcd_key)
    etcd = None
    if etcd_tls is not None or args.etcd_user:
        password = None
        if args.etcd_user:
            password = os.environ.get("ETCD_AUTH_PASSWORD")
            if password is None:
                raise UserError("--etcd-user needs its password in $ETCD_AUTH_PASSWORD (never on the command line)")
        etcd = EtcdOptions(tls=etcd_tls, user=args.etcd_user or None, password=password)
    nats_tls = _tls_from_args(args.nats_ca, args.nats_cert, args.nats_key)
    nats = None
    if nats_tls is not None or args.nats_user or args.nats_creds:
        password = None
        if args.nats_user:
            password = os.environ.get("NATS_AUTH_PASSWORD")
            if password is None:
                raise UserError("--nats-user needs its password in $NATS_AUTH_PASSWORD (never on the command line)")
        nats = NatsOptions(tls=nats_tls, user=args.nats_user or None, password=password, credentials=args.nats_creds)
    return etcd, nats


def _monitor_from_args(args: argparse.Namespace) -> WorkerMonitor:
    try:
        etcd, nats = _security_from_args(args)
        return WorkerMonitor(args.etcd or FROM_ENV, args.nats if args.nats else FROM_ENV, namespace=args.namespace,
                             busy_threshold=args.busy_threshold, component=args.component,
                             endpoint=args.endpoint, event_plane=args.event_plane,
                             zmq_broker_url=args.zmq_broker_url if args.zmq_broker_url else FROM_ENV,
                             etcd=etcd, nats=nats, strategy=getattr(args, "strategy", "p2c"),
                             overflow=getattr(args, "overflow", "steer"),
                             kv_index=bool(getattr(args, "kv_index", False)))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _serve_metrics(args: argparse.Namespace, mon: WorkerMonitor) -> Any:
    if args.metrics_port is None:
        return None
    try:
        from .prometheus import serve
    except ImportError:
        raise UserError("--metrics-port needs prometheus_client: pip install 'workermon[prometheus]'") from None
    try:
        return serve(mon, args.metrics_port, args.metrics_host)
    except OSError as exc:
        raise UserError(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc}") from None


def _stop_metrics(served: Any) -> None:
    if served is not None:
        server, thread = served
        server.shutdown()
        server.server_close()
        thread.join(5)


def cmd_agent(args: argparse.Namespace, stopping: threading.Event) -> int:
    from ._agent import Agent, AgentLimits, default_socket_path

    mon = _monitor_from_args(args)
    path = args.socket or default_socket_path()
    agent = Agent(mon, path, AgentLimits(args.max_workers, args.max_ranks, args.max_clients))
    try:
        agent.bind()
    except OSError as exc:
        raise UserError(f"cannot serve {path}: {exc}") from None
    logging.getLogger("workermon").setLevel(logging.INFO)
    log = logging.getLogger("workermon.agent")
    # Requests from routers wait on this process while its ingest threads
    # hold the GIL; a shorter switch interval (default 5 ms) lets the agent
    # thread answer within a fraction of a millisecond (measured: bench.host).
    sys.setswitchinterval(args.switch_interval)
    try:
        served = _serve_metrics(args, mon)
    except BaseException:
        agent.close()  # nothing of this agent stays behind: socket and shared memory go
        raise
    mon.start()
    agent.start()
    try:
        # A daemon outlives a slow or late etcd: unready, it keeps serving (its
        # clients see it not ready and why) and keeps trying; it says so once.
        until = None if args.duration is None else time.monotonic() + args.duration
        reason = _unready_reason(mon, min(args.connect_timeout, args.duration or args.connect_timeout))
        if reason is None:
            _log_serving(log, path, mon)
        else:
            log.warning("workermon agent not ready: %s; serving %s meanwhile, still trying", reason, path)
        while not stopping.wait(0.5 if until is None else max(0.0, min(0.5, until - time.monotonic()))):
            if until is not None and time.monotonic() >= until:
                break
            if not agent.is_alive():
                raise UserError("the agent thread ended unexpectedly")
            if reason is not None and mon.ready:
                reason = None
                _log_serving(log, path, mon)
    finally:
        agent.stop()
        mon.stop()
        _stop_metrics(served)
        log.info("workermon agent stopped; %s removed", path)
    return 0


def _log_serving(log: logging.Logger, path: str, mon: WorkerMonitor) -> None:
    log.info("workermon agent serving %s (%d workers, %d busy)", path, len(mon.members()), len(mon.busy_workers()))


def cmd_watch(args: argparse.Namespace, stopping: threading.Event) -> int:
    # Without --nats the monitor reads $NATS_SERVER itself: NATS is then
    # required only when the environment names it (or --event-plane nats).
    mon = _monitor_from_args(args)
    view = View(mon, sys.stdout, args.json, args.plain, args.interval or (5.0 if args.plain else 1.0), args.why)
    view.attach()
    served = _serve_metrics(args, mon)
    mon.start()
    try:
        _wait_ready_or_explain(mon, args.connect_timeout)
        until = None if args.duration is None else time.monotonic() + args.duration
        view.run(until, stopping)
        if not args.json and not view.live:
            view._draw()
    finally:
        mon.stop()
        _stop_metrics(served)
    return 0


def cmd_demo(args: argparse.Namespace, stopping: threading.Event) -> int:
    from ._publisher import WorkerPublisher
    from ._servers import EtcdServer, NatsServer, ServerError

    if not 1 <= args.workers <= 200:
        raise UserError(f"--workers must be between 1 and 200, got {args.workers}")
    rng = random.Random(args.seed)
    out = sys.stdout
    servers: List[Any] = []
    publishers: List[WorkerPublisher] = []
    mon: Optional[WorkerMonitor] = None
    # With --json, stdout carries only change objects; progress goes to stderr.
    say_to = sys.stderr if args.json else out

    def say(text: str) -> None:
        print(text, file=say_to, flush=True)

    zmq = args.event_plane == "zmq"
    try:
        try:
            etcd = EtcdServer()
            servers.append(etcd)
            etcd.start()
            if not zmq:
                nats = NatsServer()
                servers.append(nats)
                nats.start()
        except ServerError as exc:
            raise UserError(str(exc)) from None
        assert etcd.proc is not None
        say(f"started etcd {etcd.url} (pid {etcd.proc.pid}, dir {etcd.workdir})")
        nats_urls: List[str] = []
        if not zmq:
            assert nats.proc is not None
            nats_urls = [nats.url]
            say(f"started nats-server {nats.url} (pid {nats.proc.pid}, dir {nats.workdir})")
        total = 1000
        for i in range(args.workers):
            pub = WorkerPublisher([etcd.url], nats_urls or None, namespace="dynamo", total_kv_blocks=total,
                                  display_name="demo/simulated-model", event_plane=args.event_plane)
            publishers.append(pub.start())
        plane = "ZMQ event plane, as Dynamo 1.6" if zmq else "NATS"
        say(f"registered {args.workers} simulated workers (total_kv_blocks={total}, lease TTL 10 s, {plane})")
        mon = WorkerMonitor([etcd.url], nats_urls or None, namespace="dynamo", busy_threshold=args.busy_threshold,
                            event_plane=args.event_plane)
        view = View(mon, out, args.json, args.plain, args.interval or (1.0 if not args.plain else 2.0))
        view.attach()
        mon.start()
        _wait_ready_or_explain(mon, 10.0)
        for pub in publishers if zmq else ():
            # No replay on ZMQ: start reporting once the monitor is connected.
            pub.wait_subscribed(10.0)

        # Each worker's load rises and falls on its own period and phase, so
        # workers cross the threshold both ways within a few seconds.
        phases = [(rng.uniform(3.0, 6.0), rng.uniform(0, 2 * math.pi)) for _ in publishers]
        start = time.monotonic()

        def drive() -> None:
            while not stopping.wait(0.2):
                t = time.monotonic() - start
                for pub, (period, phase) in zip(publishers, phases):
                    level = 0.55 + 0.45 * math.sin(2 * math.pi * t / period + phase)
                    pub.report(int(total * level), request_active_slots=int(level * 20))

        driver = threading.Thread(target=drive, name="workermon-demo-load", daemon=True)
        driver.start()
        until = None if args.duration is None else start + args.duration
        view.run(until, stopping)
        stopping.set()
        driver.join(5)
        if not args.json:
            if view.live:
                view._draw()
            c = view.counts
            say(f"demo done: {c['became_busy']} went busy, {c['became_free']} went free, "
                f"{mon.version} busy-set changes")
        return 0
    finally:
        stopping.set()
        if mon is not None:
            mon.stop()
        for pub in publishers:
            pub.stop(timeout=2)
        for server in reversed(servers):
            server.close()
        for server in servers:
            if os.path.exists(server.workdir):
                shutil.rmtree(server.workdir, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workermon", description="Which Dynamo workers are busy, live.")
    parser.add_argument("--version", action="version", version=f"workermon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    w = sub.add_parser("watch", help="watch a running Dynamo deployment")
    _add_monitor_args(w)
    w.add_argument("--why", type=_worker_id, default=None, metavar="ID",
                   help="below the table, explain why this worker (hex as in Dynamo's keys, or decimal) is busy or not")
    w.add_argument("--kv-index", action="store_true",
                   help="also follow the workers' kv-events (ZMQ or NATS plane): --why then shows each rank's "
                        "cached blocks")
    _add_view_args(w)
    a = sub.add_parser("agent", help="one monitor per host, served to local processes (SharedMonitor)")
    _add_monitor_args(a)
    a.add_argument("--socket", default=None, metavar="PATH",
                   help="Unix socket to serve (default $WORKERMON_AGENT_SOCKET, else "
                        "$XDG_RUNTIME_DIR/workermon/agent.sock, else /tmp/workermon-<uid>/agent.sock)")
    a.add_argument("--busy-threshold", type=_threshold, default=0.9, metavar="F",
                   help="busy when active KV blocks > F × total (default 0.9)")
    a.add_argument("--strategy", choices=STRATEGIES, default=os.environ.get("WORKERMON_STRATEGY", "p2c"),
                   help="the routers' default strategy (SharedMonitor(strategy=None)); default $WORKERMON_STRATEGY "
                        "or p2c")
    a.add_argument("--overflow", choices=OVERFLOW, default=os.environ.get("WORKERMON_OVERFLOW", "steer"),
                   help="reserve(blocks=N) when no free worker has room: steer to the roomiest one the frontend "
                        "would serve (default), or refuse; default $WORKERMON_OVERFLOW or steer")
    a.add_argument("--duration", type=_positive, default=None, metavar="S", help="exit after S seconds")
    a.add_argument("--max-workers", type=_count, default=16384, metavar="N",
                   help="workers the shared memory holds (default 16384)")
    a.add_argument("--max-ranks", type=_count, default=65536, metavar="N",
                   help="data-parallel rank slots the shared memory holds (default 65536)")
    a.add_argument("--max-clients", type=_count, default=128, metavar="N",
                   help="client processes served at once, one booking row each (default 128)")
    a.add_argument("--switch-interval", type=_positive, default=0.0002, metavar="S",
                   help="the agent process's GIL switch interval (default 0.0002 s; Python's is 0.005)")
    a.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    d = sub.add_parser("demo", help="start local etcd + NATS, simulated workers and a monitor")
    d.add_argument("--workers", type=int, default=4, metavar="N", help="simulated workers (default 4)")
    d.add_argument("--event-plane", choices=("nats", "zmq"), default="nats",
                   help="simulated workers report over NATS (default) or, as Dynamo 1.6, over ZMQ (no NATS started)")
    d.add_argument("--seed", type=int, default=None, help="random seed for the load pattern")
    _add_view_args(d)
    return parser


def _add_monitor_args(w: argparse.ArgumentParser) -> None:
    w.add_argument("--etcd", action="append", metavar="URL", help="etcd endpoint (repeat; default $ETCD_ENDPOINTS)")
    w.add_argument("--nats", action="append", metavar="URL", help="NATS server (repeat; default $NATS_SERVER)")
    w.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", "dynamo"), help="Dynamo namespace")
    w.add_argument("--component", default=None, help="only this component's workers")
    w.add_argument("--endpoint", default=None, help="only this endpoint's workers (needs --component)")
    w.add_argument("--connect-timeout", type=_positive, default=5.0, metavar="S",
                   help="watch gives up when etcd or NATS is unreachable for S seconds at start; the agent "
                        "says so and keeps trying (default 5)")
    w.add_argument("--event-plane", choices=("auto", "nats", "zmq"),
                   default=os.environ.get("DYN_EVENT_PLANE", "auto").strip().lower() or "auto",
                   help="where load reports come from (default $DYN_EVENT_PLANE, else auto: ZMQ channels "
                        "found in etcd and NATS where reachable)")
    w.add_argument("--zmq-broker-url", default=None, metavar="URL",
                   help="ZMQ broker mode: 'xsub=…, xpub=tcp://h:p;…' (default $DYN_ZMQ_BROKER_URL)")
    sec = w.add_argument_group("secured planes (unset: Dynamo's ETCD_AUTH_*, NATS_AUTH_*, NATS_TLS_* variables; "
                               "passwords and tokens only from the environment)")
    sec.add_argument("--etcd-ca", metavar="FILE", help="CA certificate for etcd (default $ETCD_AUTH_CA)")
    sec.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd (default $ETCD_AUTH_CLIENT_CERT)")
    sec.add_argument("--etcd-key", metavar="FILE", help="client key for etcd (default $ETCD_AUTH_CLIENT_KEY)")
    sec.add_argument("--etcd-user", metavar="NAME",
                     help="etcd user, password from $ETCD_AUTH_PASSWORD (default $ETCD_AUTH_USERNAME)")
    sec.add_argument("--nats-ca", metavar="FILE", help="CA certificate for NATS (default $NATS_TLS_CA_CERT_PATH)")
    sec.add_argument("--nats-cert", metavar="FILE",
                     help="client certificate for NATS (default $NATS_TLS_CLIENT_CERT_PATH)")
    sec.add_argument("--nats-key", metavar="FILE", help="client key for NATS (default $NATS_TLS_CLIENT_KEY_PATH)")
    sec.add_argument("--nats-user", metavar="NAME",
                     help="NATS user, password from $NATS_AUTH_PASSWORD (default $NATS_AUTH_USERNAME)")
    sec.add_argument("--nats-creds", metavar="FILE", help="NATS .creds file (default $NATS_AUTH_CREDENTIALS_FILE)")
    w.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at /metrics on this port (needs workermon[prometheus])")
    w.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address for --metrics-port (default 127.0.0.1: loopback only)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR
    if args.command == "agent":
        level = logging.DEBUG if args.verbose else logging.INFO  # the agent logs to stderr
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stopping.set()

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        command = {"watch": cmd_watch, "agent": cmd_agent, "demo": cmd_demo}[args.command]
        return command(args, stopping)
    except KeyboardInterrupt:
        return 0
    except UserError as exc:
        print(f"workermon: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
