"""Paged cache pools: base K/V (`KVPool`) and low-rank V (`LowRankPool`).

A pool = paged per-layer tensors (`PagedStore`) + one `BlockManager` over their block ids. A
block id means the same block in every layer, so one block table serves all layers. Pages are
mapped as blocks are handed out and unmapped when the top of the pool empties; a pool reserved
for a million tokens costs address space only until it is used.

Writing goes through `kernels.write_kv` / `kernels.write_lowrank` with the slots this pool
returns; `read(...)` gathers a sequence back out (tests, debugging).
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

import vmm

from .blocks import BlockManager, SeqCheckpoint
from .storage import PagedStore, StoreOwner


def _gather(cache: torch.Tensor, table: Sequence[int], num_tokens: int) -> torch.Tensor:
    bs = cache.shape[1]
    pos = torch.arange(num_tokens)
    blocks = torch.as_tensor(list(table), dtype=torch.long)[pos // bs]
    return cache[blocks.to(cache.device), (pos % bs).to(cache.device)]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _Pool(StoreOwner):
    """What every block-managed pool shares: sequences, block tables, slots, accounting."""

    def __init__(self, store: PagedStore, block_size: int, prefix_caching: bool) -> None:
        self.store = store
        self.block_size = block_size
        self.manager = BlockManager(store.max_blocks, block_size, store=store, prefix_caching=prefix_caching)

    # ---- sequences (see BlockManager for the exact contracts) -------------------------------
    def can_allocate(self, token_ids: Sequence[int], namespace: str = "") -> bool:
        """Whether `allocate` of these tokens in `namespace` would succeed now."""
        return self.manager.can_allocate(token_ids, namespace)

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], namespace: str = "", *,
                 evict_first: bool | int = False) -> int:
        """Blocks for a new sequence; returns how many leading tokens are stored already.
        `evict_first`: evict cached blocks before mapping fresh pages (True: as many as save
        pages; an int: at most that many). CacheFullError (nothing changed) when the blocks or
        pages are not available."""
        return self.manager.allocate(seq_id, token_ids, namespace, evict_first=evict_first)

    def can_append(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
        """Whether `append_slots` of `num_tokens` tokens to `seq_id` would succeed now."""
        return self.manager.can_append(seq_id, num_tokens)

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int], *,
                     evict_first: bool | int = False) -> list[int]:
        """Extend `seq_id` by `token_ids`; the slots to write their entries at (copy-on-write
        of a shared partial last block included). `evict_first`: evict cached blocks before
        mapping fresh pages. CacheFullError leaves it unchanged."""
        return self.manager.append_slots(seq_id, token_ids, evict_first=evict_first)

    def append_slot(self, seq_id: Hashable, token_id: int) -> int:
        """`append_slots` for one token: its slot."""
        return self.manager.append_slot(seq_id, token_id)

    def pages_to_allocate(self, token_ids: Sequence[int], namespace: str = "", *,
                          evict_first: bool | int = False) -> int:
        """Physical pages `allocate` of these tokens (with `evict_first`) would map now (pools
        sharing a page pool use it to check a joint request exactly)."""
        return self.manager.pages_to_allocate(token_ids, namespace, evict_first=evict_first)

    def pages_to_append(self, seq_id: Hashable, num_tokens: int = 1, *, evict_first: bool | int = False) -> int:
        """Physical pages `append_slots` of `num_tokens` tokens (with `evict_first`) would map now."""
        return self.manager.pages_to_append(seq_id, num_tokens, evict_first=evict_first)

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """A new sequence `dst_id` sharing every block of `src_id` (no copy until a write)."""
        self.manager.fork(src_id, dst_id)

    def checkpoint(self, seq_id: Hashable) -> SeqCheckpoint:
        """`seq_id`'s state before an `allocate` or `append_slots`, for `rollback`."""
        return self.manager.checkpoint(seq_id)

    def rollback(self, cp: SeqCheckpoint) -> None:
        """Undo the `allocate` or `append_slots` made since `cp`, before any K/V was written
        (see `BlockManager.rollback`)."""
        self.manager.rollback(cp)

    def free(self, seq_id: Hashable) -> None:
        """Drop `seq_id`; its full blocks stay cached for prefix hits until evicted."""
        self.manager.free(seq_id)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self.manager

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of `seq_id`, in order (KeyError if it is not live)."""
        return self.manager.block_table(seq_id)

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens `seq_id` holds."""
        return self.manager.num_tokens(seq_id)

    def slot_mapping(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> list[int]:
        """Slots of positions [start, end); -1 where the token was stored already."""
        return self.manager.slot_mapping(seq_id, start, end)

    def block_tables(self, seq_ids: Sequence[Hashable], width: int | None = None) -> torch.Tensor:
        """`[len(seq_ids), width]` int32 block tables on the pool's device, -1 padded
        (width: the longest table by default)."""
        tables = [self.manager.block_table(s) for s in seq_ids]
        longest = max((len(t) for t in tables), default=0)
        width = longest if width is None else width
        if width < longest:
            raise ValueError(f"width {width} is less than the longest block table ({longest})")
        out = torch.full((len(tables), width), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            out[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        return out.to(self.store.device)

    # ---- memory ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def max_blocks(self) -> int:
        return self.store.max_blocks

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block stands for, over every layer and tensor of the pool."""
        return self.store.bytes_per_block

    def memory_report(self) -> dict:
        """reserved (address space), mapped (pages behind it), used (blocks referenced by live
        sequences) and cached (unreferenced, kept for prefix hits) bytes, with block counts."""
        m = self.manager
        return {
            "reserved_bytes": self.store.reserved_bytes,
            "mapped_bytes": self.store.mapped_bytes,
            "used_bytes": m.num_used_blocks * self.bytes_per_block,
            "cached_bytes": m.num_cached_blocks * self.bytes_per_block,
            "used_blocks": m.num_used_blocks,
            "cached_blocks": m.num_cached_blocks,
            "free_blocks": m.num_free_blocks,
            "max_blocks": self.max_blocks,
            "bytes_per_block": self.bytes_per_block,
        }

    def trim(self) -> None:
        """Evict every cached block and unmap every page above the live blocks."""
        self.manager.evict()
        self.store.trim(self.manager.top)


class KVPool(_Pool):
    """Base K/V cache: per layer `k_caches[l]`, `v_caches[l]` of shape
    `[max_blocks, block_size, num_kv_heads, head_dim]`, views over vmm arenas.

    Args:
        page_pool: physical pages (its backend decides the device).
        num_layers, num_kv_heads, head_dim: the model's attention layout.
        block_size: tokens per block.
        max_blocks: blocks reserved (address space only until used).
        dtype: cache dtype.
        prefix_caching: share full blocks by content within a namespace.
        shrink_slack_pages: spare pages kept mapped per tensor when the top empties.
    """

    def __init__(self, page_pool: vmm.PagePool, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 block_size: int, max_blocks: int, dtype: torch.dtype = torch.bfloat16,
                 prefix_caching: bool = True, shrink_slack_pages: int = 0) -> None:
        for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("block_size", block_size)):
            _positive(name, val)
        store = PagedStore(page_pool, num_layers, ("k", "v"), (block_size, num_kv_heads, head_dim), dtype,
                           max_blocks, shrink_slack_pages=shrink_slack_pages)
        super().__init__(store, block_size, prefix_caching)
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self.k_caches: list[torch.Tensor] = store.tensors["k"]
        self.v_caches: list[torch.Tensor] = store.tensors["v"]

    def read(self, layer: int, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K and V of `layer`, `[num_tokens, num_kv_heads, head_dim]` each."""
        table, n = self.block_table(seq_id), self.num_tokens(seq_id)
        return _gather(self.k_caches[layer], table, n), _gather(self.v_caches[layer], table, n)


class LowRankPool(_Pool):
    """Low-rank V cache (LRAgent's `x·A_v`): per layer `caches[l]` of shape
    `[max_blocks, block_size, rank]`, one rank-r vector per token, with its own blocks and
    block tables (so it can be shared by agents or kept per agent independently of K/V).
    Arguments as for `KVPool`."""

    def __init__(self, page_pool: vmm.PagePool, *, num_layers: int, rank: int, block_size: int,
                 max_blocks: int, dtype: torch.dtype = torch.bfloat16, prefix_caching: bool = True,
                 shrink_slack_pages: int = 0) -> None:
        _positive("rank", rank)
        _positive("block_size", block_size)
        store = PagedStore(page_pool, num_layers, ("lr",), (block_size, rank), dtype, max_blocks,
                           shrink_slack_pages=shrink_slack_pages)
        super().__init__(store, block_size, prefix_caching)
        self.num_layers, self.rank, self.dtype = num_layers, rank, dtype
        self.caches: list[torch.Tensor] = store.tensors["lr"]

    def read(self, layer: int, seq_id: Hashable) -> torch.Tensor:
        """The sequence's low-rank rows of `layer`, `[num_tokens, rank]`."""
        return _gather(self.caches[layer], self.block_table(seq_id), self.num_tokens(seq_id))
