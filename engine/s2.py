"""S2-attention layers (a config's Phi-3-small-style `blocksparse_*` keys) for the engine.

The pattern is `kernels.S2Pattern` (per-KV-head strided shards plus a local window, causal in the
diagonal block). Two pieces live here:

- `ShardedKV`: the head-sharded K/V of every S2 layer for every stream of one engine. Each KV
  head keeps only the blocks it will ever read again (its strided shard plus the local window)
  and gives window blocks back as the window moves on; the kernels read it through per-KV-head
  block tables (`kernels.s2_attention_prefill_paged` / `s2_attention_decode`).
- `S2Masks`: the mask rows the torch attention path applies to a chunk of queries.

Why not `cachepool.HeadShardedKVPool`: that pool gives a prefill chunk only the blocks the chunk's
*last* query keeps (its earlier queries are meant to read the chunk's own contiguous K/V), while
the engine attends to whole chunks through the paged cache, so every block any query of the
chunk reads must be stored until the forward is done. It also keeps its own block budget, where
the engine's pools share one byte budget. `ShardedKV` is built on the same pieces
(`cachepool.PagedStore`, `cachepool.BlockAllocator`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

import vmm
from cachepool import BlockAllocator, CacheFullError, PagedStore
from cachepool.storage import StoreOwner

from .config import ModelConfig
from .kvcache import ByteBudget, CacheFull


def s2_pattern(config: ModelConfig):
    """The `kernels.S2Pattern` of the config's S2 layers."""
    from kernels import S2Pattern

    s = config.s2
    return S2Pattern(config.num_heads, s.sparse_block, s.local_blocks, s.vert_stride,
                     num_kv_heads=config.num_kv_heads, homo_head=s.homo_head)


def s2_layers(config: ModelConfig) -> list[int]:
    """The layers that use S2-attention, ascending (none without an S2 config)."""
    if config.s2 is None:
        return []
    return [layer for layer in range(config.num_layers) if config.is_s2_layer(layer)]


