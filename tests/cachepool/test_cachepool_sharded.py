"""Head-sharded KV pool for S2 layers: over a long generated sequence each KV head holds exactly
the blocks some query from now on reads (checked against the pattern's block mask), its data
stays intact, and decode from it equals decode over a full cache."""
from __future__ import annotations

import random

import pytest
import torch

import vmm
from cachepool import CacheFullError, HeadShardedKVPool
from kernels import S2Pattern, write_kv

PATTERNS = [
    dict(num_heads=4, sparse_block=16, local_blocks=2, vert_stride=3, num_kv_heads=2),  # GQA
    dict(num_heads=3, sparse_block=32, local_blocks=1, vert_stride=4, homo_head=True),
    dict(num_heads=6, sparse_block=16, local_blocks=2, vert_stride=3, num_kv_heads=3, num_dense_heads=2),
    dict(num_heads=2, sparse_block=16, local_blocks=3, vert_stride=5, offset=1),
]


def _pool(pattern, head_dim=8, block_size=4, max_blocks=400, capacity_pages=64, layers=2):
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=capacity_pages * be.granularity)
    return pages, HeadShardedKVPool(pages, pattern, num_layers=layers, head_dim=head_dim,
                                    block_size=block_size, max_blocks=max_blocks, dtype=torch.float32)


