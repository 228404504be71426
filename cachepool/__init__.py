"""Paged KV cache pools on vmm: base K/V, low-rank V, head-sharded (S2); block tables;
prefix sharing across agents under the four cache modes of DESIGN.md.

    import vmm, cachepool
    pages = vmm.PagePool(vmm.get_backend(), capacity_bytes=8 << 30)
    kv = cachepool.KVPool(pages, num_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
                          max_blocks=65536)
    lr = cachepool.LowRankPool(pages, num_layers=32, rank=8, block_size=16, max_blocks=65536)
    session = cachepool.MultiAgentCache("base_lr_shared", [cachepool.AgentSpec("a", "llama", "A0"),
                                                           cachepool.AgentSpec("b", "llama", "A0")], kv, lr)
    stored_kv, stored_lr = session.allocate("a", 0, prompt_ids)
    slots = session.slot_mapping("a", 0)     # -1 where a pool already holds the token
    kernels.write_kv(k, v, kv.k_caches[layer], kv.v_caches[layer], torch.tensor(slots.kv, ...))

Importing this package imports vmm (and torch), not kernels: the pools hand out tensors and
slots, and callers write them with `kernels.write_kv` / `kernels.write_lowrank`.
"""
from __future__ import annotations

from .allocator import BlockAllocator, BlockStore, UnboundedStore
from .blocks import BlockManager, SeqCheckpoint, block_hash
from .errors import CacheFullError, CachePoolError
from .modes import AgentRoute, AgentSpec, CacheMode, MultiAgentCache, SeqSlots
from .pools import KVPool, LowRankPool
from .sharded import HeadShardedKVPool, ShardPattern
from .storage import PagedStore

__all__ = [
    "AgentRoute", "AgentSpec", "BlockAllocator", "BlockManager", "BlockStore", "CacheFullError",
    "CacheMode", "CachePoolError", "HeadShardedKVPool", "KVPool", "LowRankPool", "MultiAgentCache", "PagedStore",
    "SeqCheckpoint", "SeqSlots", "ShardPattern", "UnboundedStore", "block_hash",
]
