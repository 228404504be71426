"""The engine's block pools and streams (engine/kvcache.py) on real vmm pages: lowest-first ids,
refcounts and the content-hash registry, pages unmapped as the top empties, CacheFull that changes
nothing (budget or page pool), and slot indices against a Python reference."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from engine_test_helpers import one_thread  # noqa: F401  (autouse fixture)

import vmm
from engine.kvcache import BlockPool, ByteBudget, CacheFull, Stream, make_page_pool, reserve_all

LAYERS, BS, D = 2, 16, 8
ELT = 4  # float32


def _backend(device: str) -> vmm.Backend:
    return vmm.get_backend("host") if device == "cpu" else vmm.get_backend("cuda", torch.device(device))


def _heads(device: str) -> int:
    """KV heads that make one block of one tensor a quarter page: pages hold 4 blocks."""
    return _backend(device).granularity // (4 * BS * D * ELT)


def _block_bytes(token_shape: tuple[int, ...], n_tensors: int, bs: int = BS) -> int:
    return LAYERS * n_tensors * math.prod(token_shape) * ELT * bs


def _page_pool(device: str, pages: int | None = None) -> vmm.PagePool:
    """`pages` physical pages, or make_page_pool's generous default."""
    if pages is None:
        return make_page_pool(device, 64 << 20, LAYERS)
    return vmm.PagePool(_backend(device), pages * _backend(device).granularity)


def _kv_pool(device: str, budget_blocks: int = 64, page_pool=None, budget=None, bs: int = BS) -> BlockPool:
    shape = (_heads(device), D)
    budget = budget or ByteBudget(budget_blocks * _block_bytes(shape, 2, bs))
    return BlockPool("kv", LAYERS, bs, shape, 2, torch.float32, device, budget, page_pool or _page_pool(device))


def _lr_pool(device: str, budget: ByteBudget, page_pool) -> BlockPool:
    """A low-rank pool whose block is also a quarter page per tensor."""
    rank = _heads(device) * D
    return BlockPool(f"lr{rank}", LAYERS, BS, (rank,), 1, torch.float32, device, budget, page_pool)


def _state(*pools: BlockPool) -> list:
    """Everything a failed request must leave as it was."""
    pages = pools[0].store.page_pool.stats()
    per_pool = [(p.top, p.in_use, dict(p.refs), dict(p.by_hash), dict(p.hash_of), p.store.mapped_bytes,
                 p.store.backed_blocks()) for p in pools]
    return per_pool + [pools[0].budget.used, pages["pages_in_use"], pages["bytes_mapped"]]


def _pages_per_tensor(pool: BlockPool) -> int:
    return pool.store.mapped_bytes // (pool.store.page_size * pool.store.num_tensors)


# ---- allocation, refcounts, hashes -----------------------------------------------------------
def test_allocate_and_free_follow_a_lowest_first_reference(device, rng_seed):
    rnd = random.Random(rng_seed)
    pool = _kv_pool(device, budget_blocks=41)
    held: list[int] = []
    for _ in range(150):
        if held and rnd.random() < 0.45:
            gone = rnd.sample(held, rnd.randint(1, len(held)))
            pool.free(gone)
            held = [b for b in held if b not in gone]
        else:
            k = rnd.randint(0, 41 - len(held))
            free = sorted(set(range(41)) - set(held))
            assert pool.allocate(k) == free[:k]
            held += free[:k]
        assert pool.in_use == len(held) and sorted(pool.refs) == sorted(held)
        assert pool.budget.used == len(held) * pool.block_bytes
        assert pool.top == (max(held) + 1 if held else 0)
        assert pool.report()["used_bytes"] == len(held) * pool.block_bytes
    pool.close()


