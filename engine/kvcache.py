"""Paged block pools for the engine's caches and the per-session streams that use them.

A pool holds, per layer, `[max_blocks, block_size, *token_shape]` tensors: K and V for a full KV
pool (`token_shape = (Hkv, D)`), K alone for an agent's own K namespace, or one rank-r vector per
token for a low-rank V pool. The tensors are `cachepool.PagedStore` views over `vmm` arenas
reserved for the whole budget: pages are mapped only as blocks are handed out (lowest free id
first, so the top of the reservation is the free end) and unmapped when the top empties.

All pools draw blocks from one byte budget (`max_kv_bytes`), so running out raises `CacheFull`
— which the scheduler answers by preempting — and changes nothing. The layouts are the
`kernels` paged caches' (`[num_blocks, block_size, Hkv, D]` and `[num_blocks, block_size, r]`).
"""
from __future__ import annotations

import heapq
import math

import torch

import vmm
from cachepool import CacheFullError, PagedStore


class CacheFull(RuntimeError):
    """The KV byte budget cannot hold the blocks asked for (nothing was allocated)."""


class ByteBudget:
    def __init__(self, capacity_bytes: int):
        self.capacity = int(capacity_bytes)
        self.used = 0


def make_page_pool(device, budget_bytes: int, num_layers: int) -> vmm.PagePool:
    """The physical pages behind every pool of one engine. Capacity: the budget plus one page of
    rounding per arena for a generous number of pools (pages are created only when mapped)."""
    dev = torch.device(device)
    backend = vmm.get_backend("host") if dev.type == "cpu" else vmm.get_backend("cuda", dev)
    slack = 16 * 2 * num_layers * backend.granularity
    return vmm.PagePool(backend, budget_bytes + slack)


class BlockPool:
    def __init__(self, name: str, num_layers: int, block_size: int, token_shape: tuple[int, ...],
                 n_tensors: int, dtype: torch.dtype, device, budget: ByteBudget, page_pool: vmm.PagePool):
        self.name = name
        self.num_layers, self.block_size = num_layers, block_size
        self.token_shape, self.n_tensors = tuple(token_shape), n_tensors
        self.dtype, self.device, self.budget = dtype, torch.device(device), budget
        elt = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = num_layers * n_tensors * math.prod(token_shape) * elt
        self.block_bytes = self.token_bytes * block_size
        self.planes = ("k", "v") if n_tensors == 2 else ((name,) if name == "k" else ("lr",))
        max_blocks = max(1, budget.capacity // self.block_bytes)
        self.store = PagedStore(page_pool, num_layers, self.planes, (block_size, *self.token_shape), dtype,
                                max_blocks)
        self.top = 0  # ids >= top are free and may be unmapped
        self._free: list[int] = []  # free ids below top (a heap: lowest first)
        self._free_set: set[int] = set()
        self.in_use = 0
        # prefix sharing: full blocks by content hash (refcounted; dropped when the last user goes)
        self.refs: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}

    def can_allocate(self, n: int) -> bool:
        return self.budget.used + n * self.block_bytes <= self.budget.capacity

    def allocate(self, n: int) -> list[int]:
        if n <= 0:
            return []
        if not self.can_allocate(n):
            raise CacheFull(f"pool {self.name!r}: {n} blocks of {self.block_bytes} B exceed the KV budget "
                            f"({self.budget.used} of {self.budget.capacity} B in use)")
        take = min(n, len(self._free))
        low = [heapq.heappop(self._free) for _ in range(take)]
        new_top = self.top + n - take
        try:
            self.store.grow_to(new_top)
        except CacheFullError as e:
            for b in low:
                heapq.heappush(self._free, b)
            raise CacheFull(f"pool {self.name!r}: {e}") from None
        self._free_set.difference_update(low)
        out = low + list(range(self.top, new_top))
        self.top = new_top
        for b in out:
            self.refs[b] = 1
        self.budget.used += n * self.block_bytes
        self.in_use += n
        return out

    def share(self, block: int) -> None:
        """One more user of a (content-addressed) block."""
        self.refs[block] += 1

    def register(self, block: int, h: int) -> None:
        """Make a full, written block findable by its content hash (first writer wins)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def free(self, blocks: list[int]) -> None:
        gone = []
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                h = self.hash_of.pop(b, None)
                if h is not None:
                    del self.by_hash[h]
                gone.append(b)
        for b in gone:
            heapq.heappush(self._free, b)
            self._free_set.add(b)
        self.budget.used -= len(gone) * self.block_bytes
        self.in_use -= len(gone)
        top = self.top
        while top > 0 and (top - 1) in self._free_set:
            top -= 1
            self._free_set.discard(top)
        if top != self.top:
            self._free = [b for b in self._free if b < top]
            heapq.heapify(self._free)
            self.top = top
            self.store.shrink_to(top)  # unmaps the pages above the live blocks

    def layer(self, i: int, layer: int) -> torch.Tensor:
        """Tensor i (0 = K or the low-rank values, 1 = V) of one layer: [max_blocks, bs, *token_shape]."""
        return self.store.tensors[self.planes[i]][layer]

    def report(self) -> dict:
        return {
            "block_bytes": self.block_bytes,
            "token_bytes": self.token_bytes,
            "blocks_in_use": self.in_use,
            "blocks_backed": self.store.backed_blocks(),
            "used_bytes": self.in_use * self.block_bytes,
            "mapped_bytes": self.store.mapped_bytes,
            "reserved_bytes": self.store.reserved_bytes,
            "pages_mapped": self.store.mapped_bytes // self.store.page_size,
        }

    def close(self) -> None:
        self.store.close()


class Stream:
    """One token sequence's blocks in one pool (a block table); `length` tokens are valid."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self.hashes: list[int] = []  # content hashes of the leading full blocks

    def blocks_needed(self, n_tokens: int) -> int:
        return max(0, -(-n_tokens // self.pool.block_size) - len(self.blocks))

    def reserve(self, n_tokens: int) -> None:
        """Make room for `n_tokens` tokens in total (CacheFull leaves the stream as it was)."""
        self.blocks.extend(self.pool.allocate(self.blocks_needed(n_tokens)))

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (block * block_size + offset) of tokens [start, end)."""
        bs = self.pool.block_size
        pos = torch.arange(start, end)
        table = torch.tensor(self.blocks, dtype=torch.int64)
        return (table[pos // bs] * bs + pos % bs).to(self.pool.device)

    def block_table(self) -> torch.Tensor:
        return torch.tensor(self.blocks, dtype=torch.int32, device=self.pool.device)

    def release(self) -> None:
        self.pool.free(self.blocks)
        self.blocks = []
        self.hashes = []
        self.length = 0

    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes
