"""WorkerMonitor's KV-aware methods (``kv_index=True``): prefix overlap and ``reserve(strategy="kv")``.

A mixin, as :mod:`workermon._loop` is: the facade stays one class for users
while each part of it lives in a module of its own.  It reads the monitor's
``_kv`` (a :class:`~workermon._kvroute.KvRouting`, or None), ``_picker`` and
``_kv_status`` and ``_kv_sources``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Collection, Dict, Optional, Sequence, Tuple, Union

from ._health import SourceHealth, SourceStatus
from ._kvroute import KvRouting
from ._picker import Picker, Reservation
from ._sources.kvevents import KvSource
from ._tokens import Prompt

__all__ = ["KvMethods"]


class KvMethods:
    _kv: Optional[KvRouting]
    _picker: Picker
    _kv_status: SourceStatus
    _kv_sources: Tuple[KvSource, ...]

    def _kv_routing(self) -> KvRouting:
        if self._kv is None:
            raise RuntimeError("KV-aware picking needs WorkerMonitor(kv_index=True) (it follows the workers' "
                               "kv-events on their event plane, ZMQ or NATS)")
        return self._kv

    def prefix_overlap(self, tokens: Optional[Sequence[int]] = None, *, prompt: Optional[Prompt] = None,
                       model: Optional[str] = None, lora_name: Optional[str] = None,
                       cache_salt: Optional[str] = None, tokenizer: Any = None) -> Dict[Tuple[int, int], int]:
        """How many of the prompt's leading full blocks each member (and rank) holds on its device tier.

        Every admitted member serving ``model`` (the only model, when None)
        is in the answer, 0 when it holds none.  Give ``tokens`` (token ids)
        or ``prompt`` (a completion's text, or chat messages rendered with the
        model's chat template), tokenized by the model's own tokenizer as its
        card names it (``tokenizer=`` when those files are not on this host).
        A worker whose view is incomplete (see ``why()``) counts what arrived
        since.  Any thread.
        """
        kv = self._kv_routing()
        ids, card = kv.tokens(tokens, prompt, model, tokenizer)
        local = kv.local_hashes(ids, card, lora_name, cache_salt)
        return kv.prefix_overlap(local, model if model is not None else card.display_name)

    def reserve_kv_request(self, body: Union[bytes, Dict[str, Any]], *, exclude: Collection[int] = ()
                           ) -> Tuple[Optional[Reservation], Union[bytes, Dict[str, Any]]]:
        """``reserve(strategy="kv")`` for an OpenAI request body; returns the reservation and the body to forward.

        ``body``: the decoded JSON object, or the raw bytes (answered in
        bytes).  The prompt is its ``messages`` (chat, rendered with the
        model's template) or ``prompt`` (completions); ``model`` names the
        model when a member serves it under that name.  The body returned
        carries ``"nvext": {"token_data": ids}`` (the ids that were hashed),
        so the worker runs exactly them; a body that is not a JSON object or
        has no prompt is picked by load (the monitor's strategy) and returned
        unchanged.  Any thread.
        """
        doc: Any = body
        if isinstance(body, (bytes, bytearray)):
            try:
                doc = json.loads(body or b"")
            except ValueError:
                doc = None  # not JSON: by load; the frontend answers it
        prompt = doc.get("messages") if isinstance(doc, dict) and isinstance(doc.get("messages"), list) else (
            doc.get("prompt") if isinstance(doc, dict) else None)
        if not isinstance(prompt, (str, list)) or not prompt:
            return self.reserve(exclude=exclude), body  # type: ignore[attr-defined]
        model = doc.get("model") if isinstance(doc.get("model"), str) else None
        try:
            res = self.reserve(strategy="kv", prompt=prompt, model=model, exclude=exclude)  # type: ignore
        except LookupError:
            res = self.reserve(strategy="kv", prompt=prompt, exclude=exclude)  # type: ignore  # another name
        if res is None or res.token_ids is None:
            return res, body
        nvext = doc.get("nvext")
        extra: Dict[str, Any] = dict(nvext) if isinstance(nvext, dict) else {}
        out = {**doc, "nvext": {**extra, "token_data": res.token_ids}}
        return res, json.dumps(out).encode() if isinstance(body, (bytes, bytearray)) else out

    def _reserve_kv(self, tokens: Optional[Sequence[int]], prompt: Optional[Prompt], model: Optional[str],
                    worker_type: Optional[str], exclude: Collection[int], lora_name: Optional[str],
                    cache_salt: Optional[str], tokenizer: Any) -> Optional[Reservation]:
        kv = self._kv_routing()
        ids, card = kv.tokens(tokens, prompt, model, tokenizer)
        local = kv.local_hashes(ids, card, lora_name, cache_salt)
        size = card.kv_cache_block_size
        assert size  # local_hashes() refuses a card without one
        name = model if model is not None else card.display_name
        choose = kv.chooser(local, len(ids), size, exclude, name, worker_type)
        chosen = self._picker.pick(book=True, blocks=max(1, math.ceil(len(ids) / size)), choose_fn=choose,
                                   model=name, worker_type=worker_type)
        res = None if chosen is None else chosen.reservation
        if res is None:
            return None
        last = kv.last_pick
        res.overlap_blocks = last.costs.get((res.worker_id, res.dp_rank), (0, 0.0))[0] if last is not None else 0
        res.token_ids = ids
        return res

    def _kv_health(self) -> Optional[SourceHealth]:
        if self._kv is None:
            return None
        views = [src.health() for src in self._kv_sources] or [self._kv_status.view()]
        h = views[0] if len(views) == 1 else _merged(views)
        index = self._kv.index
        counters = {**h.counters, **{f"index_{k}": v for k, v in index.counters.items()},
                    "index_entries": index.entries, "index_max_blocks": index.max_blocks}
        return SourceHealth(h.name, h.state, h.last_event_age, counters, h.last_error, h.endpoint)


def _merged(views: Sequence[SourceHealth]) -> SourceHealth:
    """One view of the KV-events sources (ZMQ and NATS): connected when one is, counters summed."""
    order = ("connected", "reconnecting", "connecting", "idle", "stopped")
    state = min((v.state for v in views), key=lambda s: order.index(s) if s in order else len(order))
    counters: Dict[str, int] = {}
    for v in views:
        for k, n in v.counters.items():
            counters[k] = counters.get(k, 0) + n
    ages = [v.last_event_age for v in views if v.last_event_age is not None]
    error = next((v.last_error for v in views if v.last_error), None)
    return SourceHealth("kv-events", state, min(ages) if ages else None, counters, error,
                        ", ".join(v.endpoint for v in views if v.endpoint) or None)
