"""Paged KV cache pools on vmm: base K/V, low-rank V, head-sharded (S2); block tables;
prefix sharing across agents under the four cache modes of DESIGN.md."""
from __future__ import annotations

from .allocator import BlockAllocator, BlockStore, UnboundedStore
from .blocks import BlockManager, block_hash
from .errors import CacheFullError, CachePoolError

__all__ = [
    "BlockAllocator", "BlockManager", "BlockStore", "CacheFullError", "CachePoolError",
    "UnboundedStore", "block_hash",
]
