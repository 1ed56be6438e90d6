"""The two baselines the benchmarks compare against.

``NaiveSubscriber``: a bare nats-py subscriber on a thread's loop whose
callback JSON-decodes each message into a ``queue.Queue`` that another thread
drains into a dict — the obvious first design.

``NaivePort``: the seed's reducer shape — after every event, recompute the
busy set by scanning every worker.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from typing import Any, Dict, Optional, Set, Tuple


class NaiveSubscriber:
    def __init__(self, url: str, subject: str, marker_value: int) -> None:
        self.url, self.subject, self.marker_value = url, subject, marker_value
        self.q: "queue.Queue[Optional[dict]]" = queue.Queue()
        self.state: Dict[Tuple[int, int], int] = {}
        self.count = 0
        self.done = threading.Event()
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: Optional[asyncio.Future[None]] = None
        self._net = threading.Thread(target=self._run_loop, name="naive-nats")
        self._apply = threading.Thread(target=self._run_apply, name="naive-apply")

    def start(self) -> "NaiveSubscriber":
        self._net.start()
        self._apply.start()
        assert self.ready.wait(10)
        return self

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        import nats

        self._stop = asyncio.get_running_loop().create_future()

        async def cb(msg: Any) -> None:
            self.q.put(json.loads(msg.data))

        async def err(e: Exception) -> None:
            pass

        nc = await nats.connect(self.url, error_cb=err, max_reconnect_attempts=-1)
        await nc.subscribe(self.subject, cb=cb)
        await nc.flush()
        self.ready.set()
        await self._stop
        await nc.close()

    def _run_apply(self) -> None:
        while True:
            d = self.q.get()
            if d is None:
                return
            rank = d["data"]["worker_stats"]["data_parallel_rank"] or 0
            value = d["data"]["kv_stats"]["kv_active_blocks"]
            self.state[(d["worker_id"], rank)] = value
            self.count += 1
            if value == self.marker_value:
                self.done.set()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._net.join(10)
        self.q.put(None)
        self._apply.join(10)


class NaivePort:
    """Seed-style reducer: scan the whole fleet after each event."""

    def __init__(self, totals: Dict[int, int], threshold: float = 0.9) -> None:
        self.totals = dict(totals)
        self.active: Dict[int, int] = {}
        self.threshold = threshold
        self.busy: Set[int] = set()
        self.changes = 0

    def apply(self, raw: bytes) -> None:
        d = json.loads(raw)
        self.active[d["worker_id"]] = d["data"]["kv_stats"]["kv_active_blocks"]
        busy = {w for w, total in self.totals.items()
                if total > 0 and self.active.get(w, 0) > self.threshold * total}
        if busy != self.busy:
            self.busy = busy
            self.changes += 1
