"""Dynamo 1.6's ZMQ event plane against real etcd and real ZMQ sockets on loopback.

Publishers are WorkerPublisher(event_plane="zmq") (an XPUB socket: the same
wire as a 1.6 worker's PUB, and it hears subscriptions, so a test can wait for
the monitor's connection instead of sleeping), or raw sockets for hostile
frames and brokers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List

import msgspec
import pytest
import zmq

from workermon import Limits, WorkerMonitor, WorkerPublisher
from workermon._parse import Malformed, parse_channel, parse_load, parse_zmq_frames
from workermon._servers import EtcdServer, NatsServer, free_port

from .helpers import SAMPLES, Make, ZmqBroker, wait_until



@pytest.fixture(autouse=True)
def no_plane_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DYN_EVENT_PLANE", "NATS_SERVER", "DYN_ZMQ_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def zmon(etcd_server: EtcdServer, namespace: str) -> Iterator[Make]:
    made: List[WorkerMonitor] = []

    def make(**kwargs: Any) -> WorkerMonitor:
        kwargs.setdefault("namespace", namespace)
        mon = WorkerMonitor([etcd_server.url], **kwargs)
        made.append(mon)
        return mon

    yield make
    for mon in made:
        assert mon.stop(timeout=10)


# --- end to end ----------------------------------------------------------------------------

def test_only_etcd_endpoints_ready_and_tracks_load_over_zmq(zmon: Make, zworkers: Any) -> None:
    pub = zworkers()
    # 1.6 defaults: no NATS anywhere (nothing listens on 4222 here), only etcd.
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10)
    h = mon.health()
    assert h.required == ("etcd", "zmq") and h.zmq.state == "connected"
    assert mon.members() == {pub.worker_id}
    assert pub.wait_subscribed(10)
    pub.report(950)
    assert mon.wait_for(lambda: mon.busy_workers() == {pub.worker_id}, 10)
    st = mon.load_state(pub.worker_id)
    assert st is not None and dict(st.kv_used_blocks) == {0: 950} and st.data_parallel_size == 1
    pub.report(10)
    assert mon.wait_for(lambda: mon.free_workers() == {pub.worker_id}, 10)
    h = mon.health().zmq
    assert h.counters["messages"] == 2 and h.counters["endpoints_connected"] == 1
    assert h.counters.get("malformed", 0) == 0 and h.counters.get("unknown_publisher", 0) == 0


def test_channel_key_gone_disconnects(zmon: Make, zworkers: Any) -> None:
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10)
    pubs = [zworkers(), zworkers()]
    assert mon.wait_for(lambda: mon.health().zmq.counters.get("endpoints_connected") == 2, 10)
    pubs[0].stop()  # revokes its lease: the card and the channel go
    assert mon.wait_for(lambda: mon.members() == {pubs[1].worker_id}, 10)
    assert wait_until(lambda: mon.health().zmq.counters.get("endpoints_connected") == 1)
    assert mon.health().zmq.counters["disconnects"] == 1


def test_killed_worker_leaves_within_ttl(zmon: Make, zworkers: Any) -> None:
    pub = zworkers(lease_ttl=2)
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10) and mon.members() == {pub.worker_id}
    assert pub.wait_subscribed(10)
    pub.report(999)
    assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
    killed = time.monotonic()
    pub.stop(revoke=False)  # as SIGKILL: no revoke, the lease expires
    assert mon.wait_for(lambda: not mon.members(), 10)
    assert time.monotonic() - killed <= 2 + 1.5
    assert wait_until(lambda: mon.health().zmq.counters.get("endpoints_connected") == 0)


def test_data_parallel_worker_over_zmq(zmon: Make, zworkers: Any) -> None:
    pub = zworkers(data_parallel_size=2)
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10) and pub.wait_subscribed(10)
    pub.report(950, dp_rank=1)
    assert mon.wait_for(lambda: (mon.load_state(pub.worker_id) or _none()).kv_used_blocks.get(1) == 950, 10)
    assert not mon.is_busy(pub.worker_id)  # rank 0 never reported: counts as free
    pub.report(950, dp_rank=0)
    assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
    pub.report(950, dp_rank=5)  # outside the declared ranks
    assert mon.wait_for(lambda: mon.health().reducer.get("dropped_rank_out_of_range", 0) == 1, 10)


def _none() -> Any:
    from workermon import WorkerLoadState

    return WorkerLoadState(0, None)


def test_stop_wakes_the_zmq_poll(zmon: Make) -> None:
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10)
    started = time.monotonic()
    assert mon.stop(timeout=2)
    assert time.monotonic() - started < 1.0


# --- hostile frames -------------------------------------------------------------------------

def test_bad_frames_are_counted_per_reason_and_dropped(zmon: Make, zworkers: Any) -> None:
    pub = zworkers()
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10) and pub.wait_subscribed(10)
    good = pub.zmq_frames(pub.load_message(950))
    topic, pid, seq, body = good
    other_env = msgspec.msgpack.encode({"publisher_id": pub.publisher_id + 1, "sequence": 0, "published_at": 0,
                                        "topic": "kv_metrics", "payload": pub.load_message(1)})
    bad = {
        "bad_frame_count": [topic, pid, seq],
        "bad_publisher_id": [topic, pid[:4], seq, body],
        "bad_sequence": [topic, pid, seq + b"\0", body],
        "bad_header": [topic, pid, seq, b"\x02" + body[1:]],
        "bad_length": [topic, pid, seq, body[:1] + (len(body)).to_bytes(4, "big") + body[5:]],
        "identity_mismatch": [topic, pid, seq, b"\x01" + len(other_env).to_bytes(4, "big") + other_env],
        "bad_envelope": [topic, pid, seq, b"\x01\x00\x00\x00\x03abc"],
        "wrong_topic": [b"kv_metrics_extra", pid, seq, body],
    }
    for frames in bad.values():
        pub.send_frames(frames)
    # A payload that is not ActiveLoad passes the frame checks and is counted by the reducer.
    pub.send_frames(pub.zmq_frames(msgspec.msgpack.encode({"worker_id": "not a number"})))
    pub.send_frames(good)
    assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
    c = mon.health().zmq.counters
    for reason in bad:
        assert c.get(f"malformed_{reason}") == 1, (reason, c)
    assert c["identity_mismatch"] == 1
    assert mon.health().reducer["malformed_load_bad_field"] == 1
    assert all(t.is_alive() for t in mon._threads)


def test_unknown_publisher_is_counted_and_applied(zmon: Make, zworkers: Any) -> None:
    pub = zworkers()
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10) and pub.wait_subscribed(10)
    saved = pub.publisher_id
    pub.publisher_id = saved + 7  # a publisher no channel names, for a known worker (as the 1.6 frontend counts)
    pub.report(990)
    pub.publisher_id = saved
    assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
    assert mon.health().zmq.counters["unknown_publisher"] == 1


# --- broker mode ----------------------------------------------------------------------------

def test_broker_mode_dedups_across_brokers(zmon: Make, zworkers: Any, namespace: str) -> None:
    pub = zworkers()  # registers the card; its own XPUB is not used in broker mode
    ctx = zmq.Context()
    brokers = [ZmqBroker(ctx), ZmqBroker(ctx)]
    out = ctx.socket(zmq.PUB)
    try:
        for b in brokers:
            out.connect(f"tcp://127.0.0.1:{b.xsub_port}")
        url = (f"xsub=tcp://127.0.0.1:{brokers[0].xsub_port};tcp://127.0.0.1:{brokers[1].xsub_port} , "
               f"xpub=tcp://127.0.0.1:{brokers[0].xpub_port};tcp://127.0.0.1:{brokers[1].xpub_port}")
        mon = zmon(zmq_broker_url=url)
        mon.start()
        assert mon.wait_ready(10)
        subject = f"namespace.{namespace}.component.backend.endpoint.generate.kv_metrics".encode()

        def send(value: int, sequence: int) -> None:
            frames = pub.zmq_frames(pub.load_message(value), sequence=sequence)
            out.send_multipart([subject] + frames[1:])

        # No replay in ZMQ: resend the first report until the subscription is
        # through both brokers (the second copy of a message is a duplicate).
        seq = 0
        while not mon.wait_for(lambda: mon.is_busy(pub.worker_id)
                               and mon.health().zmq.counters.get("duplicates", 0) > 0, 0.1):
            send(999, seq)
            seq += 1
            assert seq < 200
        dup_before = mon.health().zmq.counters.get("duplicates", 0)
        for k in range(50):
            send(10 if k == 49 else 999, seq + k)
        assert mon.wait_for(lambda: not mon.is_busy(pub.worker_id), 10)
        # Each of the 50 came through both brokers: one copy applied, one dropped.
        assert wait_until(lambda: mon.health().zmq.counters.get("duplicates", 0) - dup_before >= 50)
        applied = mon.health().reducer["load_reports"]
        assert 50 <= applied <= seq + 50  # never a message applied twice
    finally:
        out.close(linger=0)
        for b in brokers:
            b.close()
        ctx.term()


# --- choosing the plane ---------------------------------------------------------------------

def test_event_plane_option_and_environment(etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        WorkerMonitor([etcd_server.url], event_plane="kafka")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WorkerMonitor([etcd_server.url], ["nats://127.0.0.1:4222"], event_plane="zmq")
    monkeypatch.setenv("DYN_EVENT_PLANE", "nats")
    assert WorkerMonitor([etcd_server.url]).event_plane == "nats"
    monkeypatch.setenv("DYN_EVENT_PLANE", "zmq")
    mon = WorkerMonitor([etcd_server.url])
    assert mon.event_plane == "zmq" and mon._nats_cfg is None
    monkeypatch.delenv("DYN_EVENT_PLANE")
    assert WorkerMonitor([etcd_server.url]).event_plane == "auto"
    with pytest.raises(ValueError):
        WorkerMonitor([etcd_server.url], zmq_broker_url="xsub=tcp://h:1")


def test_unreachable_nats_holds_readiness_only_when_asked_for(zmon: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    asked = zmon(nats_servers=[dead])
    asked.start()
    assert not asked.wait_ready(1.0)
    monkeypatch.setenv("NATS_SERVER", dead)
    from_env = zmon()
    from_env.start()
    assert not from_env.wait_ready(1.0)
    monkeypatch.delenv("NATS_SERVER")
    default = zmon()  # auto, NATS not asked for: the default server is a best effort
    default.start()
    assert default.wait_ready(10)
    nats_only = zmon(event_plane="nats")
    assert nats_only._zmq_cfg is None


def test_auto_mode_reads_nats_too(zmon: Make, nats_server: NatsServer, etcd_server: EtcdServer,
                                  namespace: str) -> None:
    pub = WorkerPublisher([etcd_server.url], [nats_server.url], namespace=namespace, total_kv_blocks=1000,
                          load_format="active_load").start()
    try:
        mon = zmon(nats_servers=[nats_server.url])
        mon.start()
        assert mon.wait_ready(10)
        pub.report(990)
        assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
    finally:
        pub.stop()


# --- golden: the 1.6.1 captures -------------------------------------------------------------

def _zmq_samples() -> List[dict]:
    path = SAMPLES / "1.6.1-zmq-frames.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_real_event_channels_parse() -> None:
    dump = json.loads((SAMPLES / "1.6.1-zmq-etcd.json").read_text())
    kv = 0
    for entry in dump["keys"]:
        if not entry["key"].startswith("v1/event_channels/"):
            continue
        value = json.dumps(entry["value"]).encode()
        ch = parse_channel(entry["key"], value, entry["lease_dec"])
        if entry["value"]["topic"] != "kv_metrics":
            assert ch is None
            continue
        kv += 1
        assert ch is not None
        assert ch.worker_id == entry["lease_dec"] and ch.publisher_id == entry["value"]["instance_id"]
        assert ch.endpoint == entry["value"]["transport"]["config"]["endpoint"]
        assert entry["key"].endswith(f"/{ch.publisher_id:x}")
    assert kv == 2


def test_real_zmq_frames_parse_and_our_publisher_matches_them() -> None:
    kv = [m for m in _zmq_samples() if m.get("channel_topic") == "kv_metrics" and "envelope" in m]
    assert kv
    for m in kv:
        env = m["envelope"]
        payload = msgspec.msgpack.encode(env["payload"])
        # Our publisher's frames for the same values, compared with the capture.
        pub = WorkerPublisher(["http://127.0.0.1:1"], event_plane="zmq")
        pub.publisher_id = env["publisher_id"]
        frames = pub.zmq_frames(payload, published_at_ms=env["published_at"], sequence=env["sequence"])
        assert [len(f) for f in frames] == m["frame_lens"]
        assert frames[1] == env["publisher_id"].to_bytes(8, "big") and frames[2] == env["sequence"].to_bytes(8, "big")
        if "frames_hex" in m:
            for ours, theirs in zip(frames, m["frames_hex"]):
                assert ours.hex().startswith(theirs)
        pid, seq, body = parse_zmq_frames(frames, b"kv_metrics")
        assert (pid, seq) == (env["publisher_id"], env["sequence"])
        report = parse_load(body, bare=True)
        assert report.worker_id == env["payload"]["worker_id"]
        assert report.kv_active_blocks == env["payload"]["kv_used_blocks"]
        assert report.dp_rank == env["payload"]["dp_rank"]
        if "payload_hex" in env:
            assert body.hex().startswith(env["payload_hex"])


def test_our_zmq_publisher_card_and_channel_match_1_6_1() -> None:
    dump = json.loads((SAMPLES / "1.6.1-zmq-etcd.json").read_text())
    real_channel = next(e["value"] for e in dump["keys"] if e["key"].startswith("v1/event_channels/")
                        and e["value"]["topic"] == "kv_metrics")
    real_card = next(e["value"] for e in dump["keys"] if e["key"].startswith("v1/mdc/"))
    pub = WorkerPublisher(["http://127.0.0.1:1"], event_plane="zmq")
    pub.zmq_endpoint = "tcp://127.0.0.1:1"
    ours = pub.channel()
    assert set(ours) == set(real_channel) and ours["scope"] == real_channel["scope"]
    assert ours["transport"]["kind"] == real_channel["transport"]["kind"] == "Zmq"
    card = pub.card()
    assert {k for k in real_card if k != "card_json"} <= set(card)
    rc, real_rc = card["card_json"]["runtime_config"], real_card["card_json"]["runtime_config"]
    for field in ("total_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "data_parallel_size",
                  "data_parallel_start_rank"):
        assert field in rc and field in real_rc
    assert card["card_json"]["worker_type"] == "aggregated"


@pytest.mark.parametrize("frames, reason", [
    ([], "bad_frame_count"),
    ([b"kv_metrics"] * 5, "bad_frame_count"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b""], "bad_header"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\x01\x00\x00\x00"], "bad_header"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\x01\x00\x10\x00\x00" + b"x" * 10], "bad_length"),
    ([b"kv_metrics", b"\0" * 8, b"\0" * 8, b"\x01\x00\x00\x00\x01\xc1"], "bad_envelope"),
])
def test_frame_rejections(frames: List[bytes], reason: str) -> None:
    with pytest.raises(Malformed) as exc:
        parse_zmq_frames(frames, b"kv_metrics")
    assert exc.value.reason == reason


def test_oversized_zmq_payload() -> None:
    env = msgspec.msgpack.encode({"publisher_id": 1, "sequence": 0, "published_at": 0, "topic": "kv_metrics",
                                  "payload": b"x" * 70_000})
    frames = [b"kv_metrics", (1).to_bytes(8, "big"), (0).to_bytes(8, "big"),
              b"\x01" + len(env).to_bytes(4, "big") + env]
    with pytest.raises(Malformed) as exc:
        parse_zmq_frames(frames, b"kv_metrics", max_bytes=65536)
    assert exc.value.reason == "oversized"


_HOSTILE = r"""
import sys
from workermon import WorkerPublisher
pub = WorkerPublisher([sys.argv[1]], event_plane="zmq", namespace=sys.argv[2], total_kv_blocks=1000).start()
print(pub.worker_id, flush=True)
assert pub.wait_subscribed(30)
good = pub.zmq_frames(pub.load_message(950))
mb = b"x" * (1 << 20)
pub.send_frames(good + [mb] * 150)                          # 150 MB in 154 frames
pub.send_frames(good[:3] + [b"\x01" + b"y" * (150 << 20)])  # one 150 MB frame
pub.report(950)
print("sent", flush=True)
sys.stdin.read()
pub.stop()
"""


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def test_one_huge_message_takes_bounded_memory(zmon: Make, etcd_server: EtcdServer, namespace: str) -> None:
    """300 MB in two messages from another process: read past frame by frame, never held."""
    mon = zmon(limits=Limits(max_load_bytes=64 * 1024))
    mon.start()
    assert mon.wait_ready(10)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here
    base = _vm("VmRSS")
    proc = subprocess.Popen([sys.executable, "-c", _HOSTILE, etcd_server.url, namespace],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        wid = int(proc.stdout.readline())
        assert mon.wait_for(lambda: mon.is_busy(wid), 60), mon.health().zmq
        peak = _vm("VmHWM") - base
        c = mon.health().zmq.counters
        assert c["malformed_bad_frame_count"] == 1 and c["malformed_oversized"] == 1, c
        assert c["max_message_bytes"] < 100 * 1024
        # One receive chunk and one message within the limits per connection, not 150 MB.
        assert peak < 32 * 1024 * 1024, f"peak RSS grew by {peak / 2**20:.0f} MiB"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_every_source_reports_its_own_backlog(zmon: Make, zworkers: Any) -> None:
    pub = zworkers()
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10) and pub.wait_subscribed(10)
    pub.report(950)
    assert mon.wait_for(lambda: mon.is_busy(pub.worker_id), 10)
    h = mon.health()
    # The ZMQ source's backlog was never reported before the sources shared one shape.
    assert h.zmq.counters["queued_items"] == 0 and h.zmq.counters["queued_bytes"] == 0
    assert "queued_items" in h.etcd.counters


# --- Dynamo 1.3's older event-channel layout (issue 19) ------------------------------------

# Captured from a real 1.3.1 mocker fleet (its defaults: the ZMQ plane): the kv_metrics channel has an empty
# component in its key and a flat value.
_KEY_13 = "v1/event_channels/dynamo//kv_metrics/62dabde3b0129c92"
_VALUE_13 = (b'{"type":"EventChannel","namespace":"dynamo","component":"","topic":"kv_metrics",'
             b'"instance_id":7123214546249096338,"transport":{"kind":"Zmq","config":'
             b'{"endpoint":"tcp://127.0.0.1:43457"}}}')


def test_the_1_3_layout_parses_and_is_scoped() -> None:
    ch = parse_channel(_KEY_13, _VALUE_13, 0x7725A24A98E4200C, namespace="dynamo", component="backend")
    assert ch is not None and ch.worker_id == 0x7725A24A98E4200C and ch.publisher_id == 7123214546249096338
    assert ch.endpoint == "tcp://127.0.0.1:43457"
    assert parse_channel(_KEY_13, _VALUE_13, 1, namespace="other") is None
    other_topic = "v1/event_channels/dynamo/backend/kv-events/66b506ffbc368dd8"
    assert parse_channel(other_topic, _VALUE_13, 1, namespace="dynamo") is None
    with pytest.raises(Malformed) as err:
        parse_channel("v1/event_channels/v9/dynamo/backend/kv_metrics/x/1", _VALUE_13, 1, namespace="dynamo")
    assert err.value.reason == "unknown_layout"


def _as_1_3(pub: WorkerPublisher, etcd_url: str) -> None:
    """Re-register a ZMQ publisher's channel as a 1.3 worker does (same lease, older key and value)."""
    from .helpers import etcd_client

    client = etcd_client(etcd_url)
    try:
        client.delete(pub.channel_key)
        value = {"type": "EventChannel", "namespace": pub.namespace, "component": "", "topic": "kv_metrics",
                 "instance_id": pub.publisher_id,
                 "transport": {"kind": "Zmq", "config": {"endpoint": pub.zmq_endpoint}}}
        client.put(f"v1/event_channels/{pub.namespace}//kv_metrics/{pub.publisher_id:x}", json.dumps(value),
                   lease=pub.worker_id)
    finally:
        client.close()