def _expected_held(pattern, n, bs):
    """(head, logical block) pairs that some query block >= the current one reads."""
    sb = pattern.sparse_block
    i = (n - 1) // sb
    far = i + pattern.local_blocks + 1  # from here on only shard blocks are read
    mask = pattern.block_mask(far + 1)
    return {(h, b) for h in range(pattern.num_kv_heads) for b in range(-(-n // bs))
            if mask[h, i, b * bs // sb] or mask[h, far, b * bs // sb]}


def _held(pool, seq):
    return {(h, b) for h, t in enumerate(pool.block_table(seq)) for b, p in enumerate(t) if p >= 0}


def _write(pool, slots, k, v, impl=None):
    n, hkv, d = k.shape
    for layer in range(pool.num_layers):
        write_kv(k.reshape(n * hkv, 1, d) * (layer + 1), v.reshape(n * hkv, 1, d) * (layer + 1),
                 pool.k_caches[layer], pool.v_caches[layer], slots.reshape(-1), impl=impl)


@pytest.mark.parametrize("cfg", PATTERNS, ids=lambda c: f"h{c['num_heads']}s{c['vert_stride']}")
def test_holds_exactly_the_blocks_still_read(cfg, rng_seed):
    pattern = S2Pattern(**cfg)
    bs, d, T = 4, 8, 400
    pages, pool = _pool(pattern, head_dim=d, block_size=bs)
    hkv = pattern.num_kv_heads
    ref_k = torch.randn(T, hkv, d, device=pool.device)
    ref_v = torch.randn(T, hkv, d, device=pool.device)
    rng = random.Random(rng_seed)
    n = rng.randrange(1, 40)
    slots = pool.allocate("s", n)
    assert slots.shape == (n, hkv) and slots.dtype == torch.int64
    _write(pool, slots, ref_k[:n], ref_v[:n], impl="torch")  # the kernel has its own tests
    pool.release("s")
    while n < T:
        step = 1 if rng.random() < 0.6 else rng.randrange(2, 30)
        step = min(step, T - n)
        slots = pool.append("s", step)
        _write(pool, slots, ref_k[n:n + step], ref_v[n:n + step], impl="torch")
        n += step
        if step > 1:  # a chunk's earlier queries needed more; the forward is done now
            pool.release("s")
        held = _held(pool, "s")
        assert held == _expected_held(pattern, n, bs), n
        # every token a head holds reads back as written, in every layer
        for h in range(hkv):
            pos, k, v = pool.read(1, "s", h)
            want = {b * bs + o for (hh, b) in held if hh == h for o in range(bs) if b * bs + o < n}
            assert set(pos.tolist()) == want
            assert torch.equal(k, 2 * ref_k[pos.to(ref_k.device), h])
            assert torch.equal(v, 2 * ref_v[pos.to(ref_v.device), h])
    rep = pool.memory_report()
    assert rep["used_blocks"] == len(_held(pool, "s"))
    assert rep["full_pool_bytes"] == -(-T // bs) * hkv * rep["bytes_per_block"]
    if not pattern.num_dense_heads:
        # per head: about 1/vert_stride of the blocks plus the local window
        per_head_sparse = rep["used_blocks"] / hkv * bs / pattern.sparse_block
        nsb = -(-T // pattern.sparse_block)
        assert per_head_sparse <= nsb / pattern.vert_stride + pattern.local_blocks + 1
    pool.free("s")
    assert pool.memory_report()["used_blocks"] == 0 and pool.memory_report()["mapped_bytes"] == 0
    assert pages.stats()["pages_in_use"] == 0
    pool.close()


def test_pages_unmapped_as_window_slides_and_sequences_end():
    pattern = S2Pattern(2, 16, 1, 8)
    # one block per page per tensor (head_dim 64 on host's 4 KiB pages); nothing reads the data
    head_dim = vmm.get_backend().granularity // (16 * 4)
    pages, pool = _pool(pattern, head_dim=head_dim, block_size=16, max_blocks=256, capacity_pages=128)
    pool.allocate("a", 16 * 40)
    pool.release("a")
    used = pool.memory_report()["used_blocks"]
    assert used < 40 * 2 / 4  # ~ 40/8 shard + 1 local per head, not 40
    pool.allocate("b", 16 * 4)
    top_mapped = pool.memory_report()["mapped_bytes"]
    pool.free("b")  # b sits at the top: its pages go
    assert pool.memory_report()["mapped_bytes"] < top_mapped
    pool.free("a")
    assert pool.memory_report()["mapped_bytes"] == 0
    pool.close()


def test_exhaustion_changes_nothing():
    pattern = S2Pattern(2, 16, 2, 2)
    _, pool = _pool(pattern, block_size=16, max_blocks=12)
    pool.allocate("a", 16 * 4)  # 4 logical blocks; stride 2 + window 2: 3 per head
    before = (pool.block_table("a"), pool.memory_report())
    assert pool.memory_report()["used_blocks"] == 6
    assert not pool.can_append("a", 16 * 10)
    with pytest.raises(CacheFullError):
        pool.append("a", 16 * 10)
    assert (pool.block_table("a"), pool.memory_report()) == before
    assert not pool.can_append(None, 16 * 20)
    with pytest.raises(CacheFullError):
        pool.allocate("b", 16 * 20)
    assert "b" not in pool._seqs
    pool.close()


def test_bad_arguments():
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=8 * be.granularity)
    with pytest.raises(ValueError, match="divide"):
        HeadShardedKVPool(pages, S2Pattern(2, 16, 1, 4), num_layers=1, head_dim=8, block_size=6, max_blocks=8)
    with pytest.raises(TypeError):
        HeadShardedKVPool(pages, object(), num_layers=1, head_dim=8, block_size=4, max_blocks=8)
    _, pool = _pool(S2Pattern(2, 16, 1, 2))
    with pytest.raises(ValueError):
        pool.allocate("a", -1)
    with pytest.raises(KeyError):
        pool.append("nope", 1)


def _decode_sharded_vs_full(device, pattern, bs, d, lens, dtype=torch.float32, max_blocks=2000):
    from kernels import s2_attention_decode
    hq, hkv = pattern.num_heads, pattern.num_kv_heads
    pages, pool = _pool(pattern, head_dim=d, block_size=bs, max_blocks=max_blocks,
                        capacity_pages=max(64, 4 * max_blocks * bs * d * 4 // vmm.get_backend().granularity + 8),
                        layers=1)
    refs = []
    for b, n in enumerate(lens):
        k = torch.randn(n, hkv, d, device=device)
        v = torch.randn(n, hkv, d, device=device)
        p = n - 1  # prefill all but the last token, then decode one
        _write(pool, pool.allocate(b, p), k[:p], v[:p])
        pool.release(b)
        _write(pool, pool.append(b, 1), k[p:], v[p:])
        refs.append((k, v))
    # the full cache: every block for every head, contiguous blocks per sequence
    width = max(-(-n // bs) for n in lens)
    kf = torch.randn(len(lens) * width, bs, hkv, d, device=device)
    vf = torch.randn_like(kf)
    full_tables = torch.arange(len(lens) * width, device=device, dtype=torch.int32).reshape(len(lens), width)
    for b, (k, v) in enumerate(refs):
        n = k.shape[0]
        kf.view(-1, hkv, d)[b * width * bs:b * width * bs + n] = k
        vf.view(-1, hkv, d)[b * width * bs:b * width * bs + n] = v
    q = torch.randn(len(lens), hq, d, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = d ** -0.5
    out_full = s2_attention_decode(q, kf, vf, full_tables, seq_lens, pattern, scale)
    out_sharded = s2_attention_decode(q, pool.k_caches[0], pool.v_caches[0],
                                      pool.block_tables(list(range(len(lens)))), seq_lens, pattern, scale)
    torch.testing.assert_close(out_sharded, out_full, rtol=1e-4, atol=1e-4)
    pool.close()


def test_decode_from_sharded_pool_equals_full_cache(device, rng_seed):
    _decode_sharded_vs_full(device, S2Pattern(4, 16, 2, 3, num_kv_heads=2), bs=8, d=16, lens=[70, 133, 9])


@pytest.mark.gpu
def test_decode_from_sharded_pool_equals_full_cache_gpu(rng_seed):
    _decode_sharded_vs_full("cuda", S2Pattern(32, 64, 16, 8, num_kv_heads=8), bs=16, d=128,
                            lens=[4097, 2500, 1300], max_blocks=8 * 400)
