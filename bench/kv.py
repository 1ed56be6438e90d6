"""KV-aware picking benchmarks (rows for ``python -m bench``).

- kv-events applied per second: msgpack payloads as 1.6.1 publishes them
  (one ``stored`` event of 8 chained blocks per message, a ``removed`` every
  fourth), decoded and applied to the index;
- ``reserve(strategy="kv")`` for a 2,000-token prompt over 16 workers ×
  20,000 cached blocks: block hashes, the index walk, the cost of every rank
  and the booking, p50/p99 (tokenization measured apart);
- bytes per cached (worker, block), by ``tracemalloc``: blocks named by their
  sequence hash (Dynamo's mocker) and by an engine's own names (a map more).
"""

from __future__ import annotations

import math
import statistics
import time
import tracemalloc
from typing import Any, List, Tuple

import msgspec

from workermon import block_hashes
from workermon._kvhash import chain_hash, sequence_hashes
from workermon._kvindex import KvIndex, decode_kv_payload


def _stored(wid: int, eid: int, parent: Any, locals_: List[int], engine_names: bool = False) -> bytes:
    blocks = []
    seq = parent
    for x in locals_:
        seq = x if seq is None else chain_hash(seq, x)
        blocks.append({"block_hash": (seq ^ 0x9E3779B97F4A7C15) if engine_names else seq, "tokens_hash": x,
                       "mm_extra_info": None})
    ev = {"worker_id": wid, "storage_tier": "device", "residency_domain": "worker",
          "event": {"event_id": eid, "dp_rank": 0,
                    "data": {"stored": {"parent_hash": parent, "start_position": None, "blocks": blocks}}}}
    return msgspec.msgpack.encode([ev])


def _fill(index: KvIndex, workers: int, blocks: int, engine_names: bool = False) -> None:
    """Each worker holds ``blocks`` distinct blocks in chains of 125 (2,000-token prompts)."""
    for w in range(1, workers + 1):
        eid = 1
        for c in range(blocks // 125):
            local = [(w << 40) | (c << 16) | i for i in range(125)]
            index.apply(decode_kv_payload(_stored(w, eid, None, local, engine_names)), publisher_id=w)
            eid += 1


def events_per_second(n: int) -> float:
    index = KvIndex()
    payloads = []
    eid = {}
    for i in range(n):
        w = 1 + i % 16
        eid[w] = eid.get(w, 0) + 1
        local = [(w << 40) | (i << 8) | j for j in range(8)]
        if i % 4 == 3:
            ev = {"worker_id": w, "storage_tier": "device", "residency_domain": "worker",
                  "event": {"event_id": eid[w], "dp_rank": 0,
                            "data": {"removed": {"block_hashes": [sequence_hashes(local)[0]]}}}}
            payloads.append((w, msgspec.msgpack.encode([ev])))
        else:
            payloads.append((w, _stored(w, eid[w], None, local)))
    t = time.perf_counter()
    for w, p in payloads:
        index.apply(decode_kv_payload(p), publisher_id=w)
    return n / (time.perf_counter() - t)


def reserve_latency(rounds: int) -> Tuple[float, float, float]:
    from workermon._kvroute import KvRouting
    from workermon._model import Card, CardPut, Thresholds
    from workermon._picker import Picker
    from workermon._reduce import FleetState, apply_all
    from workermon.options import KvOptions

    s = FleetState(Thresholds(busy_threshold=0.9))
    apply_all(s, [CardPut(f"v1/mdc/ns/c/e/{i:x}", i, Card(total_kv_blocks=100_000, display_name="m",
                                                         kv_cache_block_size=16)) for i in range(1, 17)], 0.0)
    picker = Picker(s, lambda: tuple(sorted(s.members - s.busy)), time.monotonic)
    kv = KvRouting(KvOptions(), s, picker, lambda: frozenset(s.members))
    _fill(kv.index, 16, 20_000)
    tokens = list(range(2000))
    # Worker 3 holds the first 100 blocks of this prompt.
    local = block_hashes(tokens, 16)
    kv.index.apply(decode_kv_payload(_stored(3, 10_000, None, local[:100])), publisher_id=3)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        local = block_hashes(tokens, 16)
        chosen = picker.pick(book=True, blocks=math.ceil(len(tokens) / 16),
                             choose_fn=kv.chooser(local, len(tokens), 16, (), "m", None))
        times.append(time.perf_counter() - t)
        assert chosen is not None and chosen[3] is not None
        chosen[3].release()
    times.sort()
    tok = _tokenize_cost()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))], tok


def _tokenize_cost() -> float:
    """Median seconds to encode ~2,000 tokens of English with a real BPE (GPT-2's, built here), else NaN."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return float("nan")
    text = ("The quick brown fox jumps over the lazy dog while the router reads its cache. " * 160)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    from tokenizers import trainers

    tok.train_from_iterator([text] * 4, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    times = []
    for _ in range(30):
        t = time.perf_counter()
        tok.encode(text[:10_000])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bytes_per_block(workers: int, blocks: int, engine_names: bool) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = KvIndex()
    _fill(index, workers, blocks, engine_names)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert index.entries == workers * (blocks // 125) * 125
    return (after - before) / index.entries


def rows(smoke: bool) -> List[Tuple[str, str, str, str]]:
    n = 5_000 if smoke else 100_000
    rate = events_per_second(n)
    p50, p99, tok = reserve_latency(20 if smoke else 300)
    per = bytes_per_block(4 if smoke else 16, 2_000 if smoke else 20_000, False)
    per_engine = bytes_per_block(4 if smoke else 8, 2_000 if smoke else 20_000, True)
    return [
        ("kv-events applied (8-block stored / removed, decoded)", f"{rate:,.0f} events/s", "measured", ""),
        ("reserve(strategy='kv'), 2,000 tokens, 16 workers × 20k blocks",
         f"p50 {p50 * 1e3:.2f} ms / p99 {p99 * 1e3:.2f} ms", "hashes + walk + cost + booking",
         f"tokenizing 2,000 tokens apart: {tok * 1e3:.2f} ms"),
        ("KV index bytes per cached (worker, block), mocker names", f"{per:.0f} B", "≤ 200 B (plain tree ~445 B)",
         "✅" if per <= 200 else "❌"),
        ("KV index bytes per cached (worker, block), engine names", f"{per_engine:.0f} B", "≤ 200 B",
         "✅" if per_engine <= 200 else "❌"),
    ]


if __name__ == "__main__":
    for r in rows(smoke=False):
        print(r)