def test_a_fleet_mixing_1_3_and_1_6_channel_layouts(zmon: Make, zworkers: Any, etcd_server: EtcdServer) -> None:
    old, new = zworkers(), zworkers()
    _as_1_3(old, etcd_server.url)
    mon = zmon()
    mon.start()
    assert mon.wait_ready(10) and old.wait_subscribed(10) and new.wait_subscribed(10)
    old.report(950)
    new.report(950)
    assert mon.wait_for(lambda: mon.busy_workers() == {old.worker_id, new.worker_id}, 10)
    assert mon.health().zmq.counters["endpoints_connected"] == 2
    assert mon.health().zmq.last_error is None


def test_an_unknown_channel_layout_is_said_in_words(zmon: Make, zworkers: Any, etcd_server: EtcdServer,
                                                    namespace: str) -> None:
    from .helpers import etcd_client

    mon = zmon()
    mon.start()
    assert mon.wait_ready(10)
    client = etcd_client(etcd_server.url)
    key = f"v1/event_channels/v9/{namespace}/backend/generate/kv_metrics/abc"
    try:
        client.put(key, _VALUE_13.decode())
        # A refused key changes no state, so there is no batch to wait for: a bounded poll.
        assert wait_until(lambda: "unknown layout" in (mon.health().zmq.last_error or ""), 10)
        assert key in str(mon.health().zmq.last_error)
    finally:
        client.delete(key)
        client.close()
