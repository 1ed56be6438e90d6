"""The host agent's shared memory: the fleet state picking needs, and host-wide bookings.

One file in the agent's private directory, created ``0600`` by the agent and
mapped by every :class:`~workermon.SharedMonitor` of the same user:

- a header: magic, layout, the agent's *epoch* (random, one per agent
  lifetime), a layout sequence (bumped when a slot changes hands), the busy
  threshold, and how many slots and booking rows are in use;
- one row per worker slot (its id, flags — in use, admitted, busy, held by a
  529 —, capacity, first rank slot and rank count, hashes of its model name
  and worker type), guarded by a per-row seqlock: the agent makes the row's
  sequence odd, writes the row and its ranks, makes it even; a reader retries
  while it is odd or changed under it;
- one row per rank slot: the reported load (the higher KV signal), the report
  sequence, and the busy rule's verdict;
- one **booking row per client process**, written only by that process: per
  rank slot a 64-bit ``report_seq << 32 | blocks`` (booked since that report:
  they count while the rank's report sequence is the one they were made
  against, the picker's credit rule) and a 64-bit count of the blocks of its
  unreleased bookings there, whatever the reports say (the requests it routed
  and has not seen finish: a report leaves out requests queued in the engine).
  The agent zeroes a process's row when its connection closes, so the bookings
  of a process that died are gone with it.

Integers are little-endian; 8-byte values are aligned, so a reader never sees
half of one.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Tuple

from ._model import PickState

__all__ = ["Header", "SharedFleet", "ShmLayout", "SlotRow", "model_hash"]

MAGIC = b"WMSHM\x00\x02\x00"  # layout 2: a booking entry is 16 bytes (since-report, live)
_HEADER = struct.Struct("<8sQQIIIIIIdQ")  # magic, epoch, layout_seq, slot_cap, rank_cap, max_procs,
#                                           slots_used, procs_used, pad, busy_threshold, version
HEADER_SIZE = 128
_SLOT = struct.Struct("<IIQIIIIQQ")  # seq, flags, worker id, total, dp_start, first rank, n ranks, model, type
SLOT_SIZE = 48
_RANK = struct.Struct("<IIB3x")  # load, report seq, busy verdict
RANK_SIZE = 16
BOOKING_SIZE = 16  # per (process, rank): u64 report_seq << 32 | blocks booked since; u64 live blocks
_U64 = struct.Struct("<Q")
_ENTRY = struct.Struct("<QQ")  # one booking entry
_U32 = struct.Struct("<I")

USED, ADMITTED, BUSY, HELD = 1, 2, 4, 8
NONE32 = 0xFFFFFFFF  # "unknown" for a capacity or a load


@lru_cache(maxsize=1024)
def model_hash(name: Optional[str]) -> int:
    """A stable 64-bit hash of a model name or worker type (0 for None)."""
    if name is None:
        return 0
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") or 1


class Header(NamedTuple):
    """The shared memory's header as a client reads it."""

    epoch: int
    layout_seq: int
    slots_used: int
    busy_threshold: float  # NaN when the KV rule is off
    procs_used: int


class SlotRow(NamedTuple):
    """One worker's row: ``ranks`` holds ``(load, report_seq, busy)`` per rank from ``dp_start``."""

    flags: int
    worker_id: int
    total: int  # NONE32 when the card gives none
    dp_start: int
    first_rank: int
    n_ranks: int
    model: int  # model_hash(display_name)
    worker_type: int  # model_hash(worker_type)
    ranks: List[Tuple[int, int, int]]


# Rows are read on every pick: built as tuples of their NamedTuple class directly, without the
# class's own __new__ (a Python call per row: ~1 µs of a ~14 µs reserve()+release(), measured).
_tuple_new = tuple.__new__


class ShmLayout:
    """Offsets of one file's regions, from its capacities."""

    def __init__(self, slot_cap: int, rank_cap: int, max_procs: int) -> None:
        if slot_cap < 1 or rank_cap < 1 or max_procs < 1:
            raise ValueError("shared memory capacities must be >= 1")
        self.slot_cap = slot_cap
        self.rank_cap = rank_cap
        self.max_procs = max_procs
        self.slots = HEADER_SIZE
        self.ranks = self.slots + slot_cap * SLOT_SIZE
        self.bookings = self.ranks + rank_cap * RANK_SIZE
        self.row_size = rank_cap * BOOKING_SIZE
        self.size = self.bookings + max_procs * self.row_size

    def booking(self, proc: int, rank_slot: int) -> int:
        """Where a process's entry for a rank is: ``report_seq << 32 | blocks``, then the live blocks."""
        return self.bookings + proc * self.row_size + rank_slot * BOOKING_SIZE


