"""KV-aware picking against a real Dynamo 1.6.1 kv-mode frontend (``-m dynamo``).

Mocker workers with prefix caching and a small KV capacity (so blocks get
evicted), a ``--router-mode kv`` frontend logging its routing inputs
(``dynamo_kv_router=debug``), and a ``WorkerMonitor(kv_index=True)`` started before the
workers.  For each request, before the frontend routes it: workermon's block
hashes (from the prompt, tokenized by the model's own tokenizer as its card
names it) equal the frontend's ``local_hashes``; its overlap for the worker
the frontend chose equals the logged overlap, and so does its best overlap.
A killed worker's blocks leave the index within its lease.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from workermon import WorkerMonitor, block_hashes
from workermon._servers import EtcdServer, NatsServer

from .fleet import DynamoFleet, version_tuple
from .test_interop import _python_for, _release_from, _until_serving, release  # noqa: F401  (the fixture)

pytestmark = pytest.mark.dynamo

ANSI = re.compile(r"\x1b\[[0-9;]*m")
BASE = "The quick brown fox jumps over the lazy dog; " * 6


def _complete(port: int, model: str, prompt: str, worker: Optional[int] = None) -> Tuple[int, Dict[str, object]]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "ignore_eos": True, "min_tokens": 2})
    headers = {"Content-Type": "application/json"}
    if worker is not None:
        headers["x-worker-instance-id"] = str(worker)  # obeyed in kv mode too
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body.encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read().decode(errors="replace")}


def _routing(log: Path) -> List[Tuple[List[int], int, int]]:
    """(local_hashes, chosen worker, overlap blocks) per routed request, in order."""
    text = ANSI.sub("", log.read_text(errors="replace"))
    inputs = {m.group(1): [int(x) for x in m.group(2).split(", ") if x]
              for m in re.finditer(r'\[ROUTING_INPUT\].*?request_id="([^"]+)".*?local_hashes=\[([^\]]*)\]', text)}
    out = []
    for m in re.finditer(r'\[ROUTING\] Best: worker_(\d+) dp_rank=(\d+) with (\d+)/(\d+) blocks overlap '
                         r'request_id="?([0-9a-f-]+)', text):
        out.append((inputs.get(m.group(5), []), int(m.group(1)), int(m.group(3))))
    return out


def test_overlaps_and_hashes_agree_with_the_kv_mode_frontend(release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    python = _release_from(release, (1, 6), "KV events through the ZMQ plane are measured on 1.6.1", monkeypatch)
    with EtcdServer() as etcd:
        mon = WorkerMonitor([etcd.url], None, event_plane="zmq", busy_threshold=0.99, kv_index=True).start()
        fleet = DynamoFleet(python, release, etcd.url, None, blocks=48, busy_threshold=0.99, event_plane=None,
                            frontend_args=("--router-mode", "kv"),
                            frontend_env={"DYN_LOG": "info,dynamo_kv_router=debug,dynamo_llm::kv_router=debug"})
        try:
            fleet.start()
            _until_serving(fleet, mon)
            model = fleet.served_model()
            prompts = [BASE + f"variant {i % 3} " + "x" * (20 + 7 * i) for i in range(12)]
            prompts += [f"{i} unrelated words {i} " * 12 for i in range(6)]  # fill the small caches: evictions
            prompts += [BASE + "variant 1 " + "x" * 30, BASE + "variant 2 " + "x" * 100]
            predicted: List[Tuple[List[int], Dict[Tuple[int, int], int]]] = []
            for prompt in prompts:
                hashes = block_hashes(mon._kv_routing().tokens(None, prompt, None)[0], 16)  # type: ignore[union-attr]
                predicted.append((hashes, mon.prefix_overlap(prompt=prompt)))
                status, body = _complete(fleet.http_port, model, prompt)
                assert status == 200, body
                # The frontend learns the request's blocks from the same events; wait (bounded)
                # until workermon holds them on some worker before the next request is routed.
                ok = mon.wait_for(lambda: max(mon.prefix_overlap(prompt=prompt).values(), default=0) >= len(hashes),
                                  15)
                assert ok, (prompt[:40], mon.health().kv)
            routed = _routing(fleet.workdir / "frontend.log")
            assert len(routed) == len(prompts), fleet.logs()
            kv = mon.health().kv
            assert kv is not None and kv.counters.get("index_removed_blocks", 0) > 0, kv  # evictions happened
            for (hashes, overlaps), (logged_hashes, chosen, logged_overlap) in zip(predicted, routed):
                assert hashes == logged_hashes
                assert overlaps.get((chosen, 0)) == logged_overlap, (overlaps, chosen, logged_overlap)
                assert max(overlaps.values()) == logged_overlap
            assert any(r[2] > 0 for r in routed), "some request should hit a cached prefix"
            # A reservation by the KV router's cost takes the worker with the best overlap once the
            # fleet is idle (every worker's last report drained to 0 active blocks).
            assert mon.wait_for(lambda: all(not any(s.kv_active_blocks.values())
                                            for s in mon.load_states().values()), 20), mon.load_states()
            res = mon.reserve(strategy="kv", prompt=prompts[-1])
            assert res is not None and res.token_ids is not None and len(res.token_ids) >= 16
            best = max(mon.prefix_overlap(prompt=prompts[-1]).values())
            assert res.overlap_blocks == best, (mon._kv_routing().last_pick.costs, mon.load_states())  # type: ignore
            res.release()
            why = str(mon.why(res.worker_id))
            assert "cached block" in why and "last kv pick" in why, why

            # The Flask router in KV mode: tokenized once, picked by prefix, the hashed ids forwarded.
            from examples.flask_router import RouterSettings, create_app

            app = create_app(mon, frontend_url=f"http://127.0.0.1:{fleet.http_port}",
                             settings=RouterSettings(strategy="kv"))
            prompt = prompts[-1]
            want = max(mon.prefix_overlap(prompt=prompt).values())
            r = app.test_client().post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": 2, "nvext": {"extra_fields": ["worker_id"]}})
            assert r.status_code == 200, r.get_data(as_text=True)
            answer = r.get_json()
            assert answer["nvext"]["worker_id"]["decode_worker_id"] == int(r.headers["X-Workermon-Worker"], 16)
            assert answer["usage"]["prompt_tokens"] == len(mon._kv_routing().tokens(None, prompt, None)[0])
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 16 * want

            # The Django middleware in KV mode (its own monitor, started now: its view of earlier
            # blocks is incomplete, so only the forwarding is checked here).
            _django_kv(etcd.url, fleet.http_port, model, prompt, len(mon._kv_routing().tokens(None, prompt, None)[0]))

            # `workermon watch --kv-index --why ID` shows that worker's cached blocks (it starts late:
            # its view fills with what is stored from now on, and says it is incomplete).
            watch = subprocess.Popen(
                [sys.executable, "-m", "workermon", "watch", "--etcd", etcd.url, "--event-plane", "zmq", "--kv-index",
                 "--plain", "--duration", "8", "--interval", "1", "--why", str(res.worker_id)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                assert watch.stdout is not None
                first = watch.stdout.readline()  # the first table: its monitor is ready
                assert first, "watch printed nothing"
                for i in range(4):
                    _complete(fleet.http_port, model, f"fresh prompt {i} " * 20, res.worker_id)
                out = first + watch.communicate(timeout=30)[0]
            finally:
                if watch.poll() is None:
                    watch.kill()
                    watch.wait()
            assert watch.returncode == 0, out
            assert re.search(r"kv rank 0: \d+ cached block\(s\)", out), out[-2000:]

            # Killed workers' blocks leave with their leases (1.6.1: 30 s).
            assert mon._kv_routing().index.worker_ids()
            for p in fleet.mockers:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            assert mon.wait_for(lambda: not mon.members(), 60)
            assert mon.wait_for(lambda: mon.health().kv.counters["index_entries"] == 0, 10)  # type: ignore
            assert not mon._kv_routing().index.slots()
        finally:
            fleet.stop()
            assert mon.stop(10)


def _django_kv(etcd_url: str, port: int, model: str, prompt: str, n_tokens: int) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF="tests.django_urls", SECRET_KEY="test",
                           MIDDLEWARE=["examples.django_middleware.BusyWorkersMiddleware"], INSTALLED_APPS=[])
        django.setup()
    from django.test import Client, override_settings

    from examples import django_middleware

    cfg = {"etcd_endpoints": [etcd_url], "nats_servers": None, "event_plane": "zmq", "busy_threshold": 0.99,
           "kv_index": True}
    with override_settings(WORKERMON=cfg, WORKERMON_FRONTEND_URL=f"http://127.0.0.1:{port}",
                           WORKERMON_STRATEGY="kv"):
        try:
            r = Client().post("/v1/completions", data=json.dumps({
                "model": model, "prompt": prompt, "max_tokens": 2, "nvext": {"extra_fields": ["worker_id"]}}),
                content_type="application/json")
            assert r.status_code == 200
            answer = json.loads(b"".join(r.streaming_content))
            res = r.wsgi_request.workermon_reservation  # type: ignore[attr-defined]
            assert res.token_ids is not None and len(res.token_ids) == n_tokens
            assert answer["usage"]["prompt_tokens"] == n_tokens
            assert answer["nvext"]["worker_id"]["decode_worker_id"] == res.worker_id
            r.close()
        finally:
            django_middleware.reset_monitor()


def test_block_hashes_equal_the_wheels_own_function(release: str) -> None:
    """workermon.block_hashes against 1.6.1's dynamo._core.compute_block_hash_for_seq (lora, salt, sizes)."""
    if version_tuple(release) < (1, 6):
        pytest.skip("measured on 1.6.1")
    import random

    rng = random.Random(7)
    cases = []
    for i in range(200):
        size = rng.choice([1, 4, 16, 32, 64])
        tokens = [rng.randrange(0, 2**32 if i % 5 == 0 else 200_000) for _ in range(rng.randrange(0, 300))]
        cases.append({"tokens": tokens, "size": size, "lora": rng.choice([None, "adapter-a", "ü"]),
                      "salt": rng.choice([None, "tenant-1", ""])})
    script = ("import json, sys\nfrom dynamo._core import compute_block_hash_for_seq as f\n"
              "cases = json.load(sys.stdin)\n"
              "print(json.dumps([f(c['tokens'], c['size'], lora_name=c['lora'], cache_namespace=c['salt']) "
              "for c in cases]))\n")
    out = subprocess.run([_python_for(release), "-c", script], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    theirs = json.loads(out)
    for case, expected in zip(cases, theirs):
        ours = block_hashes(case["tokens"], case["size"], lora_name=case["lora"], cache_salt=case["salt"])
        assert ours == expected, case


def test_kv_events_on_the_nats_plane_follow_what_workers_cache(release: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``DYN_EVENT_PLANE=nats`` with a kv-mode frontend, on each release from 0.9 (three NATS layouts,
    see tests/data/dynamo-samples/README.md): once a prompt has been served, some worker holds all of its
    full blocks in workermon's index, and a worker stopped takes its blocks with it."""
    python = _release_from(release, (0, 9), "KV events on NATS are measured from 0.9.1 on", monkeypatch)
    with EtcdServer() as etcd, NatsServer(jetstream=True) as nats:
        mon = WorkerMonitor([etcd.url], [nats.url], event_plane="nats", busy_threshold=0.99, kv_index=True).start()
        fleet = DynamoFleet(python, release, etcd.url, nats.url, workers=2, blocks=256, busy_threshold=0.99,
                            event_plane="nats", frontend_args=("--router-mode", "kv"))
        try:
            _served_prompts_are_followed(mon, fleet)
        finally:
            fleet.stop()
            assert mon.stop(10)


def test_kv_events_through_a_zmq_broker_follow_what_workers_cache(release: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``DYN_ZMQ_BROKER_URL`` (workers publish to a broker and register no channels) with a kv-mode frontend."""
    import zmq

    from ..helpers import ZmqBroker

    python = _release_from(release, (1, 6), "broker mode is measured on 1.6.1", monkeypatch)
    ctx = zmq.Context()
    broker = ZmqBroker(ctx)
    monkeypatch.setenv("DYN_ZMQ_BROKER_URL", f"xsub=tcp://127.0.0.1:{broker.xsub_port} , "
                                             f"xpub=tcp://127.0.0.1:{broker.xpub_port}")
    try:
        with EtcdServer() as etcd:
            mon = WorkerMonitor([etcd.url], None, event_plane="zmq", busy_threshold=0.99, kv_index=True).start()
            fleet = DynamoFleet(python, release, etcd.url, None, workers=2, blocks=256, busy_threshold=0.99,
                                event_plane=None, frontend_args=("--router-mode", "kv"))
            try:
                _served_prompts_are_followed(mon, fleet)
                assert not mon.health().zmq.counters.get("malformed"), mon.health().zmq
            finally:
                fleet.stop()
                assert mon.stop(10)
    finally:
        broker.close()
        ctx.term()


def _served_prompts_are_followed(mon: WorkerMonitor, fleet: DynamoFleet) -> None:
    fleet.start()
    _until_serving(fleet, mon)
    model = fleet.served_model()
    for i in range(4):
        prompt = BASE + f"variant {i % 2} " + "y" * (10 + 9 * i)
        full = len(block_hashes(mon._kv_routing().tokens(None, prompt, None)[0], 16))
        status, body = _complete(fleet.http_port, model, prompt)
        assert status == 200, body
        ok = mon.wait_for(lambda: max(mon.prefix_overlap(prompt=prompt).values(), default=0) >= full, 15)
        assert ok, (fleet.version, prompt[:40], mon.prefix_overlap(prompt=prompt), mon.health().kv, fleet.logs())
    kv = mon.health().kv
    assert kv is not None and kv.state == "connected" and not kv.counters.get("malformed"), kv
    assert all(v.complete for v in mon._kv_routing().index.slots()), mon._kv_routing().index.slots()
    assert mon._kv_routing().index.worker_ids()
    for p in fleet.mockers:  # SIGTERM: from 0.8 a worker revokes its lease as it leaves
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
    assert mon.wait_for(lambda: not mon.members(), 60)
    assert mon.wait_for(lambda: not mon._kv_routing().index.worker_ids(), 10), mon.health().kv
