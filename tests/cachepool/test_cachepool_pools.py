"""KV / low-rank pools on real vmm arenas (host backend on CPU, cuda on GPU): pages mapped on
demand and unmapped on shrink, data intact across growth, shrink, copy-on-write and exhaustion."""
from __future__ import annotations

import pytest
import torch

import vmm
from cachepool import CacheFullError, KVPool, LowRankPool
from kernels import write_kv, write_lowrank


def _geometry(page_size):
    """Block geometry whose block is 3/8 of a page, so blocks straddle page boundaries."""
    bs, d, dtype = (4, 16, torch.float32) if page_size <= 65536 else (16, 128, torch.bfloat16)
    heads = (3 * page_size // 8) // (bs * d * dtype.itemsize)
    assert bs * heads * d * dtype.itemsize * 8 == 3 * page_size
    return bs, heads, d, dtype


def _pages(num_blocks):  # pages per tensor that blocks [0, n) need, at 3/8 page per block
    return -(-num_blocks * 3 // 8)


def _make(capacity_pages_per_tensor=15, layers=2, max_blocks=40, **kw):
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=capacity_pages_per_tensor * 2 * layers * be.granularity)
    bs, h, d, dtype = _geometry(pages.page_size)
    pool = KVPool(pages, num_layers=layers, num_kv_heads=h, head_dim=d, block_size=bs,
                  max_blocks=max_blocks, dtype=dtype, **kw)
    return pages, pool


def _fill(pool, seq_id, start=0):
    """Write fresh random K/V for positions [start, len) of every layer; return them."""
    n = pool.num_tokens(seq_id)
    slots = torch.tensor(pool.slot_mapping(seq_id, start), device=pool.device)
    out = []
    for layer in range(pool.num_layers):
        k = torch.randn(n - start, pool.num_kv_heads, pool.head_dim, device=pool.device, dtype=pool.dtype)
        v = torch.randn_like(k)
        write_kv(k, v, pool.k_caches[layer], pool.v_caches[layer], slots)
        out.append((k, v))
    return out


def _check(pool, seq_id, expect, start=0):
    for layer, (k, v) in enumerate(expect):
        got_k, got_v = pool.read(layer, seq_id)
        assert torch.equal(got_k[start:start + len(k)], k) and torch.equal(got_v[start:start + len(v)], v)


def _tensor_pages(pool):
    return pool.memory_report()["mapped_bytes"] // (pool.store.page_size * pool.store.num_tensors)


def test_pages_follow_blocks_and_data_survives(rng_seed):
    pages, pool = _make()
    bs = pool.block_size
    assert pool.memory_report()["mapped_bytes"] == 0 and pool.memory_report()["reserved_bytes"] > 0
    pool.allocate("a", list(range(3 * bs)), "base")
    assert _tensor_pages(pool) == _pages(3)
    a = _fill(pool, "a")
    pool.append_slots("a", list(range(100, 100 + 5 * bs)))  # 8 blocks now
    assert _tensor_pages(pool) == _pages(8)
    a_tail = _fill(pool, "a", start=3 * bs)
    pool.allocate("b", [7] * (4 * bs), "base")  # blocks 8..11
    assert pool.block_table("b") == [8, 9, 10, 11]
    assert _tensor_pages(pool) == _pages(12)
    b = _fill(pool, "b")
    _check(pool, "a", a)
    _check(pool, "a", a_tail, start=3 * bs)
    _check(pool, "b", b)
    pool.free("b")  # its full blocks stay cached, so nothing is unmapped yet
    assert _tensor_pages(pool) == _pages(12)
    pool.manager.evict()  # the top empties: pages go back
    assert _tensor_pages(pool) == _pages(8)
    _check(pool, "a", a)
    pool.free("a")
    pool.trim()
    assert pool.memory_report()["mapped_bytes"] == 0 and pages.stats()["pages_in_use"] == 0
    pool.close()


def test_shrink_slack_keeps_spare_pages():
    _, pool = _make(shrink_slack_pages=2, prefix_caching=False)
    bs = pool.block_size
    pool.allocate("a", [1] * (8 * bs))
    pool.allocate("b", [2] * (8 * bs))  # 16 blocks: 6 pages
    assert _tensor_pages(pool) == 6
    pool.free("b")  # needs 3, 3 spare > slack 2: unmapped down to 3
    assert _tensor_pages(pool) == 3
    pool.allocate("c", [3] * (3 * bs))  # 11 blocks: 5 pages (4.125)
    pool.free("c")  # needs 3, 2 spare: kept
    assert _tensor_pages(pool) == 5
    pool.trim()
    assert _tensor_pages(pool) == 3
    pool.close()


def test_exhaustion_is_clean_and_cached_blocks_are_evicted(rng_seed):
    # 3 pages per tensor = 8 blocks of 3/8 page
    pages, pool = _make(capacity_pages_per_tensor=3)
    bs = pool.block_size
    pool.allocate("a", list(range(5 * bs)), "base")
    a = _fill(pool, "a")
    before = (pages.stats()["pages_in_use"], pool.memory_report())
    assert pool.can_allocate(list(range(1000, 1000 + 3 * bs)), "base")
    assert not pool.can_allocate(list(range(1000, 1000 + 4 * bs)), "base")
    with pytest.raises(CacheFullError):
        pool.allocate("b", list(range(1000, 1000 + 4 * bs)), "base")
    with pytest.raises(CacheFullError):
        pool.append_slots("a", list(range(4 * bs)))
    assert (pages.stats()["pages_in_use"], pool.memory_report()) == before
    _check(pool, "a", a)
    # a prefix hit needs no new blocks even when the pool is full
    pool.allocate("c", list(range(3 * bs)), "base")  # 3 hits, 5 used
    pool.allocate("d", list(range(2000, 2000 + 3 * bs)), "base")  # 8 used: full
    pool.free("d")  # 3 cached
    pool.free("c")
    # a new sequence of 3 blocks can only be served by evicting d's cached blocks
    assert pool.can_allocate(list(range(3000, 3000 + 3 * bs)), "base")
    pool.allocate("e", list(range(3000, 3000 + 3 * bs)), "base")
    assert pool.memory_report()["cached_blocks"] == 0
    _check(pool, "a", a)
    pool.close()


def test_copy_on_write_copies_every_layer(rng_seed):
    _, pool = _make()
    bs = pool.block_size
    pool.allocate("a", list(range(bs + 2)), "n")
    a = _fill(pool, "a")
    pool.fork("a", "b")
    assert pool.slot_mapping("b") == [-1] * (bs + 2)
    sb = pool.append_slot("b", 99)
    assert sb // bs != pool.block_table("a")[-1]
    assert pool.block_table("a")[0] == pool.block_table("b")[0]
    _check(pool, "b", a)  # the copied block carries the tokens written before the fork
    _check(pool, "a", a)
    pool.close()


def test_lowrank_pool_roundtrip(rng_seed):
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=64 * be.granularity)
    rank, bs = 5, 3
    pool = LowRankPool(pages, num_layers=3, rank=rank, block_size=bs, max_blocks=4000, dtype=torch.float32)
    pool.allocate("a", list(range(10)), "A")
    assert pool.allocate("b", list(range(7)), "A") == 6  # 2 full blocks shared
    slots = torch.tensor(pool.slot_mapping("a"), device=pool.device)
    xs = [torch.randn(10, rank, device=pool.device) for _ in range(3)]
    for layer, x in enumerate(xs):
        write_lowrank(x, pool.caches[layer], slots)
    for layer, x in enumerate(xs):
        assert torch.equal(pool.read(layer, "a"), x)
        assert torch.equal(pool.read(layer, "b")[:6], x[:6])
    t = pool.block_tables(["a", "b"], width=5)
    assert t.dtype == torch.int32 and t.shape == (2, 5) and t[1, 3].item() == -1
    assert t[0, :4].tolist() == pool.block_table("a")
    pool.close()


def test_bad_arguments():
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=4 * be.granularity)
    with pytest.raises(ValueError):
        KVPool(pages, num_layers=1, num_kv_heads=0, head_dim=8, block_size=4, max_blocks=4)
    with pytest.raises(ValueError):
        LowRankPool(pages, num_layers=1, rank=4, block_size=4, max_blocks=0)
    with pytest.raises(TypeError):
        KVPool(object(), num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, max_blocks=4)
    assert pages.stats()["arenas"] == 0


@pytest.mark.gpu
def test_kvpool_gpu_llama_layout(rng_seed):
    """cuda backend, 2 MiB pages, Llama-shaped blocks (32 KiB per block per tensor): several
    sequences with a shared prefix written with the Triton kernel, read back exactly; pages
    mapped on demand and all returned at the end."""
    be = vmm.get_backend("cuda")
    pages = vmm.PagePool(be, capacity_bytes=2 << 30)
    layers, h, d, bs = 4, 8, 128, 16
    pool = KVPool(pages, num_layers=layers, num_kv_heads=h, head_dim=d, block_size=bs, max_blocks=4096,
                  dtype=torch.bfloat16)
    assert pool.k_caches[0].device.type == be.device.type and pool.memory_report()["mapped_bytes"] == 0
    prefix = list(range(1000, 1000 + 40 * bs))
    seqs = {"a": prefix + list(range(777)), "b": prefix + list(range(5000, 5333)), "c": list(range(9, 2900))}
    written = {}
    for name, toks in seqs.items():
        stored = pool.allocate(name, toks, "llama")
        assert stored == (40 * bs if name == "b" else 0)
        written[name] = _fill(pool, name, start=stored)
    for name, toks in seqs.items():
        start = 40 * bs if name == "b" else 0
        _check(pool, name, written[name], start=start)
    _check(pool, "b", [(k[:40 * bs], v[:40 * bs]) for k, v in written["a"]])  # the shared prefix
    blocks = pool.manager.top
    per_tensor = -(-blocks * bs * h * d * 2 // pages.page_size) * pages.page_size
    assert pool.memory_report()["mapped_bytes"] == per_tensor * 2 * layers
    for name in seqs:
        pool.free(name)
    pool.trim()
    assert pool.memory_report()["mapped_bytes"] == 0 and pages.stats()["pages_in_use"] == 0
    pool.close()
