"""``python -m bench e2e``: is traffic served better through workermon than by Dynamo's own routing?

A real Dynamo 1.6.1 fleet of mocker workers — two with 1024 KV blocks, one
with 256, one with 256 at half speed — behind a real frontend, loaded by
NVIDIA's ``aiperf`` (Poisson arrivals of streaming chat, 818-token prompts,
150-token answers), every router holding the same busy threshold (0.8):

- Dynamo's frontend in each of its modes (round-robin, kv, least-loaded,
  power-of-two);
- the project's router as it ships (``gunicorn -c examples/gunicorn.conf.py``,
  host agent, p2c and least_loaded) in front of the frontend in direct mode;
- the same forwarder with no load information (a random member per request).

Configurations run in alternating order over rounds; a run's figures come
from aiperf's own per-request records: shed share (529/503 answers), OK
requests per second, TTFT p50/p99 of the OK ones.  Router overhead is the
client's TTFT minus the frontend's own (its ``ttft_ms`` log, joined on
``x-request-id``).  Everything runs inside a private network namespace
(``unshare -n``, root) so only loopback exists; Dynamo 1.6.1 and aiperf are
installed into their own virtual environments (``.dynamo-venvs/1.6.1``,
``.bench-venvs/aiperf``) on first use.

    python -m bench e2e                  # 3 rounds × 7 configurations × 60 s
    python -m bench e2e --rounds 1 --duration 30 --configs dynamo-round-robin,workermon-p2c
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
DYNAMO = "1.6.1"
AIPERF = "0.13.0"
FLEET: Tuple[Tuple[int, float], ...] = ((1024, 1.0), (1024, 1.0), (256, 1.0), (256, 0.5))  # (blocks, speed)
THRESHOLD = 0.8
REPLAY_KEY = "bench150"

# name -> (what serves the client, its mode)
CONFIGS: Dict[str, Tuple[str, str]] = {
    "dynamo-round-robin": ("frontend", "round-robin"),
    "dynamo-kv": ("frontend", "kv"),
    "dynamo-least-loaded": ("frontend", "least-loaded"),
    "dynamo-power-of-two": ("frontend", "power-of-two"),
    "workermon-p2c": ("router", "p2c"),
    "workermon-least_loaded": ("router", "least_loaded"),
    "naive-random": ("naive", "random"),
    "workermon-kv": ("router", "kv"),
}
WORKLOAD_TEXT = {
    "uniform": "aiperf's synthetic 818-token prompts (`python -m bench e2e`)",
    "shared-prefix": "a 200-token system prompt shared by all, one of 60 per-user 600-token contexts, 40 new "
                     "tokens (`python -m bench e2e --workload shared-prefix`)",
}
# What each workload runs by default.
WORKLOADS: Dict[str, Tuple[str, ...]] = {
    # Issue 20's comparison: independent 818-token prompts (aiperf's pool of synthetic prompts).
    "uniform": ("dynamo-round-robin", "dynamo-kv", "dynamo-least-loaded", "dynamo-power-of-two", "workermon-p2c",
                "workermon-least_loaded", "naive-random"),
    # Shared prefixes: a 200-token system prompt for all, one of 60 per-user 600-token contexts, 40 new
    # tokens: a request is cheap where its user's context is cached.
    "shared-prefix": ("dynamo-kv", "workermon-kv", "workermon-p2c", "dynamo-round-robin"),
}


# --- environments --------------------------------------------------------------------------------


def dynamo_python() -> str:
    venvs = Path(os.environ.get("WORKERMON_DYNAMO_VENVS", ROOT / ".dynamo-venvs"))
    py = venvs / DYNAMO / "bin" / "python"
    if not py.exists():
        subprocess.run([str(ROOT / "scripts" / "setup-dynamo.sh"), DYNAMO], check=True, timeout=1800)
    return str(py)


def aiperf_bin() -> str:
    env = Path(os.environ.get("WORKERMON_AIPERF_VENV", ROOT / ".bench-venvs" / "aiperf"))
    exe = env / "bin" / "aiperf"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
        subprocess.run([str(env / "bin" / "pip"), "install", "-q", f"aiperf=={AIPERF}"], check=True, timeout=1800)
    return str(exe)


# --- processes -----------------------------------------------------------------------------------


class Procs:
    """Child processes in their own sessions, logged to files, always stopped (bounded waits)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: List[Tuple[str, "subprocess.Popen[bytes]"]] = []

    def spawn(self, name: str, cmd: Sequence[str], env: Dict[str, str], cwd: Optional[Path] = None
              ) -> "subprocess.Popen[bytes]":
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(cwd or self.workdir))
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: "subprocess.Popen[bytes]", grace: float = 15.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:  # hung, not dead: take the whole group
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def dynamo_env(etcd_url: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DYN_", "WORKERMON_"))}
    env.update(ETCD_ENDPOINTS=etcd_url, HF_HUB_OFFLINE="1", DYN_LOG="warn", RUST_LOG="warn",
               DYN_TCP_RPC_HOST="127.0.0.1", DYN_EVENT_PLANE_HOST="127.0.0.1",
               DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1")
    return env


def http_get(url: str, timeout: float = 2.0) -> Optional[Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)  # polling another process's HTTP endpoint: there is nothing to wait on
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    from workermon._servers import free_port as fp

    return fp()


def write_replay_trace(path: Path, tokens: int) -> None:
    """One Mooncake row whose planned answer the mocker replays (its own answers decode to no text)."""
    words = ("the quick brown fox jumps over a lazy dog " * ((tokens // 40) + 2))[:tokens]
    row = {"request_id": REPLAY_KEY, "hash_ids": [1], "input_length": 16, "output_length": tokens,
           "output_token_ids": list(words.encode()), "timestamp": 0}
    path.write_text(json.dumps(row) + "\n")


# --- one run -------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.python = dynamo_python()
        self.aiperf = aiperf_bin()
        sys.path.insert(0, str(ROOT))
        from tests.dynamo.model import write_tiny_model

        self.model = write_tiny_model(workdir / "model")
        self.trace = workdir / "replay.jsonl"
        write_replay_trace(self.trace, args.osl)
        self.etcd: Any = None
        self.monitor: Any = None

    def start_fleet(self) -> None:
        from workermon import WorkerMonitor
        from workermon._servers import EtcdServer

        self.etcd = EtcdServer().start()
        env = dynamo_env(self.etcd.url)
        for i, (blocks, speed) in enumerate(FLEET):
            self.procs.spawn(f"mocker-{i}", [
                self.python, "-m", "dynamo.mocker", "--model-path", str(self.model), "--model-name", str(self.model),
                "--num-gpu-blocks-override", str(blocks), "--block-size", "16", "--speedup-ratio", str(speed),
                "--response-replay-trace-path", str(self.trace)], env)
        self.monitor = WorkerMonitor([self.etcd.url], None, event_plane="zmq", busy_threshold=THRESHOLD).start()
        wait_for("the fleet's cards", lambda: len(self.monitor.members()) == len(FLEET), 120)

    def drained(self) -> bool:
        states = self.monitor.load_states()
        return all(not any(s.kv_active_blocks.values()) for s in states.values())

    def frontend(self, mode: str) -> Tuple["subprocess.Popen[bytes]", str]:
        port = free_port()
        env = dynamo_env(self.etcd.url)
        env["DYN_LOG"] = "info"  # its per-request ttft_ms, for the router's overhead
        proc = self.procs.spawn(f"frontend-{mode}", [
            self.python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
            "--router-mode", mode, "--active-decode-blocks-threshold", str(THRESHOLD)], env)
        url = f"http://127.0.0.1:{port}"

        def listed() -> bool:
            models = http_get(url + "/v1/models")
            return bool(models and models.get("data"))
        wait_for(f"the {mode} frontend", listed, 60)
        return proc, url

    def router(self, strategy: str, frontend_url: str, naive: bool) -> Tuple["subprocess.Popen[bytes]", str]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DYN_", "WORKERMON_"))}
        env.update(ETCD_ENDPOINTS=self.etcd.url, DYN_EVENT_PLANE="zmq", WORKERMON_BIND=f"127.0.0.1:{port}",
                   WORKERMON_FRONTEND_URL=frontend_url, WORKERMON_STRATEGY=strategy,
                   WORKERMON_BUSY_THRESHOLD=str(THRESHOLD), WORKERMON_TOKENIZER=str(self.model),
                   WORKERMON_AGENT_SOCKET=str(self.workdir / f"agent-{port}" / "agent.sock"),
                   PYTHONPATH=str(ROOT))
        if naive:
            # The same forwarder knowing members only: a random one per request, load never consulted.
            env.update(WORKERMON_MODE="per-process", WORKERMON_BUSY_THRESHOLD="1.0", WORKERMON_SIZE_REQUESTS="0")
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        proc = self.procs.spawn(f"router-{strategy}", [gunicorn, "-c", "examples/gunicorn.conf.py"], env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        wait_for("the router", lambda: (http_get(url + "/_workermon/health") or {}).get("members") == len(FLEET), 60)
        return proc, url

    def run(self, name: str, seed: int) -> Dict[str, Any]:
        kind, mode = CONFIGS[name]
        wait_for("the fleet to drain", self.drained, 120)
        fe, fe_url = self.frontend("direct" if kind != "frontend" else mode)
        router = None
        url = fe_url
        try:
            if kind != "frontend":
                router, url = self.router(mode, fe_url, naive=(kind == "naive"))
            out = self.workdir / f"{name}-{seed}"
            started = time.time()
            self.aiperf_run(url, out, seed)
            result = summarise(out, self.args.duration)
            result.update(config=name, seed=seed, started=started)
            if router is not None:
                result["router_ttft_overhead_ms_p50"] = router_overhead(out, self.workdir / "frontend-direct.log",
                                                                        started)
            return result
        finally:
            if router is not None:
                self.procs.stop(router)
            self.procs.stop(fe)

    def aiperf_run(self, url: str, out: Path, seed: int) -> None:
        a = self.args
        extra = json.dumps({"nvext": {"annotations": [f"output_replay_id:{REPLAY_KEY}"]}, "ignore_eos": True})
        if a.workload == "shared-prefix":
            prompt = ["--shared-system-prompt-length", "200", "--user-context-prompt-length", "600",
                      "--num-dataset-entries", "60", "--isl", "40", "--isl-stddev", "0"]
        else:
            prompt = ["--isl", str(a.isl), "--isl-stddev", "0"]
        cmd = [self.aiperf, "profile", "-m", str(self.model), "--url", url, "--endpoint-type", "chat", "--streaming",
               "--request-rate", str(a.rate), "--arrival-pattern", "poisson", "--benchmark-duration",
               str(a.duration), "--benchmark-grace-period", "60", *prompt,
               "--osl", str(a.osl), "--osl-stddev", "0", "--tokenizer", str(self.model), "--extra-inputs", extra,
               "--artifact-dir", str(out), "--random-seed", str(seed), "--request-timeout-seconds", "120",
               "--ui", "none", "--no-auto-plot"]
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # 0.13 refuses a local dir offline
        with open(self.workdir / "aiperf.log", "ab") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=a.duration + 600,
                           check=True, cwd=str(self.workdir))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop(10)
        self.procs.stop_all()
        if self.etcd is not None:
            self.etcd.close()


# --- figures -------------------------------------------------------------------------------------


def _records(out: Path) -> List[Dict[str, Any]]:
    path = next(iter(sorted(out.rglob("profile_export.jsonl"))), None)
    if path is None:
        raise RuntimeError(f"aiperf wrote no per-request records under {out}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


def summarise(out: Path, duration: float) -> Dict[str, Any]:
    recs = _records(out)
    ok_ttft: List[float] = []
    shed = failed = 0
    prompt_tokens = cached_tokens = 0.0
    for r in recs:
        err = r.get("error")
        if err:
            code = err.get("code") if isinstance(err, dict) else None
            if code in (529, 503):
                shed += 1
            else:
                failed += 1
            continue
        ttft = _metric(r, "time_to_first_token")
        if ttft is not None:
            ok_ttft.append(ttft)
        tokens = r.get("metrics", {})
        prompt_tokens += float((tokens.get("usage_prompt_tokens") or {}).get("value", 0))
        cached_tokens += float((tokens.get("usage_prompt_cache_read_tokens") or {}).get("value", 0))
    total = len(recs)
    return {"requests": total, "ok": len(ok_ttft), "shed": shed, "failed": failed,
            "shed_share": shed / total if total else float("nan"), "ok_per_s": len(ok_ttft) / duration,
            "ttft_p50_s": _pct(ok_ttft, 0.5), "ttft_p99_s": _pct(ok_ttft, 0.99),
            "cached_share": cached_tokens / prompt_tokens if prompt_tokens else float("nan")}


def _metric(rec: Dict[str, Any], name: str) -> Optional[float]:
    m = rec.get("metrics", {}).get(name)
    if m is None:
        return None
    value = m.get("value") if isinstance(m, dict) else m
    unit = m.get("unit", "ms") if isinstance(m, dict) else "ms"
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}.get(unit, 1e-3)
    return float(value) * scale


_TTFT_LOG = re.compile(r'x_request_id="([^"]+)".*?ttft_ms="([\d.]+)"')


def router_overhead(out: Path, frontend_log: Path, started: float) -> Optional[float]:
    """Median of (client TTFT − the frontend's own ttft_ms) over requests both saw; None when unmatched."""
    if not frontend_log.exists():
        return None
    theirs: Dict[str, float] = {}
    for line in frontend_log.read_text(errors="replace").splitlines():
        m = _TTFT_LOG.search(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m:
            theirs[m.group(1)] = float(m.group(2))
    diffs = []
    for r in _records(out):
        rid = str(r.get("metadata", {}).get("x_request_id") or r.get("metadata", {}).get("request_id") or "")
        ttft = _metric(r, "time_to_first_token")
        if rid in theirs and ttft is not None:
            diffs.append(ttft * 1000 - theirs[rid])
    return statistics.median(diffs) if diffs else None


# --- report --------------------------------------------------------------------------------------


def report(results: List[Dict[str, Any]]) -> str:
    """One table per workload: medians over rounds, and ratios to round-robin's medians."""
    tables = []
    for workload in WORKLOADS:
        rows = [r for r in results if r.get("workload", "uniform") == workload]
        if rows:
            tables.append(f"**{workload}** workload — {WORKLOAD_TEXT[workload]}\n\n{_table(rows)}")
    return "\n\n".join(tables)


def _med(rs: List[Dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rs if r.get(key) is not None and r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def _table(results: List[Dict[str, Any]]) -> str:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    base = by.get("dynamo-round-robin")
    lines = ["| configuration | runs | shed share | OK req/s | TTFT p50 | TTFT p99 | cached prompt tokens | "
             "vs round-robin: p99 / OK/s / shed | router overhead p50 |", "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        rs = by.get(name)
        if not rs:
            continue
        p99, ok, shed = _med(rs, "ttft_p99_s"), _med(rs, "ok_per_s"), _med(rs, "shed_share")
        rel = ""
        if base:
            rel = (f"{p99 / _med(base, 'ttft_p99_s'):.2f}× / {ok / _med(base, 'ok_per_s'):.2f}× / "
                   f"{100 * (shed - _med(base, 'shed_share')):+.1f} pt")
        over = _med(rs, "router_ttft_overhead_ms_p50")
        cached = _med(rs, "cached_share")
        lines.append(f"| {name} | {len(rs)} | {100 * shed:.1f} % | {ok:.2f} | {_med(rs, 'ttft_p50_s'):.3f} s | "
                     f"{p99:.2f} s | {'' if cached != cached else f'{100 * cached:.0f} %'} | {rel} | "
                     f"{'' if over != over else f'{over:.1f} ms'} |")
    return "\n".join(lines)


def svg(results: List[Dict[str, Any]], path: Path) -> None:
    """Shed share (x) against TTFT p99 (y, log scale), one point per run, one colour per configuration."""
    import math

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    pts = [(r["shed_share"] * 100, r["ttft_p99_s"], r["config"]) for r in results
           if r.get("workload", "uniform") == "uniform" and r["ttft_p99_s"] == r["ttft_p99_s"] and r["ttft_p99_s"] > 0]
    if not pts:
        return
    w, h, m = 720, 420, 60
    xmax = max(5.0, max(p[0] for p in pts) * 1.1)
    ylo = math.log10(min(p[1] for p in pts) / 1.5)
    yhi = math.log10(max(p[1] for p in pts) * 1.5)

    def xy(x: float, y: float) -> Tuple[float, float]:
        return m + (w - 2 * m) * x / xmax, h - m - (h - 2 * m) * (math.log10(y) - ylo) / (yhi - ylo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 220}" height="{h}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{w + 220}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">shed share (% of requests answered 529/503)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">TTFT p99 (s, log)'
           '</text>']
    for i in range(6):
        x = xmax * i / 5
        px, _ = xy(x, 10 ** ylo)
        out.append(f'<text x="{px:.0f}" y="{h - m + 15}" text-anchor="middle">{x:.0f}</text>')
    for e in range(math.floor(ylo), math.ceil(yhi) + 1):
        for k in (1, 2, 5):
            y = k * 10.0 ** e
            if ylo <= math.log10(y) <= yhi:
                _, py = xy(0, y)
                out.append(f'<text x="{m - 5}" y="{py + 4:.0f}" text-anchor="end">{y:g}</text>')
                out.append(f'<line x1="{m}" y1="{py:.0f}" x2="{w - m}" y2="{py:.0f}" stroke="#eee"/>')
    names = [n for n in CONFIGS if any(p[2] == n for p in pts)]
    for i, name in enumerate(names):
        c = colours[i % len(colours)]
        for x, y, n in pts:
            if n == name:
                px, py = xy(x, y)
                out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{c}" fill-opacity="0.8"/>')
        out.append(f'<circle cx="{w - 20}" cy="{m + 20 * i}" r="5" fill="{c}"/>')
        out.append(f'<text x="{w - 8}" y="{m + 20 * i + 4}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


# --- main ----------------------------------------------------------------------------------------


def _in_private_netns() -> bool:
    return os.environ.get("WORKERMON_E2E_NETNS") == "1"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    ap.add_argument("--rate", type=float, default=7.0, help="requests per second (Poisson)")
    ap.add_argument("--isl", type=int, default=818)
    ap.add_argument("--osl", type=int, default=150)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="uniform")
    ap.add_argument("--configs", default=None, help="comma-separated (default: the workload's)")
    ap.add_argument("--write", default=None, metavar="FILE", help="append the table to FILE (BENCHMARKS.md)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "e2e-results.jsonl"),
                    help="every run is appended here; the table covers all of them (remove it to start afresh)")
    ap.add_argument("--plot", default=str(ROOT / "bench" / "e2e.svg"))
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs, aiperf artifacts)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate (and --write) the runs already in --results")
    args = ap.parse_args(argv)
    if args.report_only:
        return _finish(args)
    names = [n.strip() for n in (args.configs or ",".join(WORKLOADS[args.workload])).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    # Install first (needs the network), then move into a namespace where only loopback exists.
    dynamo_python()
    aiperf_bin()
    if not _in_private_netns():
        if os.geteuid() == 0 and shutil.which("unshare"):
            argv = list(argv if argv is not None else sys.argv[1:])
            if not argv or argv[0] != "e2e":
                argv = ["e2e", *argv]
            cmd = f"ip link set lo up && exec {sys.executable} -m bench " + " ".join(map(_quote, argv))
            return subprocess.call(["unshare", "-n", "sh", "-c", cmd], env=dict(os.environ, WORKERMON_E2E_NETNS="1"),
                                   cwd=str(ROOT))
        print("note: not root, running on the host's loopback (no private network namespace)", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="wm-e2e-"))
    bench = Bench(args, workdir)
    results: List[Dict[str, Any]] = []
    try:
        bench.start_fleet()
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else list(reversed(names))  # alternate: drift hits both ends
            for name in order:
                r = bench.run(name, seed=1000 + rnd)
                r["round"] = rnd
                r["workload"] = args.workload
                results.append(r)
                with open(args.results, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(f"round {rnd} {name:24s} shed {100 * r['shed_share']:5.1f} %  ok/s {r['ok_per_s']:5.2f}  "
                      f"TTFT p50 {r['ttft_p50_s']:.3f} s  p99 {r['ttft_p99_s']:.2f} s  "
                      f"cached {100 * r['cached_share']:.0f} %  "
                      f"overhead {r.get('router_ttft_overhead_ms_p50')}", flush=True)
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return _finish(args)


def _finish(args: argparse.Namespace) -> int:
    """Tabulate every run in ``--results`` (each workload's own table), draw the picture, write the section."""
    done = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    table = report(done)
    print(table)
    svg(done, Path(args.plot))
    if args.write:
        write_section(Path(args.write), table, args, Path(args.plot))
    return 0


def write_section(path: Path, table: str, args: argparse.Namespace, plot: Path) -> None:
    """Replace the end-to-end section of BENCHMARKS.md (after its marker), keeping the rest."""
    from .__main__ import E2E_MARKER

    head = path.read_text().partition(E2E_MARKER)[0].rstrip() + "\n\n" if path.exists() else ""
    fleet = ", ".join(f"{b} blocks" + ("" if sp == 1.0 else f" at {sp:g}× speed") for b, sp in FLEET)
    rel = os.path.relpath(plot, path.parent)
    path.write_text(
        f"{head}{E2E_MARKER}\n## End to end: served better than Dynamo's own routing?\n\n"
        f"`python -m bench e2e` ({time.strftime('%Y-%m-%d')}, {args.duration:g} s of load per run): "
        f"Dynamo {DYNAMO} mocker fleet ({fleet}), aiperf {AIPERF}, Poisson {args.rate:g} req/s of streaming chat, "
        f"{args.osl}-token answers, busy threshold {THRESHOLD} everywhere, configurations "
        f"in alternating order each round, inside a private network namespace.  Medians over rounds; targets "
        f"against round-robin: TTFT p99 ≤ 0.5×, OK req/s ≥ 0.95×, shed ≤ +3 points, router overhead ≤ 10 ms.\n\n"
        f"{table}\n\n![shed share vs TTFT p99, one point per run]({rel})\n")


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


if __name__ == "__main__":
    sys.exit(main())
