"""Per-layer paged tensors over vmm arenas, backed from the bottom up as blocks are used.

A store holds `planes` (e.g. K and V, or the low-rank L) for each of `num_layers` layers; each
plane of each layer is one `VirtualArena` reserved for `max_blocks` blocks and viewed as one
tensor `[max_blocks, *block_shape]`. Blocks `[0, backed)` have pages mapped behind them in every
arena, so all layers grow and shrink together. Only the top of the reservation is ever mapped
or unmapped: block allocators hand out the lowest free id, which keeps the top the free end.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

import vmm

from .errors import CacheFullError


class PagedStore:
    """Paged tensors for one pool; implements `BlockStore` for its block allocator.

    Args:
        page_pool: where physical pages come from (shared with other pools is fine).
        num_layers: layers; every plane has one tensor per layer.
        planes: names of the tensors per layer, e.g. ("k", "v").
        block_shape: the shape of one block, e.g. (block_size, num_kv_heads, head_dim).
        dtype: element type of every plane.
        max_blocks: blocks reserved per tensor (virtual address space only).
        shrink_slack_pages: spare pages per tensor kept mapped at the top after a shrink, so a
            pool that breathes around one page boundary does not map and unmap on every step.
    """

    def __init__(self, page_pool: vmm.PagePool, num_layers: int, planes: Sequence[str],
                 block_shape: Sequence[int], dtype: torch.dtype, max_blocks: int, *,
                 shrink_slack_pages: int = 0) -> None:
        if not isinstance(page_pool, vmm.PagePool):
            raise TypeError(f"page_pool must be a vmm.PagePool, got {type(page_pool).__name__}")
        for name, val in (("num_layers", num_layers), ("max_blocks", max_blocks)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if isinstance(shrink_slack_pages, bool) or not isinstance(shrink_slack_pages, int) or shrink_slack_pages < 0:
            raise ValueError(f"shrink_slack_pages must be an int >= 0, got {shrink_slack_pages!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.block_shape = tuple(int(d) for d in block_shape)
        if not self.block_shape or min(self.block_shape) < 1:
            raise ValueError(f"block_shape must be positive ints, got {tuple(block_shape)}")
        self.page_pool = page_pool
        self.page_size = page_pool.page_size
        self.num_layers, self.max_blocks, self.dtype = num_layers, max_blocks, dtype
        self.planes = tuple(planes)
        self.shrink_slack_pages = shrink_slack_pages
        self.block_bytes = math.prod(self.block_shape) * dtype.itemsize  # per tensor
        self._mapped_pages = 0  # per arena; every arena maps the same prefix
        self._held_pages = 0  # pages of the page pool promised elsewhere (see `holding_pages`)
        self.arenas: list[vmm.VirtualArena] = []
        self.tensors: dict[str, list[torch.Tensor]] = {p: [] for p in self.planes}
        try:
            for _ in range(num_layers):
                for p in self.planes:
                    a = vmm.VirtualArena(page_pool, max_blocks * self.block_bytes)
                    self.arenas.append(a)
                    self.tensors[p].append(a.view(0, (max_blocks, *self.block_shape), dtype,
                                                  require_mapped=False))
        except BaseException:
            self.close()
            raise

    @property
    def device(self) -> torch.device:
        return self.page_pool.device

    @property
    def num_tensors(self) -> int:
        return len(self.arenas)

    def _pages_for(self, num_blocks: int) -> int:
        return -(-num_blocks * self.block_bytes // self.page_size)

    # ---- BlockStore --------------------------------------------------------------------------
    def backed_blocks(self) -> int:
        return min(self._mapped_pages * self.page_size // self.block_bytes, self.max_blocks)

    def _pages_available(self) -> int:
        st = self.page_pool.stats()
        return max(0, st["capacity_bytes"] // st["page_size"] - st["pages_in_use"] - self._held_pages)

    @contextmanager
    def holding_pages(self, n: int) -> Iterator[None]:
        """Inside the block, answer as if `n` more pages of the page pool were taken: what a
        sibling pool on the same pages is about to map, so that a joint check is exact."""
        self._held_pages += n
        try:
            yield
        finally:
            self._held_pages -= n

    def pages_to_back(self, num_blocks: int) -> int:
        target = self._pages_for(min(num_blocks, self.max_blocks))
        return max(0, target - self._mapped_pages) * self.num_tensors

    def max_backable(self) -> int:
        per_arena = self._mapped_pages + self._pages_available() // max(1, self.num_tensors)
        return min(per_arena * self.page_size // self.block_bytes, self.max_blocks)

    def grow_to(self, num_blocks: int) -> None:
        if num_blocks > self.max_blocks:
            raise CacheFullError(f"{num_blocks} blocks asked of a store reserved for {self.max_blocks}")
        target = self._pages_for(num_blocks)
        if target <= self._mapped_pages:
            return
        off, nbytes = self._mapped_pages * self.page_size, (target - self._mapped_pages) * self.page_size
        done = []
        try:
            for a in self.arenas:
                a.map(off, nbytes)
                done.append(a)
        except vmm.OutOfMemoryError as e:
            for a in done:
                a.unmap(off, nbytes)
            raise CacheFullError(f"no pages to back {num_blocks} blocks: {e}") from e
        except BaseException:
            for a in done:
                a.unmap(off, nbytes)
            raise
        self._mapped_pages = target

    def shrink_to(self, num_blocks: int) -> None:
        self._unmap_above(self._pages_for(num_blocks), self.shrink_slack_pages)

    def _unmap_above(self, keep_pages: int, slack: int) -> None:
        if self._mapped_pages - keep_pages <= slack:
            return
        off = keep_pages * self.page_size
        nbytes = (self._mapped_pages - keep_pages) * self.page_size
        for a in self.arenas:
            a.unmap(off, nbytes)  # vmm synchronises the device before unmapping
        self._mapped_pages = keep_pages

    def trim(self, num_blocks: int) -> None:
        """Unmap every page above those that blocks `[0, num_blocks)` need, slack included."""
        self._unmap_above(self._pages_for(num_blocks), 0)

    def copy_block(self, src: int, dst: int) -> None:
        for ts in self.tensors.values():
            for t in ts:
                t[dst].copy_(t[src])

    # ---- accounting --------------------------------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        return sum(a.reserved_bytes for a in self.arenas)

    @property
    def mapped_bytes(self) -> int:
        return sum(a.mapped_bytes for a in self.arenas)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for across all layers and planes."""
        return self.block_bytes * self.num_tensors

    def close(self) -> None:
        """Unmap and release every arena; the tensors must not be used afterwards."""
        for a in self.arenas:
            a.close()
        self._mapped_pages = 0


class StoreOwner:
    """Closing and `with` support for a pool whose memory is one `PagedStore` in `self.store`."""

    store: PagedStore

    def close(self) -> None:
        """Release the pool's memory; its tensors must not be used afterwards."""
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