def test_share_register_and_free_count_references(device):
    pool = _kv_pool(device)
    a, b, c = pool.allocate(3)
    h1, h2 = 0x5EED, -77
    pool.share(b)
    pool.register(b, h1)
    pool.register(c, h1)  # the hash is taken: first writer wins
    pool.register(b, h2)  # the block already has a hash
    assert pool.by_hash == {h1: b} and pool.hash_of == {b: h1} and pool.refs == {a: 1, b: 2, c: 1}
    used = pool.budget.used
    pool.free([b])
    assert pool.refs[b] == 1 and pool.by_hash == {h1: b} and pool.in_use == 3 and pool.budget.used == used
    pool.free([b])
    assert b not in pool.refs and pool.by_hash == {} and pool.hash_of == {}
    assert pool.in_use == 2 and pool.budget.used == used - pool.block_bytes
    pool.share(c)
    pool.free([c, c])  # two references dropped in one call
    assert c not in pool.refs and pool.in_use == 1 and pool.allocate(1) == [b]
    pool.close()


def test_bad_requests_raise_and_change_nothing(device):
    pool = _kv_pool(device)
    a, b = pool.allocate(2)
    pool.share(a)
    pool.register(a, 99)
    before = _state(pool)
    for bad in ([b, b], [a, a, a], [a, 7], [-1]):
        with pytest.raises(ValueError, match="freed more often"):
            pool.free(bad)
        assert _state(pool) == before
    for call in (lambda: pool.share(5), lambda: pool.register(5, 1), lambda: pool.allocate(-1),
                 lambda: pool.allocate(2.0)):
        with pytest.raises(ValueError):
            call()
        assert _state(pool) == before
    pool.close()


# ---- pages follow the top ---------------------------------------------------------------------
def test_pages_are_unmapped_when_the_top_empties(device):
    pool = _kv_pool(device)
    page_pool = pool.store.page_pool
    ids = pool.allocate(10)  # 4 blocks a page: 3 pages per tensor
    assert ids == list(range(10)) and _pages_per_tensor(pool) == 3
    assert page_pool.stats()["pages_in_use"] == 3 * pool.store.num_tensors
    pool.free([1, 2, 3, 4, 5])  # holes below the top unmap nothing
    assert pool.top == 10 and _pages_per_tensor(pool) == 3
    pool.free([9])  # top 9 still needs 3 pages
    assert pool.top == 9 and _pages_per_tensor(pool) == 3
    pool.free([8])
    assert pool.top == 8 and _pages_per_tensor(pool) == 2
    pool.free([6, 7])  # the top falls through the holes to the live block 0
    assert pool.top == 1 and _pages_per_tensor(pool) == 1
    assert page_pool.stats()["pages_in_use"] == pool.store.num_tensors
    assert pool.report()["pages_mapped"] == pool.store.num_tensors
    assert pool.allocate(2) == [1, 2] and _pages_per_tensor(pool) == 1
    pool.free([0, 1, 2])
    assert pool.top == 0 and pool.store.mapped_bytes == 0 and page_pool.stats()["pages_in_use"] == 0
    pool.close()


# ---- CacheFull changes nothing ---------------------------------------------------------------
def test_budget_exhaustion_raises_cache_full_and_changes_nothing(device):
    page_pool = _page_pool(device)
    shape = (_heads(device), D)
    budget = ByteBudget(6 * _block_bytes(shape, 2))  # six K+V blocks, or twelve low-rank ones
    kv, lr = _kv_pool(device, budget=budget, page_pool=page_pool), _lr_pool(device, budget, page_pool)
    kv.allocate(3)
    lr.allocate(5)  # 3 + 5/2 of 6 K+V blocks' bytes: half a K+V block left
    kv.register(1, 42)
    before = _state(kv, lr)
    assert not kv.can_allocate(1) and lr.can_allocate(1) and not lr.can_allocate(2)
    with pytest.raises(CacheFull, match="budget"):
        kv.allocate(1)
    with pytest.raises(CacheFull, match="budget"):
        lr.allocate(2)
    assert _state(kv, lr) == before
    assert lr.allocate(1) == [5] and budget.used == budget.capacity
    kv.close()
    lr.close()