class S2Masks:
    """The S2 pattern's mask rows for the torch attention path (the kernels need none)."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.pattern = s2_pattern(config)
        self._block_mask = torch.zeros(0, 0, 0, dtype=torch.bool)

    def _blocks(self, nb: int) -> torch.Tensor:
        if self._block_mask.shape[1] < nb:
            # grow geometrically so a long decode does not rebuild the block mask every step
            self._block_mask = self.pattern.block_mask(max(nb, 2 * self._block_mask.shape[1]))
        return self._block_mask[:, :nb, :nb]

    def mask(self, layer: int, start: int, end: int, device) -> torch.Tensor | None:
        """bool [Hq, end - start, end]: which keys each head's queries at positions start..end-1
        may read under the pattern (causality is applied by the caller); None for dense layers."""
        if not self.config.is_s2_layer(layer):
            return None
        sb = self.pattern.sparse_block
        nb = -(-end // sb)
        bm = self._blocks(nb).to(device)  # [Hkv, nb, nb]
        qb = torch.arange(start, end, device=device) // sb
        kb = torch.arange(end, device=device) // sb
        m = bm[:, qb][:, :, kb]  # [Hkv, n, end]
        return m.repeat_interleave(self.pattern.group, dim=0)


class ShardedStream:
    """One token sequence's K/V in the S2 layers: per KV head, logical block -> physical block,
    -1 where the head no longer stores it. Blocks below `settled` are out of every query's
    window for good, so whether a head holds them never changes again."""

    def __init__(self, num_kv_heads: int):
        self.tables: list[list[int]] = [[] for _ in range(num_kv_heads)]
        self.length = 0  # tokens whose K/V are written
        self.settled = 0
        self._table: torch.Tensor | None = None  # device copy of `tables`, rebuilt after a change

    @property
    def num_blocks(self) -> int:
        """Logical blocks reserved (held by some head or released)."""
        return len(self.tables[0])

    def held(self) -> list[int]:
        """Every physical block the stream holds."""
        return [b for t in self.tables for b in t if b >= 0]


class ShardedKV(StoreOwner):
    """Head-sharded K/V of the S2 layers of one engine, on vmm pages, inside its byte budget.

    Args:
        pattern: the S2 pattern (`kernels.S2Pattern`) shared by the S2 layers.
        layers: the model layers stored here (the S2 layers).
        head_dim, dtype: the K/V layout.
        block_size: the engine's block size; a physical block here holds
            `gcd(block_size, sparse_block)` tokens of one KV head, so a block lies in exactly one
            sparse block and is kept or dropped as a whole.
        budget, page_pool: the engine's byte budget and physical pages, shared with its pools.

    A stream's life: `reserve(stream, end)` before a forward gives every KV head a block for
    each new logical block (every query of a chunk reads its own position's block, so each is
    read by some query of the chunk); the forward writes and attends; `trim(stream, end)` after
    it gives back the window blocks no query from position `end` on reads; `release` frees all.
    """

    def __init__(self, pattern, layers: Sequence[int], head_dim: int, block_size: int,
                 dtype: torch.dtype, budget: ByteBudget, page_pool: vmm.PagePool):
        self.pattern = pattern
        self.layers = {layer: i for i, layer in enumerate(layers)}
        self.num_kv_heads = pattern.num_kv_heads
        self.block_size = math.gcd(block_size, pattern.sparse_block)
        self.budget = budget
        per_block = 2 * len(layers) * self.block_size * head_dim * dtype.itemsize
        max_blocks = max(1, budget.capacity // per_block)
        self.store = PagedStore(page_pool, len(layers), ("k", "v"), (self.block_size, 1, head_dim), dtype,
                                max_blocks)
        self.block_bytes = self.store.bytes_per_block  # one KV head's block in every S2 layer, K and V
        self.allocator = BlockAllocator(max_blocks, self.store)

    @property
    def device(self) -> torch.device:
        return self.store.device

    def holds(self, layer: int) -> bool:
        """Whether `layer` keeps its K/V here."""
        return layer in self.layers

    def k_cache(self, layer: int) -> torch.Tensor:
        """K of `layer`: [max_blocks, block_size, 1, head_dim] (the kernels' per-head layout)."""
        return self.store.tensors["k"][self.layers[layer]]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.store.tensors["v"][self.layers[layer]]

    def new_stream(self) -> ShardedStream:
        return ShardedStream(self.num_kv_heads)

    # ---- reserving and giving back -------------------------------------------------------------
    def _new_blocks(self, s: ShardedStream | None, end: int) -> int:
        return max(0, -(-end // self.block_size) - (s.num_blocks if s is not None else 0))

    def bytes_to_reserve(self, s: ShardedStream | None, end: int) -> int:
        """Bytes `reserve(s, end)` takes from the budget (s None: a stream not started yet)."""
        return self._new_blocks(s, end) * self.num_kv_heads * self.block_bytes

    def reserve(self, s: ShardedStream, end: int) -> None:
        """Blocks for every KV head up to token `end`; all or nothing (CacheFull)."""
        n = self._new_blocks(s, end)
        if n == 0:
            return
        need = n * self.num_kv_heads
        if self.budget.used + need * self.block_bytes > self.budget.capacity:
            raise CacheFull(f"S2 layers: {need} head blocks of {self.block_bytes} B exceed the KV budget "
                            f"({self.budget.used} of {self.budget.capacity} B in use)")
        try:
            ids = self.allocator.alloc_many(need)
        except CacheFullError as e:  # nothing was taken
            raise CacheFull(f"S2 layers: {e}") from e
        self.budget.used += need * self.block_bytes
        for h, table in enumerate(s.tables):
            table.extend(ids[h * n:(h + 1) * n])
        s._table = None

    def trim(self, s: ShardedStream, end: int) -> None:
        """`end` tokens are written: give back each head's blocks that no query from position
        `end` on reads (window blocks the window has moved past)."""
        s.length = max(s.length, end)
        p = self.pattern
        query_block = end // p.sparse_block
        gone = []
        while s.settled < s.num_blocks:
            j = s.settled * self.block_size // p.sparse_block
            if query_block - j < p.local_blocks:  # still in the window: not settled yet
                break
            for h, table in enumerate(s.tables):
                if table[s.settled] >= 0 and not p.kv_head_keeps(h, j, query_block):
                    gone.append(table[s.settled])
                    table[s.settled] = -1
            s.settled += 1
        if gone:
            self._free(gone)
            s._table = None

    def release(self, s: ShardedStream) -> int:
        """Free every block of the stream; returns the bytes freed."""
        held = s.held()
        self._free(held)
        s.tables = [[] for _ in range(self.num_kv_heads)]
        s.length = s.settled = 0
        s._table = None
        return len(held) * self.block_bytes

    def _free(self, ids: list[int]) -> None:
        self.allocator.release_many(ids)
        self.budget.used -= len(ids) * self.block_bytes

    def nbytes(self, s: ShardedStream) -> int:
        return len(s.held()) * self.block_bytes

    # ---- tables, slots, reads and writes ---------------------------------------------------------
    def table(self, s: ShardedStream) -> torch.Tensor:
        """int32 [num_kv_heads, num_blocks] on the pool's device, -1 where a head stores nothing."""
        if s._table is None:
            s._table = torch.tensor(s.tables, dtype=torch.int32).view(self.num_kv_heads, -1).to(self.device)
        return s._table

    def block_tables(self, streams: Sequence[ShardedStream]) -> torch.Tensor:
        """int32 [len(streams), num_kv_heads, width] (the kernels' per-head tables), -1 padded."""
        width = -(-max(1, max(s.num_blocks for s in streams)) // 16) * 16  # see engine.attention.TABLE_ALIGN
        out = torch.full((len(streams), self.num_kv_heads, width), -1, dtype=torch.int32, device=self.device)
        for i, s in enumerate(streams):
            out[i, :, :s.num_blocks] = self.table(s)
        return out

    def slots(self, s: ShardedStream, start: int, end: int) -> torch.Tensor:
        """Flat slots (block * block_size + offset) of tokens [start, end) per KV head:
        int64 [end - start, num_kv_heads]. Only reserved, not yet trimmed tokens have slots."""
        bs = self.block_size
        if not 0 <= start <= end <= s.num_blocks * bs:
            raise ValueError(f"tokens [{start}, {end}) are outside the stream's {s.num_blocks * bs} reserved slots")
        first, last = start // bs, -(-end // bs)
        rows = [t[first:last] for t in s.tables]  # checked on the host: no device sync per chunk
        if any(b < 0 for row in rows for b in row):
            raise ValueError(f"tokens [{start}, {end}) include blocks already given back")
        phys = torch.tensor(rows, dtype=torch.int64).view(self.num_kv_heads, -1).to(self.device)
        pos = torch.arange(start, end, device=self.device)
        return (phys[:, pos // bs - first] * bs + pos % bs).T

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [n, num_kv_heads, head_dim] of `layer` at `slots` [n, num_kv_heads]."""
        for cache, x in ((self.k_cache(layer), k), (self.v_cache(layer), v)):
            flat = cache.view(-1, cache.shape[-1])
            flat[slots.reshape(-1)] = x.reshape(-1, x.shape[-1]).to(flat.dtype)

    def read(self, layer: int, s: ShardedStream, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [n, num_kv_heads, head_dim] of tokens [0, n) of `layer`; zeros where a head
        stores nothing (the S2 pattern never reads those)."""
        bs = self.block_size
        pos = torch.arange(n, device=self.device)
        phys = self.table(s)[:, pos // bs].long()  # [heads, n]
        idx = (phys.clamp_min(0) * bs + pos % bs).T  # [n, heads]
        absent = (phys < 0).T[..., None]
        out = []
        for cache in (self.k_cache(layer), self.v_cache(layer)):
            x = cache.view(-1, cache.shape[-1])[idx]
            out.append(x.masked_fill(absent, 0))
        return out[0], out[1]

    # ---- accounting --------------------------------------------------------------------------------
    def report(self, streams: Sequence[ShardedStream]) -> dict:
        """Bytes held for `streams` (the live ones), and `full_bytes`: what storing every block for
        every KV head of the same tokens would take."""
        used = self.allocator.num_allocated
        full = sum(-(-s.length // self.block_size) for s in streams) * self.num_kv_heads
        return {
            "layers": sorted(self.layers),
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "blocks_in_use": used,
            "used_bytes": used * self.block_bytes,
            "full_bytes": full * self.block_bytes,
            "mapped_bytes": self.store.mapped_bytes,
            "reserved_bytes": self.store.reserved_bytes,
            "pages_mapped": self.store.mapped_bytes // self.store.page_size,
        }
