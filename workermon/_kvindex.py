"""What every worker holds in its KV cache, followed from its ``kv-events`` (the wire: README,
*Picking by cached prefix*; captured samples in ``tests/data/dynamo-samples``).

One index for the whole fleet: per storage tier, a dict from a block's
*sequence hash* (its place in the prefix tree, computed here from its parent's
and its own local hash) to a bit mask of the (worker, dp rank) *slots* that
hold it.  A prompt's overlap with every slot is one walk down its sequence
hashes, and-ing masks.  Engines name blocks by their own ``block_hash``; a
slot keeps a map from those to sequence hashes only where the two differ
(Dynamo's mocker uses the sequence hash itself, so its map stays empty).

Events are applied in order per slot: ``stored`` (a chain of blocks under a
parent), ``removed`` (by ``block_hash``) and ``cleared``.  A slot's view is
*incomplete* — counted, and shown by ``why()`` — after a gap in its
``event_id``s (or a first event other than a life's first — 1, or 0 up to Dynamo 1.0 —: this
follower started late), a
new publisher for its worker, or a ``stored`` chain whose parent it never saw
(those blocks cannot be placed and are not indexed); its overlap then counts
only what arrived since.  A worker that leaves takes its blocks with it.

Memory is bounded by ``max_blocks`` (slot × block entries over all tiers).
At the bound, new ``stored`` blocks are not indexed (``dropped_blocks``) and
their slot's view turns incomplete; removals and departures make room again.
Measured size per cached (worker, block): see ``python -m bench`` (``kv index``).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

import msgspec

from ._fleet import Counters
from ._kvhash import chain_hash, sequence_hashes

__all__ = ["KvIndex", "KvItem", "SlotView", "TIERS", "decode_kv_json", "decode_kv_payload"]

TIERS = ("device", "host_pinned", "disk", "external")
_U64 = (1 << 64) - 1


# --- the wire: one message's payload is a msgpack array of these ---------------------------------


class _Block(msgspec.Struct):
    block_hash: int
    tokens_hash: int


class _Stored(msgspec.Struct):
    blocks: List[_Block]
    parent_hash: Optional[int] = None


class _Removed(msgspec.Struct):
    block_hashes: List[int]


class _Data(msgspec.Struct):
    stored: Optional[_Stored] = None
    removed: Optional[_Removed] = None


class _Event(msgspec.Struct):
    event_id: int
    data: Any
    dp_rank: int = 0


class _Item(msgspec.Struct):
    worker_id: int
    event: _Event
    storage_tier: str = "device"


KvItem = _Item  # one event of one worker rank, as decoded


_decode_items = msgspec.msgpack.Decoder(Union[List[_Item], _Item])
_decode_json_item = msgspec.json.Decoder(_Item)
_data = msgspec.convert


def decode_kv_payload(payload: bytes) -> List[_Item]:
    """The events of one ``kv-events`` envelope's payload: a msgpack array of events (1.4 on), or one
    event (1.1–1.3).  Raises ``msgspec`` errors on a bad one."""
    items = _decode_items.decode(payload)
    return items if isinstance(items, list) else [items]


def decode_kv_json(data: bytes) -> List[_Item]:
    """One event as Dynamo 0.9 publishes it to its JetStream stream: JSON, no envelope (``event_id``
    counts from 0).  Raises ``msgspec`` errors on a bad one."""
    return [_decode_json_item.decode(data)]


class SlotView(msgspec.Struct):
    """One (worker, dp rank) as the index sees it."""

    worker_id: int
    dp_rank: int
    blocks: int
    complete: bool
    why_incomplete: Optional[str]


class _Slot:
    __slots__ = ("bit", "worker_id", "dp_rank", "blocks", "aliases", "last_event", "publisher", "incomplete")

    def __init__(self, bit: int, worker_id: int, dp_rank: int) -> None:
        self.bit = bit
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.blocks = 0
        # tier -> {engine block_hash: sequence hash}, only where the two differ
        self.aliases: Dict[str, Dict[int, int]] = {}
        self.last_event: Optional[int] = None
        self.publisher: Optional[int] = None
        self.incomplete: Optional[str] = None


class KvIndex:
    """The fleet's cached blocks; thread-safe (one lock: the event thread writes, pickers read)."""

    def __init__(self, max_blocks: int = 4_000_000) -> None:
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks must be an integer >= 1, got {max_blocks!r}")
        self.max_blocks = max_blocks
        self._lock = threading.Lock()
        self._nodes: Dict[str, Dict[int, int]] = {t: {} for t in TIERS}
        self._slots: Dict[Tuple[int, int], _Slot] = {}
        self._by_bit: Dict[int, _Slot] = {}
        self._free_bits: List[int] = []
        self._next_bit = 0
        self._entries = 0
        self.counters = Counters()

    # --- writing (the kv-events thread) --------------------------------------------------------

    def apply(self, items: Iterable[_Item], publisher_id: Optional[int] = None) -> None:
        """Apply one message's events in order."""
        with self._lock:
            for item in items:
                self._apply_one(item, publisher_id)

    def _slot(self, worker_id: int, dp_rank: int) -> _Slot:
        key = (worker_id, dp_rank)
        slot = self._slots.get(key)
        if slot is None:
            bit = self._free_bits.pop() if self._free_bits else self._next_bit
            if bit == self._next_bit:
                self._next_bit += 1
            slot = self._slots[key] = _Slot(bit, worker_id, dp_rank)
            self._by_bit[bit] = slot
        return slot

    def _mark(self, slot: _Slot, why: str, counter: str) -> None:
        self.counters.inc(counter)
        slot.incomplete = why

    def _apply_one(self, item: _Item, publisher_id: Optional[int]) -> None:
        ev = item.event
        wid = item.worker_id & _U64
        if ev.dp_rank < 0 or ev.event_id < 0:
            self.counters.inc("malformed")
            return
        tier = item.storage_tier if item.storage_tier in self._nodes else None
        if tier is None:
            self.counters.inc("unknown_tier")
            return
        slot = self._slot(wid, ev.dp_rank)
        if publisher_id is not None and slot.publisher != publisher_id:
            if slot.publisher is not None:
                self._mark(slot, "a new publisher id for this worker (restarted?)", "publisher_changes")
                self._forget_slot_blocks(slot)
                slot.last_event = None  # a new life counts its events from 1 again
            slot.publisher = publisher_id
        last = slot.last_event
        if last is None:
            # A life starts at 1 (at 0 up to Dynamo 1.0).  Missing only a 0-based life's event 0
            # goes unseen here, but its blocks are then parents nobody knows: marked on first use.
            if ev.event_id > 1:
                self._mark(slot, f"followed from event {ev.event_id}: what came before is unknown", "late_starts")
        elif ev.event_id != last + 1 and ev.event_id > last:
            self._mark(slot, f"events {last + 1}..{ev.event_id - 1} never arrived", "gaps")
        elif ev.event_id <= last:
            self.counters.inc("duplicates")
            return
        slot.last_event = ev.event_id
        data = ev.data
        self.counters.inc("events")
        if data == "cleared" or (isinstance(data, dict) and "cleared" in data):
            self._forget_slot_blocks(slot)
            slot.incomplete = None  # nothing held: the view is exact again
            return
        try:
            d = _data(data, _Data)
        except (msgspec.ValidationError, TypeError):
            self.counters.inc("malformed")
            return
        if d.stored is not None:
            self._stored(slot, tier, d.stored)
        if d.removed is not None:
            self._removed(slot, tier, d.removed.block_hashes)

    def _stored(self, slot: _Slot, tier: str, st: _Stored) -> None:
        nodes = self._nodes[tier]
        bit = 1 << slot.bit
        aliases = slot.aliases.get(tier)
        parent = st.parent_hash
        if parent is None:
            prev: Optional[int] = None
        else:
            parent &= _U64
            prev = aliases.get(parent) if aliases else None
            if prev is None and nodes.get(parent, 0) & bit:
                prev = parent  # the engine names blocks by their sequence hash (the mocker)
            if prev is None:
                self._mark(slot, "a stored block's parent was never seen", "unknown_parents")
                self.counters.inc("unplaced_blocks", len(st.blocks))
                return
        for b in st.blocks:
            local = b.tokens_hash & _U64
            seq = local if prev is None else chain_hash(prev, local)
            held = nodes.get(seq, 0)
            if not held & bit:
                if self._entries >= self.max_blocks:
                    self._mark(slot, f"the index is full (max_blocks={self.max_blocks})", "dropped_blocks")
                    return
                nodes[seq] = held | bit
                self._entries += 1
                slot.blocks += 1
                self.counters.inc("stored_blocks")
            bh = b.block_hash & _U64
            if bh != seq:
                if aliases is None:
                    aliases = slot.aliases[tier] = {}
                aliases[bh] = seq
            prev = seq

    def _removed(self, slot: _Slot, tier: str, hashes: Sequence[int]) -> None:
        nodes = self._nodes[tier]
        bit = 1 << slot.bit
        aliases = slot.aliases.get(tier)
        for bh in hashes:
            bh &= _U64
            seq = aliases.pop(bh, bh) if aliases else bh
            held = nodes.get(seq, 0)
            if not held & bit:
                self.counters.inc("unknown_removals")
                continue
            rest = held & ~bit
            if rest:
                nodes[seq] = rest
            else:
                del nodes[seq]
            self._entries -= 1
            slot.blocks -= 1
            self.counters.inc("removed_blocks")

    def _forget_slot_blocks(self, slot: _Slot) -> None:
        self._forget_blocks([slot])

    def _forget_blocks(self, slots: Sequence[_Slot]) -> None:
        """Take every block of ``slots`` out of the index: one pass over the nodes for all of them."""
        mask = 0
        for slot in slots:
            if slot.blocks:
                mask |= 1 << slot.bit
        if mask:
            keep = ~mask
            for nodes in self._nodes.values():
                for seq in [s for s, m in nodes.items() if m & mask]:
                    rest = nodes[seq] & keep
                    if rest:
                        nodes[seq] = rest
                    else:
                        del nodes[seq]
        for slot in slots:
            self._entries -= slot.blocks
            slot.blocks = 0
            slot.aliases.clear()

    def drop_worker(self, worker_id: int) -> None:
        """A worker left (its card or its kv-events channel went): its blocks, on every rank, go with it."""
        worker_id &= _U64
        with self._lock:
            slots = [self._slots.pop(k) for k in [k for k in self._slots if k[0] == worker_id]]
            if not slots:
                return
            self._forget_blocks(slots)
            for slot in slots:
                del self._by_bit[slot.bit]
                self._free_bits.append(slot.bit)
            self.counters.inc("workers_dropped")

    def worker_ids(self) -> FrozenSet[int]:
        """The workers the index holds anything of (any thread)."""
        with self._lock:
            return frozenset(k[0] for k in self._slots)

    def mark_incomplete(self, worker_id: int, why: str) -> None:
        """Something outside the events says this worker's view has holes (e.g. its channel moved)."""
        worker_id &= _U64
        with self._lock:
            for key, slot in self._slots.items():
                if key[0] == worker_id:
                    self._mark(slot, why, "marked_incomplete")

    # --- reading (any thread) ------------------------------------------------------------------

    def overlaps(self, local_hashes: Sequence[int], tier: str = "device") -> Dict[Tuple[int, int], int]:
        """Leading blocks of the prompt each known slot holds on ``tier`` (slots holding none are absent)."""
        seqs = sequence_hashes(local_hashes)
        return self.overlaps_seq(seqs, tier)

    def overlaps_seq(self, seqs: Sequence[int], tier: str = "device") -> Dict[Tuple[int, int], int]:
        out: Dict[Tuple[int, int], int] = {}
        with self._lock:
            nodes = self._nodes[tier]
            alive = -1
            depth = 0
            for depth, s in enumerate(seqs):
                m = nodes.get(s, 0)
                ended = (alive & ~m) if alive != -1 else 0
                alive = m if alive == -1 else alive & m
                while ended:
                    low = ended & -ended
                    slot = self._by_bit.get(low.bit_length() - 1)
                    if slot is not None and depth:
                        out[(slot.worker_id, slot.dp_rank)] = depth
                    ended ^= low
                if not alive:
                    break
            else:
                depth = len(seqs)
                while alive > 0:
                    low = alive & -alive
                    slot = self._by_bit.get(low.bit_length() - 1)
                    if slot is not None:
                        out[(slot.worker_id, slot.dp_rank)] = depth
                    alive ^= low
        return out

    def slot(self, worker_id: int, dp_rank: int = 0) -> Optional[SlotView]:
        with self._lock:
            s = self._slots.get((worker_id & _U64, dp_rank))
            if s is None:
                return None
            return SlotView(s.worker_id, s.dp_rank, s.blocks, s.incomplete is None, s.incomplete)

    def slots(self) -> List[SlotView]:
        with self._lock:
            return [SlotView(s.worker_id, s.dp_rank, s.blocks, s.incomplete is None, s.incomplete)
                    for s in self._slots.values()]

    @property
    def entries(self) -> int:
        """(slot, block) entries held now, over every tier."""
        return self._entries
