"""Block bookkeeping: free list, reference counts, prefix cache, LRU eviction.

Holds only ids, counts and hashes (the tensors live in ``PagedKVCache``).
A full block's hash chains its parent's hash with its token ids, and the first
block's with the request's ``cache_salt``, so equal prefixes (and only equal
prefixes of the same tenant) share blocks. Freed blocks keep their hash and
contents until they are reused, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Callable, Sequence


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: str | None) -> bytes:
    """Stable (process-independent) hash of one full block, chained on its parent."""
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        h.update(b"salt:" + (salt or "").encode())
    else:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None, start: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full block of ``token_ids``, extending an already computed prefix ``start``."""
    hashes = list(start or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], salt))
    return hashes


def extend_block_hashes(hashes: list[bytes], token_ids: Callable[[int, int], Sequence[int]], num_blocks: int,
                        block_size: int, salt: str | None) -> list[bytes]:
    """Append to ``hashes`` (in place) the hashes of blocks ``len(hashes)..num_blocks-1``, reading only
    their tokens through ``token_ids(start, end)``: a growing sequence costs its new blocks, not its length."""
    for i in range(len(hashes), num_blocks):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids(i * block_size, (i + 1) * block_size), salt))
    return hashes


class BlockManager:
    """``on_free(block_id)`` is called when a block's last reference is dropped (the KV cache
    frees per-block side storage, e.g. the int4/int2 staging slot of a partial block)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_free: Callable[[int], None] | None = None):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # blocks with ref_count 0, least recently freed first (evicted first)
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found
        self.on_free = on_free

    # -- queries ------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------
    def lookup_prefix(self, hashes: Sequence[bytes], max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix (at most ``max_tokens`` tokens). Does not take references."""
        found: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes[: max_tokens // self.block_size]:
                block = self.cached.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def count_prefix_lookup(self, queried_tokens: int, hit_blocks: int) -> None:
        """Count one lookup in the prefix-cache stats: called once the request it was for is
        admitted (a request that waits for blocks is looked up again every step)."""
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_blocks * self.block_size

    def take(self, block_ids: Sequence[int]) -> None:
        """Add a reference to blocks found in the prefix cache."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1

    def cache_blocks(self, block_ids: Sequence[int], hashes: Sequence[bytes], start: int,
                     end: int | None = None) -> None:
        """Register full blocks ``start..end-1`` (default: ``len(hashes)-1``) of a request in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for i in range(start, len(hashes) if end is None else end):
            b, h = block_ids[i], hashes[i]
            if self.block_hash[b] is not None:
                continue
            if h not in self.cached:
                self.cached[h] = b
                self.block_hash[b] = h

    # -- allocation ---------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks (evicting cached ones, least recently freed first). Caller checks can_allocate."""
        if num_blocks > len(self.free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self.free)} free")
        out = []
        for _ in range(num_blocks):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; tail blocks are freed first so they are evicted first."""
        for b in reversed(block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] < 0:
                raise RuntimeError(f"block {b} released more often than taken")
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.on_free is not None:
                    self.on_free(b)
