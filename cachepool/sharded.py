"""Head-sharded KV pool for S2-attention layers: each KV head stores only what it will read.

Under an S2 pattern, KV head h reads key block j from query block i when j is in its strided
shard or in the local window (`i - j < local_blocks`). Queries only move forward, so once the
current query block is i, a block that is outside the window and not in the head's shard is
never read again: the pool frees it. What a head holds for a long context is its shard
(≈ 1 / vert_stride of the blocks) plus the window, instead of every block.

Layout (the S2 decode kernel's per-head contract): per layer K and V caches
`[max_blocks, block_size, 1, head_dim]`, one KV head per physical block, and block tables
`[batch, num_kv_heads, max_logical_blocks] int32` mapping (head, logical block) to a physical
block, -1 where the head stores nothing. `block_size` divides `sparse_block`, so a logical block
lies in exactly one sparse block.

Appending n tokens (a prefill chunk or one decode token):
1. releases the blocks no query from the first new token on reads;
2. gives every head a block for each new logical block it keeps at the chunk's *last* query
   block, and returns slots `[n, num_kv_heads]` (-1 where the head does not keep the token: the
   chunk's own queries read such tokens from the chunk's contiguous K/V, not from the cache).
Blocks the chunk's earlier queries still needed but its last one does not are freed at the next
append, or right after the forward by `release(seq_id)`.
Write with `kernels.write_kv(k.reshape(n * Hkv, 1, D), v.reshape(n * Hkv, 1, D), k_cache,
v_cache, slots.reshape(-1))`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence

import torch

import vmm

from .allocator import BlockAllocator
from .errors import CacheFullError
from .storage import PagedStore, StoreOwner


class ShardPattern(Protocol):
    """What the pool needs of an S2 pattern (`kernels.S2Pattern` is one)."""
    num_kv_heads: int
    sparse_block: int
    local_blocks: int

    def in_shard(self, kv_head: int, j: int) -> bool:
        """Key block j is in the KV head's shard (read by every later query block)."""

    def kv_head_keeps(self, kv_head: int, j: int, query_block: int) -> bool:
        """Some query block >= query_block of the KV head still reads key block j."""


@dataclass
class _Seq:
    num_tokens: int = 0
    tables: list[list[int]] = field(default_factory=list)  # [head][logical block] -> physical / -1
    window: list[deque] = field(default_factory=list)  # per head: held logical blocks outside its shard