def test_page_pool_exhaustion_raises_cache_full_and_changes_nothing(device):
    pool = _kv_pool(device, budget_blocks=1000, page_pool=_page_pool(device, pages=2 * 2 * LAYERS))
    pool.allocate(6)  # blocks 0..5: both pages of every tensor
    pool.free([2])
    before = _state(pool)
    assert pool.can_allocate(3) and not pool.can_allocate(4)
    with pytest.raises(CacheFull, match="pages"):  # blocks 2, 6, 7, 8: block 8 needs a third page
        pool.allocate(4)
    assert _state(pool) == before
    assert pool.allocate(3) == [2, 6, 7]
    pool.close()


def test_stream_reserve_that_fails_leaves_the_stream_as_it_was(device, rng_seed):
    pool = _kv_pool(device, budget_blocks=5)
    s = Stream(pool)
    s.reserve(2 * BS + 3)
    blocks, slots = list(s.blocks), s.slots(0, 2 * BS + 3).clone()
    with pytest.raises(CacheFull):
        s.reserve(5 * BS + 1)
    assert s.blocks == blocks and torch.equal(s.slots(0, 2 * BS + 3), slots) and pool.in_use == 3
    pool.close()


def test_reserve_all_gives_back_what_it_took_when_a_later_stream_fails(device):
    # pages for the K+V pool's first page per tensor only: the low-rank stream cannot be backed
    page_pool = _page_pool(device, pages=2 * LAYERS)
    budget = ByteBudget(1 << 30)
    kv, lr = _kv_pool(device, budget=budget, page_pool=page_pool), _lr_pool(device, budget, page_pool)
    s_kv, s_lr = Stream(kv), Stream(lr)
    keep = kv.allocate(1)  # another stream's block: must survive the rollback
    before = _state(kv, lr)
    with pytest.raises(CacheFull):
        reserve_all([s_kv, s_lr], 3 * BS - 5)
    assert s_kv.blocks == [] and s_lr.blocks == [] and _state(kv, lr) == before
    kv.free(keep)
    reserve_all([s_kv], 3 * BS - 5)
    assert s_kv.blocks == [0, 1, 2]
    kv.close()
    lr.close()


def test_reserve_all_gives_back_what_it_took_when_the_driver_fails_otherwise(device):
    """Not for want of room (a VmmError other than out-of-memory): still all or nothing."""
    page_pool = _page_pool(device, pages=8 * LAYERS)
    budget = ByteBudget(1 << 30)
    kv, lr = _kv_pool(device, budget=budget, page_pool=page_pool), _lr_pool(device, budget, page_pool)
    s_kv, s_lr = Stream(kv), Stream(lr)
    before = _state(kv, lr)
    real = lr.allocator.alloc_many

    def failing(n):
        raise vmm.VmmError("injected: the driver failed to map")
    lr.allocator.alloc_many = failing
    with pytest.raises(vmm.VmmError, match="injected"):
        reserve_all([s_kv, s_lr], 2 * BS + 1)
    assert s_kv.blocks == [] and s_lr.blocks == [] and _state(kv, lr) == before
    lr.allocator.alloc_many = real
    reserve_all([s_kv, s_lr], 2 * BS + 1)
    assert len(s_kv.blocks) == len(s_lr.blocks) == 3
    kv.close()
    lr.close()


