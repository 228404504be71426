"""Paged block pools for the engine's caches and the per-session streams that use them.

A pool holds, per layer, `[capacity_blocks, block_size, *token_shape]` tensors: K and V for a full
KV pool (`token_shape = (Hkv, D)`), K alone for an agent's own K namespace, or one rank-r vector
per token for a low-rank V pool. All pools draw blocks from one byte budget (`max_kv_bytes`), so
running out raises `CacheFull` — which the scheduler answers by preempting — and changes nothing.

Storage grows by doubling up to the budget. The tensor layouts match the `kernels` paged caches
(`[num_blocks, block_size, Hkv, D]` and `[num_blocks, block_size, r]` per layer).
"""
from __future__ import annotations

import math

import torch


class CacheFull(RuntimeError):
    """The KV byte budget cannot hold the blocks asked for (nothing was allocated)."""


class ByteBudget:
    def __init__(self, capacity_bytes: int):
        self.capacity = int(capacity_bytes)
        self.used = 0


class BlockPool:
    def __init__(self, name: str, num_layers: int, block_size: int, token_shape: tuple[int, ...],
                 n_tensors: int, dtype: torch.dtype, device, budget: ByteBudget):
        self.name = name
        self.num_layers, self.block_size = num_layers, block_size
        self.token_shape, self.n_tensors = tuple(token_shape), n_tensors
        self.dtype, self.device, self.budget = dtype, torch.device(device), budget
        elt = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = num_layers * n_tensors * math.prod(token_shape) * elt
        self.block_bytes = self.token_bytes * block_size
        self.capacity = 0
        self.tensors: list[torch.Tensor] = [self._new(0) for _ in range(n_tensors)]
        self.free_blocks: list[int] = []
        self.in_use = 0

    def _new(self, cap: int) -> torch.Tensor:
        return torch.empty((self.num_layers, cap, self.block_size, *self.token_shape),
                           dtype=self.dtype, device=self.device)

    def _grow(self, need: int) -> None:
        # double (amortised O(1) growth), but never past what the budget could ever fill
        room = self.in_use + (self.budget.capacity - self.budget.used) // self.block_bytes
        cap = max(need, min(max(2 * self.capacity, 4), room))
        new = []
        for t in self.tensors:
            n = self._new(cap)
            n[:, : self.capacity] = t
            new.append(n)
        self.tensors = new
        self.free_blocks.extend(range(cap - 1, self.capacity - 1, -1))
        self.capacity = cap

    def can_allocate(self, n: int) -> bool:
        return self.budget.used + n * self.block_bytes <= self.budget.capacity

    def allocate(self, n: int) -> list[int]:
        if n <= 0:
            return []
        if not self.can_allocate(n):
            raise CacheFull(f"pool {self.name!r}: {n} blocks of {self.block_bytes} B exceed the KV budget "
                            f"({self.budget.used} of {self.budget.capacity} B in use)")
        if len(self.free_blocks) < n:
            self._grow(self.capacity + n - len(self.free_blocks))
        out = [self.free_blocks.pop() for _ in range(n)]
        self.budget.used += n * self.block_bytes
        self.in_use += n
        return out

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(reversed(blocks))
        self.budget.used -= len(blocks) * self.block_bytes
        self.in_use -= len(blocks)

    def layer(self, i: int, layer: int) -> torch.Tensor:
        """Tensor i (0 = K or the low-rank values, 1 = V) of one layer: [capacity, bs, *token_shape]."""
        return self.tensors[i][layer]

    def report(self) -> dict:
        return {
            "block_bytes": self.block_bytes,
            "token_bytes": self.token_bytes,
            "blocks_in_use": self.in_use,
            "blocks_capacity": self.capacity,
            "used_bytes": self.in_use * self.block_bytes,
            "mapped_bytes": self.capacity * self.block_bytes,
        }


class Stream:
    """One token sequence's blocks in one pool (a block table); `length` tokens are valid."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0

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
        self.length = 0

    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes
