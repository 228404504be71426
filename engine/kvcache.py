"""Paged block pools for the engine's caches and the per-session streams that use them.

A pool holds, per layer, `[max_blocks, block_size, *token_shape]` tensors: K and V for a full KV
pool (`token_shape = (Hkv, D)`), K alone for an agent's own K namespace, or one rank-r vector per
token for a low-rank V pool. The tensors are `cachepool.PagedStore` views over `vmm` arenas
reserved for the whole budget. Which block ids are free lives in a `cachepool.BlockAllocator`
over that store: lowest free id first, so the top of the reservation is the free end, pages
mapped as blocks are handed out and unmapped when the top empties. A pool adds what the engine's
streams need on top: the shared byte budget, refcounts and a content-hash registry.

All pools draw blocks from one byte budget (`max_kv_bytes`), so running out raises `CacheFull`
— which the scheduler answers by preempting — and changes nothing. The layouts are the
`kernels` paged caches' (`[num_blocks, block_size, Hkv, D]` and `[num_blocks, block_size, r]`).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

import vmm
from cachepool import BlockAllocator, CacheFullError, PagedStore
from cachepool.storage import StoreOwner


class CacheFull(RuntimeError):
    """The KV byte budget (or the page pool behind it) cannot hold the blocks asked for; nothing
    was allocated."""


class ByteBudget:
    """Bytes of KV blocks that every pool of one engine may hold together."""

    def __init__(self, capacity_bytes: int):
        self.capacity = int(capacity_bytes)
        self.used = 0

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more bytes stay within the capacity."""
        return self.used + nbytes <= self.capacity


def make_page_pool(device, budget_bytes: int, num_layers: int) -> vmm.PagePool:
    """The physical pages behind every pool of one engine. Capacity: the budget plus one page of
    rounding per arena for a generous number of pools (pages are created only when mapped)."""
    dev = torch.device(device)
    backend = vmm.get_backend("host") if dev.type == "cpu" else vmm.get_backend("cuda", dev)
    slack = 16 * 2 * num_layers * backend.granularity
    return vmm.PagePool(backend, budget_bytes + slack)