class SharedFleet:
    """One mapping of the file: the agent writes the fleet region, each client its own booking row."""

    def __init__(self, fd: int, layout: ShmLayout, epoch: int) -> None:
        self.layout = layout
        self.epoch = epoch
        self.mm = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    # --- creating and opening ------------------------------------------------------------

    @classmethod
    def create(cls, path: str, layout: ShmLayout) -> "SharedFleet":
        """The agent: a new file (``0600``; any old one at ``path`` is replaced) with a fresh epoch."""
        tmp = f"{path}.{os.getpid()}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, layout.size)  # sparse: untouched pages cost nothing
            epoch = int.from_bytes(os.urandom(8), "little") or 1
            fleet = cls(fd, layout, epoch)
            _HEADER.pack_into(fleet.mm, 0, MAGIC, epoch, 0, layout.slot_cap, layout.rank_cap, layout.max_procs,
                              0, 0, 0, math.nan, 0)
            os.replace(tmp, path)  # clients see a complete file or none
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        os.close(fd)  # the mapping stays
        return fleet

    @classmethod
    def open(cls, path: str, expect_epoch: Optional[int] = None) -> "SharedFleet":
        """A client: map the agent's file after checking who made it (PermissionError names why)."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): "
                                      "not this user's workermon agent")
            if st.st_mode & 0o077:
                raise PermissionError(f"{path} has mode {st.st_mode & 0o777:o}; the agent's file is 0600")
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) < _HEADER.size:
                raise ValueError(f"{path} is not a workermon shared-memory file (too short)")
            magic, epoch, _, slot_cap, rank_cap, max_procs = _HEADER.unpack(head)[:6]
            if magic != MAGIC:
                raise ValueError(f"{path} is not a workermon shared-memory file of this version")
            if expect_epoch is not None and epoch != expect_epoch:
                raise ValueError(f"{path} belongs to another agent lifetime")
            layout = ShmLayout(slot_cap, rank_cap, max_procs)
            if st.st_size < layout.size:
                raise ValueError(f"{path} is shorter than its layout says")
            return cls(fd, layout, epoch)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a reader still holds a view; the mapping goes with the process

    # --- header ---------------------------------------------------------------------------

    def header(self) -> "Header":
        """The header's fields (see :class:`Header`)."""
        (_, epoch, layout_seq, _, _, _, slots_used, procs_used, _, threshold, _) = _HEADER.unpack_from(self.mm, 0)
        return _tuple_new(Header, (epoch, layout_seq, slots_used, threshold, procs_used))

    # Each header field has one writer: the shared-memory writer thread the
    # layout and the threshold, the agent's socket thread the booking rows in use.

    def set_layout(self, layout_seq: int, slots_used: int, threshold: Optional[float]) -> None:
        struct.pack_into("<I", self.mm, 36, slots_used)
        struct.pack_into("<d", self.mm, 48, math.nan if threshold is None else threshold)
        _U64.pack_into(self.mm, 16, layout_seq)

    def set_procs_used(self, procs_used: int) -> None:
        struct.pack_into("<I", self.mm, 40, procs_used)

    # --- the agent: rows ---------------------------------------------------------------------

    def write_slot(self, slot: int, state: PickState, first_rank: int, n_ranks: int) -> None:
        """One worker's row and its ranks, under the row's seqlock (the agent's writer thread only)."""
        mm = self.mm
        off = self.layout.slots + slot * SLOT_SIZE
        seq = _U32.unpack_from(mm, off)[0]
        _U32.pack_into(mm, off, (seq + 1) & NONE32)  # odd: being written
        flags = USED | (ADMITTED if state.admitted else 0) | (BUSY if state.busy else 0) | (HELD if state.held else 0)
        total = NONE32 if state.total is None else min(state.total, NONE32 - 1)
        _SLOT.pack_into(mm, off, (seq + 1) & NONE32, flags, state.worker_id, total, state.dp_start, first_rank,
                        n_ranks, model_hash(state.display_name), model_hash(state.worker_type))
        base = self.layout.ranks + first_rank * RANK_SIZE
        for i, (load, report_seq, busy) in enumerate(state.ranks[:n_ranks]):
            _RANK.pack_into(mm, base + i * RANK_SIZE, NONE32 if load is None else min(load, NONE32 - 1),
                            report_seq & NONE32, 1 if busy else 0)
        _U32.pack_into(mm, off, (seq + 2) & NONE32)  # even: complete

    def clear_slot(self, slot: int) -> None:
        mm = self.mm
        off = self.layout.slots + slot * SLOT_SIZE
        seq = _U32.unpack_from(mm, off)[0]
        _U32.pack_into(mm, off, (seq + 1) & NONE32)
        _SLOT.pack_into(mm, off, (seq + 1) & NONE32, 0, 0, 0, 0, 0, 0, 0, 0)
        _U32.pack_into(mm, off, (seq + 2) & NONE32)

    def clear_bookings(self, proc: int) -> None:
        """A client's connection closed: its bookings are gone."""
        off = self.layout.booking(proc, 0)
        self.mm[off:off + self.layout.row_size] = bytes(self.layout.row_size)

    # --- clients: reading --------------------------------------------------------------------

    def read_slot(self, slot: int) -> Optional["SlotRow"]:
        """One worker's row and its ranks, read consistently (see :class:`SlotRow`); None when the row
        kept changing under the reader (try later) or is not in use."""
        mm = self.mm
        off = self.layout.slots + slot * SLOT_SIZE
        for _ in range(8):
            row = _SLOT.unpack_from(mm, off)
            seq = row[0]
            if seq & 1:
                continue
            first, n = row[5], row[6]
            base = self.layout.ranks + first * RANK_SIZE
            ranks = [_RANK.unpack_from(mm, base + i * RANK_SIZE) for i in range(n)]
            if _U32.unpack_from(mm, off)[0] != seq:
                continue
            if not row[1] & USED:
                return None
            return _tuple_new(SlotRow, (row[1], row[2], row[3], row[4], first, n, row[7], row[8], ranks))
        return None

    def scan(self, slots_used: int) -> Dict[int, int]:
        """worker id → slot, for the slots in use."""
        out: Dict[int, int] = {}
        mm = self.mm
        base = self.layout.slots
        for slot in range(min(slots_used, self.layout.slot_cap)):
            flags, wid = struct.unpack_from("<4xIQ", mm, base + slot * SLOT_SIZE)
            if flags & USED:
                out[wid] = slot
        return out

    def booked(self, rank_slot: int, report_seq: int, procs_used: int) -> int:
        """Blocks booked on a rank since its report ``report_seq``, over every process's row."""
        return self.bookings_on(rank_slot, report_seq, procs_used)[0]

    def bookings_on(self, rank_slot: int, report_seq: int, procs_used: int) -> Tuple[int, int]:
        """``(blocks booked since report report_seq, blocks of unreleased bookings)`` on a rank, over
        every process's row: one pass for the picker."""
        mm = self.mm
        lay = self.layout
        since = live = 0
        off = lay.booking(0, rank_slot)
        for _ in range(min(procs_used, lay.max_procs)):
            v, held = _ENTRY.unpack_from(mm, off)
            if v and v >> 32 == report_seq:
                since += v & NONE32
            live += held
            off += lay.row_size
        return since, live

    def rank_seq(self, rank_slot: int) -> int:
        return int(_RANK.unpack_from(self.mm, self.layout.ranks + rank_slot * RANK_SIZE)[1])

    def booked_total(self, procs_used: int, ranks_used: int) -> int:
        """Blocks booked host-wide that still count (each against its rank's current report)."""
        mm = self.mm
        lay = self.layout
        seqs = [_RANK.unpack_from(mm, lay.ranks + j * RANK_SIZE)[1] for j in range(min(ranks_used, lay.rank_cap))]
        total = 0
        for proc in range(min(procs_used, lay.max_procs)):
            row = memoryview(mm)[lay.booking(proc, 0):lay.booking(proc, len(seqs))]
            try:
                for j, v in enumerate(row.cast("Q")[::2]):
                    if v and v >> 32 == seqs[j]:
                        total += v & NONE32
            finally:
                row.release()
        return total

    # --- clients: their own booking row ---------------------------------------------------------

    def add_booking(self, proc: int, rank_slot: int, report_seq: int, blocks: int) -> None:
        off = self.layout.booking(proc, rank_slot)
        v, held = _ENTRY.unpack_from(self.mm, off)
        since = blocks + (v & NONE32 if v >> 32 == report_seq and v else 0)
        _ENTRY.pack_into(self.mm, off, (report_seq & NONE32) << 32 | min(since, NONE32), held + blocks)

    def remove_booking(self, proc: int, rank_slot: int, report_seq: int, blocks: int) -> None:
        off = self.layout.booking(proc, rank_slot)
        v, held = _ENTRY.unpack_from(self.mm, off)
        if v and v >> 32 == report_seq & NONE32:
            left = (v & NONE32) - blocks
            v = (report_seq & NONE32) << 32 | left if left > 0 else 0
        # (else a newer report came: the since-report part had stopped counting)
        _ENTRY.pack_into(self.mm, off, v, max(0, held - blocks))
