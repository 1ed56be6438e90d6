"""Picking by cached prefix, as Dynamo 1.6.1's KV router does (its cost, read from the 1.6.1 wheel and
reproduced from its debug log), beside the index it reads.

For a prompt of ``isl`` tokens in blocks of ``B`` (the card's
``kv_cache_block_size``), each rank the busy rule calls free costs::

    prefill_load_scale × max(0, isl/B − credit × device_overlap
                                 − host_weight × host_overlap − disk_weight × disk_overlap)
    + weight × decode load: the more of (the rank's reported kv_used_blocks
      + blocks booked on it since that report) and (blocks of this router's
      unreleased bookings on it); weight = the largest candidate's capacity /
      this rank's (``weigh_by_capacity``; 1 in Dynamo)
    + this request's isl/B

and the cheapest wins (ties broken at random) among the ranks with room for
the request by prediction (decode load + the request within ``busy_threshold
× total``), else — ``overflow="steer"`` — among every rank the busy rule
calls free: prefix affinity never overfills a small worker while a roomier
one can serve.  A busy, held or unadmitted worker is never a candidate.  ``KvRouting`` holds the index, the options and
the tokenizers, and hands the picker a chooser; the picker books the choice
like any other (``blocks`` = the prompt's blocks).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Collection, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

from ._kvhash import block_hashes, sequence_hashes
from ._kvindex import KvIndex
from ._model import Card
from ._picker import MAX_RANKS_SCANNED, Chosen, Picker, unsigned_ids
from ._reduce import FleetState
from ._tokens import Prompt, Tokenizers
from .options import KvOptions

__all__ = ["KvPick", "KvRouting", "Tokenized"]

Key = Tuple[int, int]


class KvPick:
    """What one kv pick saw: per (worker, rank), overlap in blocks and cost."""

    __slots__ = ("at", "isl_blocks", "costs")

    def __init__(self, at: float, isl_blocks: int, costs: Dict[Key, Tuple[int, float]]) -> None:
        self.at = at
        self.isl_blocks = isl_blocks
        self.costs = costs


class Tokenized(NamedTuple):
    """A prompt's token ids and the card of the model they were tokenized for."""

    ids: List[int]
    card: Card


