"""Dynamo's KV block hashes, computed from outside (checked against 1.6.1's own function in the
``-m dynamo`` suite and against captured traffic in ``tests/data/dynamo-samples``).

A prompt's *local* block hash is ``xxh3_64`` of its ``block_size`` token ids
packed as little-endian u32, seeded with 1337 (plus ``xxh3_64(lora_name,
seed 0)`` with a LoRA adapter, plus ``xxh3_64(cache_salt, seed 1)`` with a
cache namespace, mod 2^64; an empty name counts as none).  Only full blocks count.  The *sequence* hash
chains them: ``seq[0] = local[0]``, ``seq[i] = xxh3_64(LE u64 seq[i-1] ‖ LE u64
local[i], seed 1337)`` — the position of a block in the prefix tree, the key
workermon's KV index is walked by.  Hashes are unsigned 64-bit Python ints.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence

__all__ = ["SEED", "block_hashes", "chain_hash", "sequence_hashes"]

SEED = 1337
_MASK = (1 << 64) - 1
_PAIR = struct.Struct("<QQ")


def _xxh3() -> object:
    try:
        import xxhash
    except ImportError:
        raise ImportError("KV block hashes need xxhash: pip install 'workermon[kv]'") from None
    return xxhash.xxh3_64_intdigest


def _seed(lora_name: Optional[str], cache_salt: Optional[str]) -> int:
    h = _xxh3()
    seed = SEED
    # An empty name counts as none (as 1.6.1's own function does).
    if lora_name:
        seed = (seed + h(lora_name.encode("utf-8"), seed=0)) & _MASK  # type: ignore[operator]
    if cache_salt:
        seed = (seed + h(cache_salt.encode("utf-8"), seed=1)) & _MASK  # type: ignore[operator]
    return seed


def block_hashes(tokens: Sequence[int], block_size: int, *, lora_name: Optional[str] = None,
                 cache_salt: Optional[str] = None) -> List[int]:
    """Dynamo's local hash of each full block of ``tokens`` (the router's ``local_hashes``).

    ``tokens``: token ids (0 ≤ id < 2^32); ``block_size``: the card's
    ``kv_cache_block_size``.  A partial last block is not hashed.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    h = _xxh3()
    seed = _seed(lora_name, cache_salt)
    n = len(tokens) // block_size
    if n == 0:
        return []
    try:
        packed = struct.pack(f"<{n * block_size}I", *tokens[: n * block_size])
    except struct.error:
        raise ValueError("token ids must be integers in [0, 2**32)") from None
    step = 4 * block_size
    view = memoryview(packed)
    return [h(view[i:i + step], seed=seed) for i in range(0, n * step, step)]  # type: ignore[operator]


def chain_hash(parent: int, local: int) -> int:
    """The sequence hash of a block whose parent's sequence hash is ``parent``."""
    return _xxh3()(_PAIR.pack(parent, local), seed=SEED)  # type: ignore[operator, no-any-return]


def sequence_hashes(local: Sequence[int]) -> List[int]:
    """The sequence hashes of a chain of local hashes from the root."""
    if not local:
        return []
    h = _xxh3()
    pack = _PAIR.pack
    out = [local[0]]
    prev = local[0]
    for x in local[1:]:
        prev = h(pack(prev, x), seed=SEED)  # type: ignore[operator]
        out.append(prev)
    return out
