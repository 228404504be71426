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

    def pages_to_back(self, num_blocks: int) -> int:
        """How many physical pages `grow_to(num_blocks)` would map now (0 if none)."""

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

    def pages_to_back(self, num_blocks: int) -> int:
        return 0

    def shrink_to(self, num_blocks: int) -> None:
        pass

    def copy_block(self, src: int, dst: int) -> None:
        pass


class BlockAllocator:
    """Free-list of block ids `[0, num_blocks)`, lowest id first, backed on demand by `store`.

    Memory is O(blocks in use), not O(num_blocks): every id at or above `top` is free by
    construction (a budget of tens of GB over blocks of a few dozen bytes is a billion ids), and
    only ids returned below `top` are kept, in a set and a heap (lazily pruned: an entry whose
    id left the set is skipped)."""

    def __init__(self, num_blocks: int, store: BlockStore | None = None) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.store: BlockStore = store if store is not None else UnboundedStore(num_blocks)
        self._top = 0  # 1 + highest id handed out and not yet returned
        self._freed: set[int] = set()  # free ids below _top
        self._heap: list[int] = []  # the ids of _freed (and stale entries, skipped)

    @property
    def num_free(self) -> int:
        return len(self._freed) + self.num_blocks - self._top

    @property
    def num_allocated(self) -> int:
        return self._top - len(self._freed)

    @property
    def top(self) -> int:
        """1 + the highest id in use (0 when none is): the blocks that must stay backed."""
        return self._top

    def is_free(self, block: int) -> bool:
        return block in self._freed or self._top <= block < self.num_blocks

    def num_free_backed(self, backed: int | None = None) -> int:
        """Free ids `alloc_many` can hand out without mapping a page (`backed`: the store's
        backed blocks, when the caller has them)."""
        if backed is None:
            backed = min(self.store.backed_blocks(), self.num_blocks)
        return self.num_free - (self.num_blocks - backed)

    def num_obtainable(self, enough: int | None = None) -> int:
        """How many blocks `alloc_many` can hand out now, growing the store if it may. With
        `enough`, the answer may stop at any count >= enough (skips asking the store)."""
        backed = min(self.store.backed_blocks(), self.num_blocks)
        free_backed = self.num_free_backed(backed)
        if enough is not None and free_backed >= enough:
            return free_backed
        growable = max(0, min(self.store.max_backable(), self.num_blocks) - backed)
        return free_backed + growable

    def pages_to_alloc(self, n: int) -> int:
        """Physical pages `alloc_many(n)` would map now: it hands out the returned ids (all
        below the top, so already backed) before any id from the top on."""
        if n <= len(self._freed):
            return 0
        return self.store.pages_to_back(self._top + n - len(self._freed))

    def _pop_freed(self, n: int) -> list[int]:
        """Up to `n` of the lowest returned ids, taken off the heap (not yet off the set)."""
        heap, freed, out = self._heap, self._freed, []
        while heap and len(out) < n:
            b = heapq.heappop(heap)
            if b in freed and (not out or b != out[-1]):
                out.append(b)
        return out

    def alloc_many(self, n: int) -> list[int]:
        """Hand out the `n` lowest free ids, backing them first; all or nothing."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        if n > self.num_free:
            raise CacheFullError(f"asked for {n} blocks, {self.num_free} of {self.num_blocks} free")
        # returned ids lie below _top, so they come before any id from _top on
        reused = self._pop_freed(n)
        ids = reused + list(range(self._top, self._top + n - len(reused)))
        need = ids[-1] + 1
        if need > self.store.backed_blocks():
            try:
                self.store.grow_to(need)
            except BaseException:
                for b in reused:
                    heapq.heappush(self._heap, b)
                raise
        self._freed.difference_update(reused)
        self._top = max(self._top, need)
        return ids

    def release(self, block: int) -> None:
        """Return `block`; memory above the new top may be released by the store."""
        self.release_many((block,))

    def release_many(self, blocks) -> None:
        """Return several blocks at once (one walk of the top, one shrink)."""
        freed, heap = self._freed, self._heap
        blocks = list(blocks)
        for b in blocks:
            if not 0 <= b < self._top or b in freed:
                raise ValueError(f"block {b} is not allocated")
        if len(set(blocks)) != len(blocks):
            raise ValueError("a block is returned twice")
        for b in blocks:
            freed.add(b)
            heapq.heappush(heap, b)
        top = self._top
        if top - 1 in freed:
            while top > 0 and (top - 1) in freed:
                top -= 1
                freed.remove(top)  # at or above the top: free by construction
            self._top = top
            if len(heap) > 2 * len(freed) + 64:  # drop the stale entries
                self._heap = sorted(freed)
            self.store.shrink_to(top)