class KvRouting:
    """The KV index, its options, the tokenizers and the last pick (for ``why()``)."""

    def __init__(self, options: KvOptions, state: FleetState, picker: Picker,
                 members: Callable[[], FrozenSet[int]]) -> None:
        self.options = options
        self.index = KvIndex(options.max_blocks)
        self.tokenizers = Tokenizers()
        self._state = state
        self._picker = picker
        self._members = members
        self._rng = random.Random()
        self.last_pick: Optional[KvPick] = None

    # --- the prompt ------------------------------------------------------------------------------

    def _card(self, model: Optional[str]) -> Card:
        """A member's card for ``model`` (every admitted worker of a model shares the hashed fields)."""
        names = set()
        for wid in self._members():
            w = self._state.workers.get(wid)
            if w is None or not w.admitted:
                continue
            if model is None or w.card.display_name == model:
                if model is not None:
                    return w.card
                names.add(w.card.display_name)
                card = w.card
        if model is None and len(names) == 1:
            return card
        if model is None and names:
            raise ValueError(f"the fleet serves {len(names)} models: name one with model=…")
        raise LookupError(f"no member serves model {model!r}")

    def tokens(self, tokens: Optional[Sequence[int]], prompt: Optional[Prompt], model: Optional[str],
               tokenizer: Any = None) -> Tokenized:
        """The token ids (given, or ``prompt`` tokenized by the model's own tokenizer) and the model's card."""
        if (tokens is None) == (prompt is None):
            raise TypeError("give tokens=… (token ids) or prompt=… (text or chat messages), one of them")
        card = self._card(model)
        if tokens is None:
            assert prompt is not None
            return Tokenized(self.tokenizers.encode(prompt, card, model, tokenizer), card)
        if isinstance(tokens, (str, bytes)):
            raise TypeError("tokens= takes token ids; pass text as prompt=…")
        return Tokenized(list(tokens), card)

    def local_hashes(self, tokens: Sequence[int], card: Card, lora_name: Optional[str],
                     cache_salt: Optional[str]) -> List[int]:
        size = card.kv_cache_block_size
        if not size:
            raise LookupError(f"the card of model {card.display_name!r} gives no kv_cache_block_size")
        return block_hashes(tokens, size, lora_name=lora_name, cache_salt=cache_salt)

    # --- overlap and cost ------------------------------------------------------------------------

    def overlaps(self, local: Sequence[int]) -> Tuple[Dict[Key, int], Dict[Key, int], Dict[Key, int]]:
        """Leading blocks held on the device, host and disk tiers, per (worker, rank)."""
        seqs = sequence_hashes(local)
        idx = self.index
        return idx.overlaps_seq(seqs, "device"), idx.overlaps_seq(seqs, "host_pinned"), idx.overlaps_seq(seqs, "disk")

    def prefix_overlap(self, local: Sequence[int], model: Optional[str]) -> Dict[Key, int]:
        device = self.index.overlaps(local)
        out: Dict[Key, int] = {}
        for wid in self._members():
            w = self._state.workers.get(wid)
            if w is None or not w.admitted or (model is not None and w.card.display_name != model):
                continue
            start = w.card.data_parallel_start_rank
            for rank in range(start, start + min(w.card.data_parallel_size, MAX_RANKS_SCANNED)):
                out[(wid, rank)] = device.get((wid, rank), 0)
        return out

    def chooser(self, local: Sequence[int], isl_tokens: int, block_size: int, exclude: Collection[int],
                model: Optional[str], worker_type: Optional[str]) -> Callable[[Tuple[int, ...]], Chosen]:
        """A chooser for ``Picker.pick(choose_fn=…)``: the free rank of lowest cost."""
        opt = self.options
        isl_blocks = isl_tokens / block_size
        request_blocks = math.ceil(isl_blocks)
        device, host, disk = self.overlaps(local)
        picker = self._picker
        state = self._state
        excluded = unsigned_ids(exclude)

        threshold = state.thresholds.busy_threshold
        steer = picker.overflow == "steer"

        def choose(free: Tuple[int, ...]) -> Chosen:
            largest = 0
            if opt.weigh_by_capacity:
                for wid in free:
                    w = state.workers.get(wid)
                    if w is not None and w.card.total_kv_blocks:
                        largest = max(largest, w.card.total_kv_blocks)
            # Two tiers: ranks with room for the request by prediction first (as the other
            # strategies), then — overflow="steer" — any rank the busy rule calls free.
            best: Optional[Tuple[int, float, int, int, int]] = None
            ties = 0
            costs: Dict[Key, Tuple[int, float]] = {}
            for wid in free:
                if wid in excluded:
                    continue
                w = state.workers.get(wid)
                if w is None or not w.admitted or w.hold_until is not None:
                    continue
                card = w.card
                if (model is not None and card.display_name != model) or (
                        worker_type is not None and card.worker_type != worker_type):
                    continue
                for rank, load, booked in picker.free_ranks(wid, w):
                    key = (wid, rank)
                    dev = device.get(key, 0)
                    uncached = isl_blocks - opt.overlap_credit * dev - opt.host_cache_weight * host.get(key, 0) \
                        - opt.disk_cache_weight * disk.get(key, 0)
                    # Decode load: the picker's prediction — what the rank last reported plus what was
                    # booked since, or what this router has routed there and not seen finish, whichever
                    # is more (free_ranks() counts both; other routers' load is only in the report).
                    decode = load + booked
                    total = card.total_kv_blocks
                    weight = largest / total if largest and total else 1.0
                    cost = opt.prefill_load_scale * max(0.0, uncached) + weight * decode + request_blocks
                    costs[key] = (dev, cost)
                    tier = 0 if not total or threshold is None or decode + request_blocks <= threshold * total else 1
                    if tier and not steer:
                        continue
                    if best is None or (tier, cost) < (best[0], best[1]):
                        best, ties = (tier, cost, wid, rank, dev), 1
                    elif (tier, cost) == (best[0], best[1]):
                        ties += 1
                        if self._rng.random() * ties < 1:  # a uniform choice among equal costs
                            best = (tier, cost, wid, rank, dev)
            self.last_pick = KvPick(time.monotonic(), request_blocks, costs)  # under the picker's lock
            if best is None:
                return None
            tier, cost, wid, rank, dev = best
            n = len(costs)
            where = "with room for it" if tier == 0 else "(steered: none has room for it by prediction)"
            return wid, ((tier, cost), rank, None, picker.in_flight_now(wid)), lambda: (
                f"kv: {wid:x} rank {rank} holds {dev} of the prompt's {isl_blocks:g} blocks; cost {cost:.2f}, "
                f"the lowest of {n} free rank(s) {where}")
        return choose

    def describe(self, worker_id: int, ranks: Sequence[int]) -> Tuple[str, ...]:
        """Lines for ``why()``: each rank's cached blocks, its view's completeness, the last pick's cost."""
        lines = []
        last = self.last_pick
        for rank in ranks:
            view = self.index.slot(worker_id, rank)
            if view is None:
                text = "no KV events seen (no cached prefix is credited)"
            else:
                text = f"{view.blocks} cached block(s)" + ("" if view.complete else
                                                           f"; view incomplete: {view.why_incomplete}")
            if last is not None and (worker_id, rank) in last.costs:
                ov, cost = last.costs[(worker_id, rank)]
                age = time.monotonic() - last.at
                text += f"; last kv pick ({age:.1f} s ago): overlap {ov} of {last.isl_blocks} blocks, cost {cost:.2f}"
            lines.append(f"rank {rank}: {text}")
        return tuple(lines)
