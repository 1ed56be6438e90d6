"""Issue 12's benchmark: a WSGI app under gunicorn (4 sync workers) answering each request after
reserve()/release(), driven at fixed concurrency while a publisher sends 20,000 load reports/s over
200 workers.  Three configurations side by side: no monitor, one WorkerMonitor per gunicorn
process, one agent + SharedMonitor.  Plus the p99 agent → client propagation of a busy-set change.

    python -m bench.host [--seconds S] [--concurrency C]      (also run by python -m bench)
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from workermon._servers import EtcdServer, NatsServer, free_port

ROOT = Path(__file__).resolve().parents[1]
APP = "bench.host_app:app"


def _cpu_of(pids: List[int]) -> float:
    """User + system CPU seconds of processes (and their reaped children) from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _children(pid: int) -> List[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _drive(port: int, concurrency: int, seconds: float) -> Tuple[int, int]:
    ok = [0] * concurrency
    other = [0] * concurrency
    stop = time.monotonic() + seconds

    def run(k: int) -> None:
        while time.monotonic() < stop:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    ok[k] += 1
                else:
                    other[k] += 1
            except OSError:
                other[k] += 1
            finally:
                conn.close()

    ts = [threading.Thread(target=run, args=(k,)) for k in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(ok), sum(other)


def run_config(mode: str, etcd: str, nats: str, ns: str, seconds: float, concurrency: int) -> Dict[str, float]:
    port = free_port()
    sockdir = tempfile.mkdtemp(prefix="wm-bench-agent-")
    env = dict(os.environ, ETCD_ENDPOINTS=etcd, NATS_SERVER=nats, DYN_NAMESPACE=ns, WORKERMON_MODE=mode,
               WORKERMON_AGENT_SOCKET=os.path.join(sockdir, "agent.sock"), PYTHONPATH=str(ROOT))
    agent: Optional["subprocess.Popen[bytes]"] = None
    if mode == "agent":
        agent = subprocess.Popen([sys.executable, "-m", "workermon", "agent", "--socket", env["WORKERMON_AGENT_SOCKET"],
                                  "--namespace", ns], env=env, stderr=subprocess.DEVNULL)
    gunicorn = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-w", "4", "-k", "sync",
                                 "-b", f"127.0.0.1:{port}", "--log-level", "warning", APP],
                                cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    pub = None
    try:
        deadline = time.monotonic() + 60
        while True:  # every worker up and its monitor ready (the app answers 200 once it is)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/ready")
                r = conn.getresponse()
                r.read()
                conn.close()
                if r.status == 200 and len(_children(gunicorn.pid)) >= 4:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"gunicorn ({mode}) did not come up"
            time.sleep(0.2)
        rate = 20_000
        pub = subprocess.Popen([sys.executable, "-m", "bench.publisher", nats, f"namespace.{ns}.kv_metrics",
                                "--workers", "200", "--count", str(int(rate * (seconds + 4))), "--rate", str(rate)],
                               cwd=ROOT, stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # let the report stream reach its pace before measuring
        pids = _children(gunicorn.pid) + ([agent.pid] if agent else [])
        cpu0 = _cpu_of(pids)
        t0 = time.monotonic()
        ok, other = _drive(port, concurrency, seconds)
        elapsed = time.monotonic() - t0
        cpu = _cpu_of(pids) - cpu0
        return {"rps": ok / elapsed, "errors": other, "cpu_s": cpu, "seconds": elapsed, "requests": ok}
    finally:
        if pub is not None:
            pub.kill()
            pub.wait()
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(30)
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)


def propagation(etcd: str, nats: str, ns: str, flips: int = 200) -> Dict[str, float]:
    """p50/p99 of agent → client propagation: a busy-set change in the agent's monitor until a
    SharedMonitor in another process has applied it."""
    from bench.publisher import BASE
    from tests.helpers import RawNatsPublisher
    from workermon import BusyChange, WorkerMonitor
    from workermon._agent import Agent

    sockdir = tempfile.mkdtemp(prefix="wm-bench-prop-")
    path = os.path.join(sockdir, "agent.sock")
    mon = WorkerMonitor([etcd], [nats], namespace=ns)
    changed: Dict[int, float] = {}

    @mon.on_busy_change
    def record(change: BusyChange) -> None:
        changed[change.version] = time.time()

    mon.start()
    assert mon.wait_ready(30)
    agent = Agent(mon, path).bind()
    agent.start()
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "ready"
    pub = RawNatsPublisher(nats.split(",")[0])
    try:
        from bench.publisher import payload

        for k in range(flips):
            target = mon.version + 1
            pub.publish(f"namespace.{ns}.kv_metrics", payload(BASE, 950 if k % 2 == 0 else 10))
            pub.flush()
            assert mon.wait_for(lambda: mon.version >= target, 5)
            time.sleep(0.005)  # pacing between changes, not ordering
        time.sleep(0.5)  # let the client print its last callback
    finally:
        pub.close()
        client.send_signal(signal.SIGTERM)
        out, _ = client.communicate(timeout=10)
        agent.stop()
        mon.stop()
    seen = {int(v): float(t) for v, t in (line.split() for line in out.splitlines() if line.strip())}
    lat = sorted((seen[v] - changed[v]) * 1000 for v in seen if v in changed and v > 0)
    return {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)], "n": len(lat)}


