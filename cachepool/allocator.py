"""Lowest-index-first block ids over a store that can grow and shrink at its top.

Handing out the lowest free id keeps live blocks packed at the bottom of the reservation, so
free blocks collect at the top where their pages can be unmapped. The store backs blocks
`[0, backed_blocks)`; everything at or above that is free by construction.
"""
from __future__ import annotations

import heapq
from typing import Protocol

from .errors import CacheFullError


class BlockStore(Protocol):
    """What a block allocator needs from the memory behind its blocks."""

    def backed_blocks(self) -> int:
        """Blocks `[0, n)` are backed by physical memory now."""

    def max_backable(self) -> int:
        """How many blocks (from 0) could be backed with the physical memory available now."""

    def grow_to(self, num_blocks: int) -> None:
        """Back blocks `[0, num_blocks)`; raise CacheFullError and change nothing if impossible."""

    def shrink_to(self, num_blocks: int) -> None:
        """Blocks at or above `num_blocks` are free; the store may release memory behind them."""

    def copy_block(self, src: int, dst: int) -> None:
        """Copy the contents of block `src` into block `dst` (every layer and plane)."""


class UnboundedStore:
    """A store with no memory behind it: every block is always backed (tests, accounting)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def backed_blocks(self) -> int:
        return self.num_blocks

    def max_backable(self) -> int:
        return self.num_blocks

    def grow_to(self, num_blocks: int) -> None:
        pass

    def shrink_to(self, num_blocks: int) -> None:
        pass

    def copy_block(self, src: int, dst: int) -> None:
        pass


class BlockAllocator:
    """Free-list of block ids `[0, num_blocks)`, lowest id first, backed on demand by `store`."""

    def __init__(self, num_blocks: int, store: BlockStore | None = None) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.store: BlockStore = store if store is not None else UnboundedStore(num_blocks)
        self._heap = list(range(num_blocks))  # already a valid heap
        self._free = set(self._heap)
        self._top = 0  # 1 + highest id handed out and not yet returned

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def top(self) -> int:
        """1 + the highest id in use (0 when none is): the blocks that must stay backed."""
        return self._top

    def is_free(self, block: int) -> bool:
        return block in self._free

    def num_obtainable(self, enough: int | None = None) -> int:
        """How many blocks `alloc_many` can hand out now, growing the store if it may. With
        `enough`, the answer may stop at any count >= enough (skips asking the store)."""
        backed = min(self.store.backed_blocks(), self.num_blocks)
        free_backed = len(self._free) - (self.num_blocks - backed)
        if enough is not None and free_backed >= enough:
            return free_backed
        growable = max(0, min(self.store.max_backable(), self.num_blocks) - backed)
        return free_backed + growable

    def alloc_many(self, n: int) -> list[int]:
        """Hand out the `n` lowest free ids, backing them first; all or nothing."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        if n > len(self._free):
            raise CacheFullError(f"asked for {n} blocks, {len(self._free)} of {self.num_blocks} free")
        ids = [heapq.heappop(self._heap) for _ in range(n)]
        need = ids[-1] + 1
        if need > self.store.backed_blocks():
            try:
                self.store.grow_to(need)
            except BaseException:
                for b in ids:
                    heapq.heappush(self._heap, b)
                raise
        self._free.difference_update(ids)
        self._top = max(self._top, need)
        return ids

    def release(self, block: int) -> None:
        """Return `block`; memory above the new top may be released by the store."""
        self.release_many((block,))

    def release_many(self, blocks) -> None:
        """Return several blocks at once (one walk of the top, one shrink)."""
        free, heap = self._free, self._heap
        blocks = list(blocks)
        for b in blocks:
            if not 0 <= b < self.num_blocks or b in free:
                raise ValueError(f"block {b} is not allocated")
        if len(set(blocks)) != len(blocks):
            raise ValueError("a block is returned twice")
        for b in blocks:
            free.add(b)
            heapq.heappush(heap, b)
        top = self._top
        if top - 1 in free:
            while top > 0 and (top - 1) in free:
                top -= 1
            self._top = top
            self.store.shrink_to(top)
