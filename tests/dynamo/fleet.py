"""Bring up a real Dynamo fleet (mocker workers + frontend) from a release's virtual environment.

Everything listens on loopback.  0.6/0.7 advertise the host's non-loopback
address for response streams, so the interop suite runs inside a private
network namespace (``scripts/dynamo-interop.sh`` does ``unshare -n``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from workermon._servers import free_port

from .model import write_tiny_model


def version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class DynamoFleet:
    def __init__(self, python: str, version: str, etcd_url: str, nats_url: Optional[str], *, workers: int = 3,
                 blocks: int = 64, busy_threshold: float = 0.5, max_num_seqs: int = 8,
                 speedup: float = 1.0, workdir: Optional[str] = None, event_plane: Optional[str] = "nats",
                 worker_args: Tuple[str, ...] = (), frontend_args: Tuple[str, ...] = (),
                 frontend_env: Optional[Dict[str, str]] = None) -> None:
        # event_plane=None leaves the release's default (1.6: ZMQ); nats_url=None starts no NATS at all.
        self.event_plane = event_plane
        self.worker_args = worker_args
        self.frontend_args = frontend_args
        self.frontend_env = dict(frontend_env or {})
        self.python = python
        self.version = version
        self.v = version_tuple(version)
        self.etcd_url = etcd_url
        self.nats_url = nats_url
        self.workers = workers
        self.blocks = blocks
        self.busy_threshold = busy_threshold
        self.max_num_seqs = max_num_seqs
        self.speedup = speedup
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"dynamo-{version}-"))
        self.model = write_tiny_model(self.workdir / "tiny-model")
        self.http_port = free_port()
        self.mockers: List[subprocess.Popen[bytes]] = []
        self.frontend: Optional[subprocess.Popen[bytes]] = None

    @property
    def model_name(self) -> str:
        return str(self.model)

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NATS_SERVER", "DYN_EVENT_PLANE", "DYN_REQUEST_PLANE")}
        env.update(ETCD_ENDPOINTS=self.etcd_url, HF_HUB_OFFLINE="1", DYN_LOG="warn", RUST_LOG="warn")
        if self.nats_url is not None:
            env["NATS_SERVER"] = self.nats_url
        if self.v >= (0, 8):
            # 1.1-1.5 take an interface name for the response stream (127.0.0.1 is refused): they run
            # inside a private network namespace where lo is the only one (scripts/dynamo-interop.sh).
            stream_host = "lo" if (1, 1) <= self.v < (1, 6) else "127.0.0.1"
            env.update(DYN_TCP_RPC_HOST="127.0.0.1", DYN_EVENT_PLANE_HOST="127.0.0.1",
                       DYN_TCP_RESPONSE_STREAM_HOST=stream_host)
        if self.v >= (0, 8) and self.event_plane is not None:
            env["DYN_EVENT_PLANE"] = self.event_plane
        if self.v >= (0, 8) and self.nats_url is not None:
            # From 0.8 the frontend connects to NATS only for a NATS request
            # plane (or KV routing with events); without NATS its own busy
            # detection fails silently and it never answers 503.
            env["DYN_REQUEST_PLANE"] = "nats"
        return env

    def _spawn(self, args: List[str], log: str, env: Optional[Dict[str, str]] = None) -> "subprocess.Popen[bytes]":
        out = open(self.workdir / log, "ab")
        try:
            return subprocess.Popen([self.python, "-m", *args], env={**self.env(), **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=self.workdir)
        finally:
            out.close()  # the child has its own copy

    def start_worker(self, index: int) -> "subprocess.Popen[bytes]":
        args = ["dynamo.mocker", "--model-path", str(self.model), "--num-gpu-blocks-override", str(self.blocks),
                "--block-size", "16", "--max-num-seqs", str(self.max_num_seqs),
                "--speedup-ratio", str(self.speedup)]
        if self.v >= (0, 8):
            args += ["--model-name", self.model_name]
        args += list(self.worker_args)
        proc = self._spawn(args, f"mocker-{index}.log")
        self.mockers.append(proc)
        return proc

    def start(self) -> None:
        for i in range(self.workers):
            self.start_worker(i)
        # 0.8 renamed --busy-threshold to --active-decode-blocks-threshold (same meaning).
        flag = "--busy-threshold" if self.v < (0, 8) else "--active-decode-blocks-threshold"
        args = ["dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
                flag, str(self.busy_threshold), *self.frontend_args]
        self.frontend = self._spawn(args, "frontend.log", self.frontend_env)

    def logs(self) -> str:
        out = []
        for p in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:])
        return "\n".join(out)

    def models_listed(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v1/models", timeout=2) as r:
                data = json.loads(r.read())
            return any(m.get("id") == self.model_name or m.get("id") == self.model.name
                       or str(self.model) in str(m.get("id")) for m in data.get("data", []))
        except (OSError, ValueError):
            return False

    def served_model(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v1/models", timeout=5) as r:
            return str(json.loads(r.read())["data"][0]["id"])

    def chat(self, max_tokens: int = 8, timeout: float = 60.0, prompt: str = "hello") -> Tuple[int, str]:
        body = json.dumps({"model": self.served_model(), "max_tokens": max_tokens, "stream": False,
                           "messages": [{"role": "user", "content": prompt}],
                           "ignore_eos": True, "min_tokens": max_tokens}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def stop(self) -> None:
        procs: List[Any] = list(self.mockers) + ([self.frontend] if self.frontend else [])
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
