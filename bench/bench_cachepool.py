"""cachepool on the GPU: block allocation speed, growth by a page, bytes per cache mode and of the
head-sharded S2 pool. Llama-3.1-8B layout throughout: 32 layers, 8 KV heads, head dim 128, bf16,
16-token blocks (32 KiB per block per tensor, 64 blocks per 2 MiB page).

Rows (same run, same card):
- `cachepool alloc/free`: blocks per second through `KVPool` (BlockManager: refcounts, content
  hashes of full blocks, lowest-first ids; pages already mapped) for 8 sequences × 32 blocks,
  allocated then freed, vs a plain free-list of preallocated block ids (vLLM's approach: a deque
  and a refcount array, no hashing). Higher is better; also without prefix caching.
- `cachepool grow`: mapping one more page behind every one of the pool's 64 tensors (all layers
  grow together), per page, vs one `VirtualArena.map` of one page.
- `cachepool bytes`: used bytes for 3 agents on one trajectory of 4K–32K tokens per cache mode
  (r = 8), really mapped on the GPU, vs non_shared. Goal base_lr_shared ≤ 0.34×.
- `cachepool S2 bytes`: head-sharded pool (sparse_block 64, local 16, stride 8, Hq 32 / Hkv 8)
  vs a full pool for the same tokens, at 32K and 128K tokens (one layer; the ratio is per layer).
GPU memory peaks at about 13 GiB (non_shared at 32K: 3 agents × 4 GiB).
"""
from __future__ import annotations

import collections
import statistics
import time

import pytest
import torch

from common import compare, record_benchmark, sync

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import vmm  # noqa: E402
from cachepool import AgentSpec, HeadShardedKVPool, KVPool, LowRankPool, MultiAgentCache  # noqa: E402

LAYERS, HKV, HEAD_DIM, BS, RANK = 32, 8, 128, 16, 8
DTYPE = torch.bfloat16
GIB = 1 << 30
MODE_TOKENS = (4096, 8192, 16384, 32768)
S2_TOKENS = (32768, 131072)


def _pages(capacity_gib: float) -> vmm.PagePool:
    return vmm.PagePool(vmm.get_backend(), capacity_bytes=int(capacity_gib * GIB))


def _kv(pages, max_blocks, **kw) -> KVPool:
    return KVPool(pages, num_layers=LAYERS, num_kv_heads=HKV, head_dim=HEAD_DIM, block_size=BS,
                  max_blocks=max_blocks, dtype=DTYPE, **kw)


class _FreeList:
    """vLLM's approach: every block preallocated, a deque of free ids and a refcount array."""

    def __init__(self, num_blocks: int) -> None:
        self.free = collections.deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        n = -(-num_tokens // BS)
        ids = [self.free.popleft() for _ in range(n)]
        for b in ids:
            self.ref[b] += 1
        self.tables[seq_id] = ids

    def free_seq(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id)):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)


def _median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat + 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e6


def test_cachepool_alloc_free_throughput(benchmark):
    seqs, tokens_per_seq, repeat = 8, 32 * BS, 60
    blocks = seqs * tokens_per_seq // BS
    pages = _pages(2.5)  # 256 blocks x 32 KiB x 64 tensors = 512 MiB, twice with the no-cache pool
    rows = {}
    for caching in (True, False):
        # Slack keeps the pages mapped between rounds: this measures the block manager itself.
        pool = _kv(pages, max_blocks=4 * blocks, prefix_caching=caching, shrink_slack_pages=1 << 20)
        # Fresh token lists each round (no prefix hits), built before timing as an engine has them.
        prompts = iter([[list(range(base + s * tokens_per_seq, base + (s + 1) * tokens_per_seq))
                         for s in range(seqs)] for base in range(0, (repeat + 12) * 10**6, 10**6)])

        def round_trip(pool=pool, prompts=prompts):
            for s, toks in enumerate(next(prompts)):
                pool.allocate(s, toks, "llama")
            for s in range(seqs):
                pool.free(s)

        round_trip()  # maps the pages once
        rows[caching] = blocks / (_median_us(round_trip, repeat) * 1e-6)
        if caching:
            record_benchmark(benchmark, round_trip)
        pool.close()
    fl = _FreeList(4 * blocks)

    def baseline():
        for s in range(seqs):
            fl.allocate(s, tokens_per_seq)
        for s in range(seqs):
            fl.free_seq(s)

    base = blocks / (_median_us(baseline, repeat) * 1e-6)
    compare("cachepool alloc/free", f"{seqs}x{tokens_per_seq // BS} blocks, prefix caching",
            ours=("KVPool", rows[True]), base=("free-list", base), unit="blocks/s", lower_is_better=False,
            note="hashes every full block (blake2b)")
    compare("cachepool alloc/free", f"{seqs}x{tokens_per_seq // BS} blocks, no caching",
            ours=("KVPool", rows[False]), base=("free-list", base), unit="blocks/s", lower_is_better=False)
    pages.close()