_CLIENT = """
import signal, sys, time, threading
from workermon import SharedMonitor
mon = SharedMonitor(sys.argv[1]).start()
assert mon.wait_ready(20)
times = []
mon.on_busy_change(lambda c: times.append((c.version, time.time())))
print("ready", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait(300)
mon.stop()
for v, t in times:
    print(v, repr(t))
"""


def rows(seconds: float = 8.0, concurrency: int = 8) -> List[Tuple[str, str, str, str]]:
    from bench.__main__ import BASE, _card, _put_cards

    out: List[Tuple[str, str, str, str]] = []
    with EtcdServer() as etcd, NatsServer() as nats:
        ns = "benchhost"
        _put_cards(etcd.url, f"v1/mdc/{ns}/backend/generate/", [BASE + i for i in range(200)], lambda w: _card())
        results = {mode: run_config(mode, etcd.url, nats.url, ns, seconds, concurrency)
                   for mode in ("none", "per-process", "agent")}
        _put_cards(etcd.url, "v1/mdc/benchprop/backend/generate/", [BASE], lambda w: _card())
        prop = propagation(etcd.url, nats.url, "benchprop")
    none, per, agent = results["none"], results["per-process"], results["agent"]
    base_cpu_per_req = none["cpu_s"] / max(1, none["requests"])

    def monitoring_cpu(r: Dict[str, float]) -> float:
        # CPU beyond what serving the same number of requests costs without a monitor.
        return max(0.0, r["cpu_s"] - base_cpu_per_req * r["requests"]) / r["seconds"]

    m_per, m_agent = monitoring_cpu(per), monitoring_cpu(agent)
    label = f"gunicorn 4 sync workers, {concurrency} concurrent clients, 20k reports/s over 200 workers"
    out.append((f"{label}: no monitor (constant worker)", f"{none['rps']:,.0f} req/s", "", ""))
    out.append(("…: one WorkerMonitor per gunicorn process", f"{per['rps']:,.0f} req/s",
                "", f"{per['rps'] / none['rps']:.2f}× no monitor"))
    ratio = agent["rps"] / none["rps"]
    out.append(("…: one agent + SharedMonitor", f"{agent['rps']:,.0f} req/s", "≥ 0.9× no monitor",
                f"{ratio:.2f}× {'✅' if ratio >= 0.9 else '❌'}"))
    cpu_ratio = m_agent / m_per if m_per else float("inf")
    out.append(("CPU spent on monitoring (cores): agent vs per-process", f"{m_agent:.2f} vs {m_per:.2f}",
                "≤ 0.3× per-process", f"{cpu_ratio:.2f}× {'✅' if cpu_ratio <= 0.3 else '❌'}"))
    out.append(("agent → client propagation of a busy-set change",
                f"p50 {prop['p50_ms']:.2f} ms, p99 {prop['p99_ms']:.2f} ms ({prop['n']:.0f} changes)",
                "p99 ≤ 5 ms", "✅" if prop["p99_ms"] <= 5 else "❌"))
    return out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    for r in rows(args.seconds, args.concurrency):
        print(" | ".join(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