# ---- slots -----------------------------------------------------------------------------------
def _reference_slots(blocks: list[int], bs: int, start: int, end: int) -> list[int]:
    return [blocks[p // bs] * bs + p % bs for p in range(start, end)]


def _check_slots(s: Stream, rnd: random.Random, tries: int = 6) -> None:
    bs, n = s.pool.block_size, len(s.blocks) * s.pool.block_size
    starts = [rnd.randint(0, n) for _ in range(tries)]
    ranges = [(0, n), (n, n)] + [(a, rnd.randint(a, n)) for a in starts]
    for a, b in ranges:
        got = s.slots(a, b)
        assert got.dtype == torch.int64 and got.device == s.pool.device
        assert got.tolist() == _reference_slots(s.blocks, bs, a, b), (a, b)
        assert s.host_slots(a, b) == got.tolist(), (a, b)
    assert s.block_table().tolist() == s.blocks and s.block_table().dtype == torch.int32
    host = s.host_table()  # the host mirror the forward's block tables are built from
    assert host.dtype == np.int32 and host.tolist() == s.blocks and not host.flags.writeable


@pytest.mark.parametrize("bs", [1, 5, 16])
def test_slots_match_a_python_reference(device, rng_seed, bs):
    rnd = random.Random(rng_seed)
    pool = _kv_pool(device, budget_blocks=4000, bs=bs)
    streams = [Stream(pool) for _ in range(3)]
    ends = [0, 0, 0]
    for step in range(40):  # interleaved growth and releases scatter every stream's block ids
        i = rnd.randrange(3)
        if step % 9 == 8:
            streams[i].release()
            ends[i] = 0
        else:
            ends[i] += rnd.randint(1, 3 * bs + 2)
            streams[i].reserve(ends[i])
        assert len(streams[i].blocks) == -(-ends[i] // bs)
        _check_slots(streams[i], rnd)
    s = streams[0]
    s.reserve(7 * bs + 3)
    s.blocks = list(reversed(s.blocks))  # replaced by assignment, as attach_prefix does
    _check_slots(s, rnd)
    s.blocks.append(pool.allocate(1)[0])  # an in-place append is seen too
    _check_slots(s, rnd)
    s.truncate_blocks(3)
    assert len(s.blocks) == 3
    _check_slots(s, rnd)
    s.reserve(40 * bs)  # grows the mirrors past their capacity again
    _check_slots(s, rnd)


def test_slots_address_the_pool_tensor_where_the_blocks_are(device, rng_seed):
    pool = _kv_pool(device)
    other, s = Stream(pool), Stream(pool)
    other.reserve(BS + 1)
    s.reserve(3 * BS - 2)
    other.release()  # s's later blocks sit above a hole
    s.reserve(5 * BS - 7)
    n = 5 * BS - 7
    cache = pool.layer(1, LAYERS - 1)
    cache[:pool.store.backed_blocks()].fill_(float("nan"))  # pages above are unmapped: touching them faults
    values = torch.randn(n, *pool.token_shape, device=device)
    cache.view(-1, *pool.token_shape)[s.slots(0, n)] = values
    for t in range(n):
        assert torch.equal(cache[s.blocks[t // BS], t % BS], values[t])
    pool.close()


def test_slots_outside_the_reserved_tokens_raise(device):
    pool = _kv_pool(device)
    s = Stream(pool)
    s.reserve(BS + 3)
    for a, b in ((0, 2 * BS + 1), (-1, 2), (5, 4)):
        with pytest.raises(ValueError, match="outside"):
            s.slots(a, b)
    pool.close()


@pytest.mark.parametrize("mode", ["base_shared", "base_lr_shared"])
def test_stream_keys_follow_the_agent_set(mode):
    """The per-agent stream keys are cached against the agent table's version: every insertion
    or removal must show in the next answer."""
    from engine.builtin import builtin_weights
    from engine.cache import Agent, AgentTable, KVManager

    config, _ = builtin_weights("tiny", torch.device("cpu"), torch.float32, 0)
    kv = KVManager(config, mode, 16, 1 << 20, torch.device("cpu"), torch.float32)
    assert isinstance(kv.agents, AgentTable)
    assert kv.stream_keys(None) == [("kv", None)]
    kv.agents["plan"] = Agent("plan", v_rank=8)
    lr_plan = ("lr", "plan") if mode == "base_shared" else ("lr", None)
    assert kv.stream_keys(None) == [("kv", None), lr_plan]
    kv.agents["act"] = Agent("act", k_lora=True, v_rank=4)
    keys = kv.stream_keys("act")
    assert ("k", "act") in keys and lr_plan in keys
    assert (("lr", "act") in keys) == (mode == "base_shared")
    kv.agents.pop("act")
    assert kv.stream_keys("act") == [("kv", None), lr_plan]
    del kv.agents["plan"]
    assert kv.stream_keys(None) == [("kv", None)]