def test_cachepool_grow_one_page(benchmark):
    pages = _pages(1.0)
    blocks_per_page = pages.page_size // (BS * HKV * HEAD_DIM * DTYPE.itemsize)
    pool = _kv(pages, max_blocks=8 * blocks_per_page)
    store = pool.store
    store.grow_to(blocks_per_page)  # one page mapped; grow from there
    pages_per_step = store.num_tensors
    times = []
    for _ in range(23):
        t0 = time.perf_counter()
        store.grow_to(2 * blocks_per_page)
        sync()
        times.append(time.perf_counter() - t0)
        store.trim(blocks_per_page)  # back to one page (recycled pages: no cuMemCreate)
    ours = statistics.median(times[3:]) * 1e6 / pages_per_step
    record_benchmark(benchmark, lambda: (store.grow_to(2 * blocks_per_page), store.trim(blocks_per_page)))
    arena = vmm.VirtualArena(pages, 4 * pages.page_size)
    times = []
    for _ in range(43):
        t0 = time.perf_counter()
        arena.map(0, pages.page_size)
        sync()
        times.append(time.perf_counter() - t0)
        arena.unmap(0, pages.page_size)
    base = statistics.median(times[3:]) * 1e6
    compare("cachepool grow", f"+1 page x {pages_per_step} tensors (per page)", ours=("KVPool grow", ours),
            base=("VirtualArena.map 1 page", base), unit="µs",
            note=f"whole step {ours * pages_per_step:.0f} µs = +{blocks_per_page * BS} tokens of capacity")
    arena.close()
    pool.close()
    pages.close()


def test_cachepool_bytes_per_mode(benchmark):
    agents_n, token_counts = 3, MODE_TOKENS
    max_blocks = agents_n * max(token_counts) // BS
    pages = _pages(13.0 * max(token_counts) / 32768)
    kv = _kv(pages, max_blocks=max_blocks)
    lr = LowRankPool(pages, num_layers=LAYERS, rank=RANK, block_size=BS, max_blocks=max_blocks, dtype=DTYPE)
    g = torch.Generator().manual_seed(0)
    kv_block = LAYERS * 2 * BS * HKV * HEAD_DIM * DTYPE.itemsize
    lr_block = LAYERS * BS * RANK * DTYPE.itemsize
    for t in token_counts:
        traj = torch.randint(0, 128_000, (t,), generator=g).tolist()
        used = {}
        for mode in ("non_shared", "base_shared", "base_lr_shared", "full_shared"):
            agents = [AgentSpec(f"agent{i}", "llama-3.1-8b", "A_shared") for i in range(agents_n)]
            session = MultiAgentCache(mode, agents, kv, lr)
            for a in session.agents:
                session.allocate(a, 0, traj)
            rep = session.memory_report()
            used[mode] = rep["total"]["used_bytes"]
            # the closed form (t is a whole number of blocks here)
            n = t // BS
            want = {"non_shared": agents_n * n * kv_block, "full_shared": n * kv_block,
                    "base_shared": n * kv_block + agents_n * n * lr_block,
                    "base_lr_shared": n * (kv_block + lr_block)}[mode]
            assert used[mode] == want, (mode, t, used[mode], want)
            assert rep["total"]["mapped_bytes"] >= used[mode]
            for a in session.agents:
                session.free(a, 0)
            kv.trim()
            lr.trim()
        for mode in ("base_lr_shared", "base_shared", "full_shared"):
            compare("cachepool bytes", f"3 agents, {t // 1024}K tokens, {mode}", ours=(mode, used[mode] / GIB),
                    base=("non_shared", used["non_shared"] / GIB), unit="GiB",
                    goal="≤ 0.34×" if mode == "base_lr_shared" else "")
    record_benchmark(benchmark, lambda: None, rounds=1)
    kv.close()
    lr.close()
    pages.close()


def test_cachepool_s2_sharded_bytes(benchmark):
    from kernels import S2Pattern

    pattern = S2Pattern(32, 64, 16, 8, num_kv_heads=HKV)
    chunk = 4096
    for total in S2_TOKENS:
        full_blocks = total // BS * HKV
        pages = _pages(2.0 * full_blocks * BS * HEAD_DIM * DTYPE.itemsize / GIB + 0.1)
        pool = HeadShardedKVPool(pages, pattern, num_layers=1, head_dim=HEAD_DIM, block_size=BS,
                                 max_blocks=full_blocks, dtype=DTYPE)
        t0 = time.perf_counter()
        n = 0
        pool.allocate("s", 0)
        while n < total:  # chunked prefill: each chunk's forward, then release
            pool.append("s", chunk)
            pool.release("s")
            n += chunk
        host_ms = (time.perf_counter() - t0) * 1e3
        rep = pool.memory_report()
        compare("cachepool S2 bytes", f"{total // 1024}K tokens, 1 layer", ours=("head-sharded", rep["used_bytes"] / 2**20),
                base=("full pool", rep["full_pool_bytes"] / 2**20), unit="MiB",
                goal=f"≈ {1 / pattern.vert_stride + pattern.local_blocks * pattern.sparse_block / total:.3f}×",
                note=f"mapped {rep['mapped_bytes'] / 2**20:.0f} MiB; bookkeeping {host_ms:.0f} ms host")
        pool.free("s")
        pool.close()
        pages.close()
    record_benchmark(benchmark, lambda: None, rounds=1)