class HeadShardedKVPool(StoreOwner):
    """Per-KV-head paged K/V for S2 layers, holding only blocks that will be read again.

    Args:
        page_pool: physical pages (its backend decides the device).
        pattern: the layer's S2 pattern (`kernels.S2Pattern` or anything `ShardPattern`).
        num_layers, head_dim: model layout (num_kv_heads comes from the pattern).
        block_size: tokens per physical block; must divide `pattern.sparse_block`.
        max_blocks: physical blocks reserved (each holds one head's block_size tokens).
        dtype, shrink_slack_pages: as for `KVPool`.
    """

    def __init__(self, page_pool: vmm.PagePool, pattern: ShardPattern, *, num_layers: int, head_dim: int,
                 block_size: int, max_blocks: int, dtype: torch.dtype = torch.bfloat16,
                 shrink_slack_pages: int = 0) -> None:
        for name in ("num_kv_heads", "sparse_block", "local_blocks", "in_shard", "kv_head_keeps"):
            if not hasattr(pattern, name):
                raise TypeError(f"pattern lacks {name!r}; pass a kernels.S2Pattern")
        for name, val in (("head_dim", head_dim), ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if pattern.sparse_block % block_size:
            raise ValueError(f"block_size {block_size} must divide the pattern's sparse_block "
                             f"{pattern.sparse_block}")
        self.pattern = pattern
        self.num_kv_heads = int(pattern.num_kv_heads)
        self.block_size, self.head_dim, self.num_layers, self.dtype = block_size, head_dim, num_layers, dtype
        self.store = PagedStore(page_pool, num_layers, ("k", "v"), (block_size, 1, head_dim), dtype,
                                max_blocks, shrink_slack_pages=shrink_slack_pages)
        self._alloc = BlockAllocator(max_blocks, self.store)
        self.k_caches: list[torch.Tensor] = self.store.tensors["k"]
        self.v_caches: list[torch.Tensor] = self.store.tensors["v"]
        self._seqs: dict[Hashable, _Seq] = {}

    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def max_blocks(self) -> int:
        return self.store.max_blocks

    def _get(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"no live sequence {seq_id!r}") from None

    def _sparse_of(self, logical_block: int) -> int:
        return logical_block * self.block_size // self.pattern.sparse_block

    # ---- planning ----------------------------------------------------------------------------
    def _releasable(self, s: _Seq, query_block: int) -> list[tuple[int, int]]:
        """(head, logical block) pairs held that no query block >= query_block reads."""
        out = []
        for h, win in enumerate(s.window):
            for b in win:  # ascending: stop at the first block still kept
                if self.pattern.kv_head_keeps(h, self._sparse_of(b), query_block):
                    break
                out.append((h, b))
        return out

    def _plan(self, s: _Seq, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        p0, bs = s.num_tokens, self.block_size
        release = self._releasable(s, p0 // self.pattern.sparse_block) if p0 else []
        last_q = (p0 + n - 1) // self.pattern.sparse_block
        new = []
        for b in range(-(-p0 // bs), -(-(p0 + n) // bs)):
            j = self._sparse_of(b)
            new.extend((h, b) for h in range(self.num_kv_heads) if self.pattern.kv_head_keeps(h, j, last_q))
        return release, new

    # ---- sequences ---------------------------------------------------------------------------
    def can_append(self, seq_id: Hashable | None, num_tokens: int) -> bool:
        """Whether `append` (or, with seq_id None, `allocate`) of num_tokens would succeed now."""
        s = _Seq() if seq_id is None else self._get(seq_id)
        if seq_id is None:
            s.tables = [[] for _ in range(self.num_kv_heads)]
            s.window = [deque() for _ in range(self.num_kv_heads)]
        release, new = self._plan(s, self._check_n(num_tokens))
        return len(new) <= self._alloc.num_obtainable() + len(release)

    @staticmethod
    def _check_n(n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {n!r}")
        return n

    def allocate(self, seq_id: Hashable, num_tokens: int) -> torch.Tensor:
        """Start a sequence with `num_tokens` tokens; returns their slots `[n, num_kv_heads]`."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        s = _Seq(0, [[] for _ in range(self.num_kv_heads)], [deque() for _ in range(self.num_kv_heads)])
        slots = self._append(s, self._check_n(num_tokens), seq_id)
        self._seqs[seq_id] = s
        return slots

    def append(self, seq_id: Hashable, num_tokens: int = 1) -> torch.Tensor:
        """Extend a sequence (releasing what its new queries no longer read); returns the new
        tokens' slots `[n, num_kv_heads]` int64 on the pool's device, -1 where not stored."""
        return self._append(self._get(seq_id), self._check_n(num_tokens), seq_id)

    def _append(self, s: _Seq, n: int, seq_id: Hashable) -> torch.Tensor:
        release, new = self._plan(s, n)
        if len(new) > self._alloc.num_obtainable() + len(release):
            raise CacheFullError(f"sequence {seq_id!r} needs {len(new)} blocks for {n} tokens, "
                                 f"{self._alloc.num_obtainable() + len(release)} available")
        self._release(s, release)
        ids = self._alloc.alloc_many(len(new))
        p0, bs = s.num_tokens, self.block_size
        nblocks = -(-(p0 + n) // bs)
        for t in s.tables:
            t.extend([-1] * (nblocks - len(t)))
        for (h, b), pid in zip(new, ids):
            s.tables[h][b] = pid
            if not self.pattern.in_shard(h, self._sparse_of(b)):
                s.window[h].append(b)
        s.num_tokens = p0 + n
        b0 = p0 // bs  # only the blocks the new tokens fall in
        sub = torch.tensor([t[b0:nblocks] for t in s.tables], dtype=torch.int64).reshape(self.num_kv_heads, -1)
        pos = torch.arange(p0, p0 + n)
        phys = sub[:, pos // bs - b0].T  # [n, heads]
        slots = torch.where(phys >= 0, phys * bs + (pos % bs)[:, None], torch.full_like(phys, -1))
        return slots.to(self.device)

    def _release(self, s: _Seq, pairs: list[tuple[int, int]]) -> None:
        for h, b in pairs:
            s.window[h].popleft()
            self._alloc.release(s.tables[h][b])
            s.tables[h][b] = -1

    def release(self, seq_id: Hashable) -> int:
        """Free now every block that no query block from the sequence's last token on reads
        (call after a prefill's forward); returns how many were freed."""
        s = self._get(seq_id)
        if s.num_tokens == 0:
            return 0
        pairs = self._releasable(s, (s.num_tokens - 1) // self.pattern.sparse_block)
        self._release(s, pairs)
        return len(pairs)

    def free(self, seq_id: Hashable) -> None:
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise KeyError(f"no live sequence {seq_id!r}")
        # Highest ids first, so the top of the pool empties in one walk.
        for pid in sorted((p for t in s.tables for p in t if p >= 0), reverse=True):
            self._alloc.release(pid)

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._get(seq_id).num_tokens

    def block_table(self, seq_id: Hashable) -> list[list[int]]:
        """Per KV head, logical block -> physical block (-1: not stored)."""
        return [list(t) for t in self._get(seq_id).tables]

    def block_tables(self, seq_ids: Sequence[Hashable], width: int | None = None) -> torch.Tensor:
        """`[len(seq_ids), num_kv_heads, width]` int32 on the pool's device, -1 padded."""
        seqs = [self._get(s) for s in seq_ids]
        longest = max((len(s.tables[0]) if s.tables else 0 for s in seqs), default=0)
        width = longest if width is None else width
        if width < longest:
            raise ValueError(f"width {width} is less than the longest block table ({longest})")
        out = torch.full((len(seqs), self.num_kv_heads, width), -1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            if s.tables and s.tables[0]:
                out[i, :, :len(s.tables[0])] = torch.tensor(s.tables, dtype=torch.int32)
        return out.to(self.device)

    def read(self, layer: int, seq_id: Hashable, kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, K, V) of the tokens `kv_head` stores for the sequence in `layer`:
        positions `[m]`, K and V `[m, head_dim]` (tests and debugging)."""
        s = self._get(seq_id)
        if not 0 <= kv_head < self.num_kv_heads:
            raise ValueError(f"kv_head must be in [0, {self.num_kv_heads}), got {kv_head}")
        table = torch.tensor(s.tables[kv_head], dtype=torch.int64)
        pos = torch.arange(s.num_tokens)
        phys = table[pos // self.block_size] if s.num_tokens else table[:0]
        keep = phys >= 0
        pos, phys = pos[keep], phys[keep]
        dev = self.device
        blk, off = phys.to(dev), (pos % self.block_size).to(dev)
        return pos, self.k_caches[layer][blk, off, 0], self.v_caches[layer][blk, off, 0]

    # ---- memory ------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """reserved / mapped / used bytes, and `full_pool_bytes`: what a pool storing every block
        for every head would use for the same live sequences."""
        per_block = self.store.bytes_per_block
        used = self._alloc.num_allocated
        full = sum(-(-s.num_tokens // self.block_size) for s in self._seqs.values()) * self.num_kv_heads
        return {
            "reserved_bytes": self.store.reserved_bytes,
            "mapped_bytes": self.store.mapped_bytes,
            "used_bytes": used * per_block,
            "full_pool_bytes": full * per_block,
            "used_blocks": used,
            "free_blocks": self._alloc.num_free,
            "max_blocks": self.max_blocks,
            "bytes_per_block": per_block,
        }

    def trim(self) -> None:
        """Unmap every page above the live blocks (slack included)."""
        self.store.trim(self._alloc.top)