def _concrete(device) -> torch.device:
    """`cuda` as `cuda:<current>`, so a pool's device equals its tensors' `.device`."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class BlockPool(StoreOwner):
    """Refcounted, content-addressable blocks of one kind (K+V, K, or low-rank V) on vmm pages.

    Args:
        name: "kv", "k" or "lr<rank>"; names the planes and the errors.
        num_layers, block_size: every block holds `block_size` tokens of every layer.
        token_shape: one token's shape in one tensor, e.g. (Hkv, D) or (r,).
        n_tensors: 2 for K and V, 1 otherwise.
        budget: the byte budget shared by all pools of one engine.
        page_pool: the physical pages shared by all pools of one engine.

    `refs[b]` counts the streams holding block b (present exactly while b is in use);
    `by_hash` / `hash_of` map content hashes of full, written blocks to blocks and back.
    """

    def __init__(self, name: str, num_layers: int, block_size: int, token_shape: tuple[int, ...],
                 n_tensors: int, dtype: torch.dtype, device, budget: ByteBudget, page_pool: vmm.PagePool):
        self.name = name
        self.num_layers, self.block_size = num_layers, block_size
        self.token_shape, self.n_tensors = tuple(token_shape), n_tensors
        self.dtype, self.device, self.budget = dtype, _concrete(device), budget
        elt = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = num_layers * n_tensors * math.prod(token_shape) * elt
        self.block_bytes = self.token_bytes * block_size
        self.planes = ("k", "v") if n_tensors == 2 else ((name,) if name == "k" else ("lr",))
        max_blocks = max(1, budget.capacity // self.block_bytes)
        self.store = PagedStore(page_pool, num_layers, self.planes, (block_size, *self.token_shape), dtype,
                                max_blocks)
        self.allocator = BlockAllocator(max_blocks, self.store)
        self.refs: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}

    @property
    def top(self) -> int:
        """1 + the highest block id in use: ids at or above it are free and their pages unmapped."""
        return self.allocator.top

    @property
    def in_use(self) -> int:
        """Blocks held by at least one stream."""
        return self.allocator.num_allocated

    def can_allocate(self, n: int) -> bool:
        """Whether `allocate(n)` would succeed now (budget and physical pages)."""
        return self.budget.fits(n * self.block_bytes) and self.allocator.num_obtainable(enough=n) >= n

    def allocate(self, n: int) -> list[int]:
        """Hand out the `n` lowest free block ids, each with one reference. All or nothing:
        CacheFull when the budget or the page pool cannot hold them."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"pool {self.name!r}: block count must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        if not self.budget.fits(n * self.block_bytes):
            raise CacheFull(f"pool {self.name!r}: {n} blocks of {self.block_bytes} B exceed the KV budget "
                            f"({self.budget.used} of {self.budget.capacity} B in use)")
        try:
            ids = self.allocator.alloc_many(n)
        except CacheFullError as e:  # the allocator has rolled back: nothing taken, nothing mapped
            raise CacheFull(f"pool {self.name!r}: {e}") from e
        self.refs.update(dict.fromkeys(ids, 1))
        self.budget.used += n * self.block_bytes
        return ids

    def _check_in_use(self, block: int) -> None:
        if block not in self.refs:
            raise ValueError(f"pool {self.name!r}: block {block!r} is not in use")

    def share(self, block: int) -> None:
        """One more user of a (content-addressed) block."""
        self._check_in_use(block)
        self.refs[block] += 1

    def register(self, block: int, h: int) -> None:
        """Make a full, written block findable by its content hash (first writer wins)."""
        self._check_in_use(block)
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference per listed block; a block nobody holds any more goes back to the
        allocator, loses its hash and its bytes. A block listed more often than it is held
        raises ValueError and changes nothing."""
        drops = Counter(blocks)
        over = sorted(b for b, k in drops.items() if self.refs.get(b, 0) < k)
        if over:
            raise ValueError(f"pool {self.name!r}: blocks {over} are freed more often than they are held")
        gone = []
        for b, k in drops.items():
            left = self.refs[b] - k
            if left:
                self.refs[b] = left
                continue
            del self.refs[b]
            h = self.hash_of.pop(b, None)
            if h is not None:
                del self.by_hash[h]
            gone.append(b)
        self.allocator.release_many(gone)  # unmaps the pages above the new top
        self.budget.used -= len(gone) * self.block_bytes

    def layer(self, i: int, layer: int) -> torch.Tensor:
        """Tensor i (0 = K or the low-rank values, 1 = V) of one layer: [max_blocks, bs, *token_shape]."""
        return self.store.tensors[self.planes[i]][layer]

    def report(self) -> dict:
        """Blocks and bytes of this pool: in use, backed by pages, mapped and reserved."""
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


def _with_room(mirror, n: int, keep: int, empty):
    """`mirror` (a 1-D numpy array or tensor) with room for `n` entries, its first `keep` kept:
    capacity doubles, so growing a block at a time costs amortised O(1) copies."""
    if n <= len(mirror):
        return mirror
    grown = empty(max(n, 2 * len(mirror), 16))
    grown[:keep] = mirror[:keep]
    return grown


class Stream:
    """One token sequence's blocks in one pool (a block table); `length` tokens are valid.

    `host_slots` computes slots on the host (the engine's forward uploads them with its other
    index arrays); `slots` / `block_table` answer on the device from an int64 mirror of the
    table, brought up to date when they are asked (only the entries added since), so reserving
    blocks does no device work. Replace `blocks` by assignment, not element by element in place.
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.length = 0
        self.hashes: list[int] = []  # content hashes of the leading full blocks
        self._offsets = torch.arange(pool.block_size, dtype=torch.int64, device=pool.device)
        self.blocks = []

    @property
    def blocks(self) -> list[int]:
        """Block ids in token order: token t lives in block `blocks[t // block_size]`."""
        return self._blocks

    @blocks.setter
    def blocks(self, ids: Sequence[int]) -> None:
        self._blocks: list[int] = list(ids)
        self._table = torch.empty(0, dtype=torch.int64, device=self.pool.device)
        self._tabled = 0  # entries of _table that mirror _blocks
        self._host = np.empty(0, dtype=np.int32)  # host mirror, kept like _table
        self._hosted = 0

    def host_table(self) -> np.ndarray:
        """The block ids as an int32 numpy array (a read-only view of a host mirror brought up to
        date with the entries added since the last call: a decode step copies one id, not the
        whole table)."""
        n, old = len(self._blocks), self._hosted
        if n < old:  # shortened in place: mirror from the start
            old = 0
        self._host = _with_room(self._host, n, old, lambda size: np.empty(size, dtype=np.int32))
        if n > old:
            self._host[old:n] = self._blocks[old:n]
        self._hosted = n
        view = self._host[:n]
        view.flags.writeable = False
        return view

    def _sync_table(self) -> None:
        """Make `_table[:len(blocks)]` mirror `blocks`, writing only the entries added since."""
        n, old = len(self._blocks), self._tabled
        if n == old:
            return
        if n < old:  # the list was shortened in place: mirror it from the start
            self.blocks = list(self._blocks)
            old = 0
        self._table = _with_room(self._table, n, old, lambda size: torch.empty(
            size, dtype=torch.int64, device=self.pool.device))
        if n - old == 1:  # decode's case: a scalar fill, no host-to-device copy (which would sync)
            self._table[old] = self._blocks[old]
        else:
            self._table[old:n] = torch.tensor(self._blocks[old:n], dtype=torch.int64)
        self._tabled = n

    def blocks_needed(self, n_tokens: int) -> int:
        """Blocks to add so that `n_tokens` tokens fit."""
        return max(0, -(-n_tokens // self.pool.block_size) - len(self._blocks))

    def reserve(self, n_tokens: int) -> None:
        """Make room for `n_tokens` tokens in total (CacheFull leaves the stream as it was)."""
        need = self.blocks_needed(n_tokens)
        if need:
            self._blocks.extend(self.pool.allocate(need))

    def truncate_blocks(self, n_blocks: int) -> None:
        """Give back every block from index `n_blocks` on (undoes a `reserve`)."""
        if not 0 <= n_blocks <= len(self._blocks):
            raise ValueError(f"n_blocks must be in [0, {len(self._blocks)}], got {n_blocks}")
        self.pool.free(self._blocks[n_blocks:])
        self.blocks = self._blocks[:n_blocks]
        del self.hashes[n_blocks:]
        self.length = min(self.length, n_blocks * self.pool.block_size)

    def _check_range(self, start: int, end: int) -> None:
        n = len(self.blocks) * self.pool.block_size
        if not 0 <= start <= end <= n:
            raise ValueError(f"tokens [{start}, {end}) are outside the stream's {n} reserved slots")

    def host_slots(self, start: int, end: int) -> list[int]:
        """`slots` as a host list, with no device op (for callers that upload many at once)."""
        self._check_range(start, end)
        bs, blocks = self.pool.block_size, self.blocks
        return [blocks[t // bs] * bs + t % bs for t in range(start, end)]

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (block * block_size + offset) of tokens [start, end), int64 on the
        pool's device."""
        bs = self.pool.block_size
        self._check_range(start, end)
        self._sync_table()  # cheap guard against an append to `blocks` made in place
        first, last = start // bs, -(-end // bs)
        per_token = (self._table[first:last, None] * bs + self._offsets).view(-1)
        return per_token[start - first * bs:end - first * bs]

    def block_table(self) -> torch.Tensor:
        """The block ids as an int32 tensor on the pool's device."""
        self._sync_table()
        return self._table[:self._tabled].to(torch.int32)

    def release(self) -> None:
        """Drop this stream's reference to every block and forget its tokens."""
        self.pool.free(self._blocks)
        self.blocks = []
        self.hashes = []
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of the blocks this stream holds (shared blocks counted in full)."""
        return len(self._blocks) * self.pool.block_bytes


def reserve_all(streams: Iterable[Stream], n_tokens: int) -> None:
    """Room for `n_tokens` tokens in every stream, all or nothing: if any stream cannot get its
    blocks (budget or page pool: CacheFull), or the driver fails otherwise (a VmmError), those
    already reserved by this call are given back and the error is raised."""
    done: list[tuple[Stream, int]] = []
    try:
        for s in streams:
            had = len(s.blocks)
            s.reserve(n_tokens)
            done.append((s, had))
    except BaseException:
        for s, had in reversed(done):
            s.truncate_blocks(had)
        raise
