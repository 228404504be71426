"""Undoing a request one pool took when the other pool of the same request failed.

`MultiAgentCache` checks a joint request completely, so the low-rank pool's part fails only when
something no count can foresee refuses it: the driver declining a page the page pool's capacity
allowed. The base pool's part is then undone (`BlockManager.rollback`): the pools stay in step,
and the contents the base pool registered for blocks never written are forgotten, or a later
request with the same prefix would be served those blocks' stale memory as a prefix hit.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import vmm
from cachepool import (AgentSpec, BlockManager, CacheFullError, KVPool, LowRankPool, MultiAgentCache,
                       UnboundedStore)


# ---- BlockManager: checkpoint, op, rollback leaves it exactly as it was ---------------------------
def _manager_state(m: BlockManager) -> tuple:
    seqs = {sid: (m.block_table(sid), m.token_ids(sid), tuple(m._seqs[sid].hashes), m._seqs[sid].num_stored)
            for sid in m.seq_ids()}
    # LRU order is not restored (a rolled-back allocate's prefix hits are cached again as the
    # most recent); which blocks are cached is.
    return (seqs, dict(m._ref), dict(m._by_hash), dict(m._hash_of), frozenset(m._lru),
            m.num_free_blocks, m.num_used_blocks, m.num_cached_blocks)


def test_rollback_undoes_allocate_append_and_copy_on_write(rng_seed):
    rng = random.Random(rng_seed)
    bs = rng.choice([3, 4, 5])
    m = BlockManager(4096, bs)
    vocab = 6
    prompts = [[rng.randrange(vocab) for _ in range(3 * bs + 2)] for _ in range(3)]  # shared prefixes: hits
    live: list[int] = []
    kinds = {"allocate": 0, "append": 0, "cow": 0, "hits": 0}
    for step in range(500):
        op = rng.random()
        if op < 0.15 and live:
            m.free(live.pop(rng.randrange(len(live))))
            continue
        if op < 0.3 and live:
            src = rng.choice(live)
            m.fork(src, step)
            live.append(step)
            continue
        undo = rng.random() < 0.5
        if op < 0.55 or not live:
            sid = step
            cp = m.checkpoint(sid)
            before = _manager_state(m)
            toks = rng.choice(prompts)[:rng.randint(0, 3 * bs + 2)] + [rng.randrange(vocab) for _ in range(rng.randint(0, bs))]
            stored = m.allocate(sid, toks)
            kinds["allocate"] += 1
            kinds["hits"] += stored > 0
            if undo:
                m.rollback(cp)
                assert _manager_state(m) == before, step
                assert sid not in m
                continue
            live.append(sid)
        else:
            sid = rng.choice(live)
            cp = m.checkpoint(sid)
            before = _manager_state(m)
            n = len(m.token_ids(sid))
            cow = n % bs != 0 and m.refcount(m.block_table(sid)[-1]) > 1
            m.append_slots(sid, [rng.randrange(vocab) for _ in range(rng.randint(0, 2 * bs + 1))])
            kinds["append"] += 1
            kinds["cow"] += cow and undo
            if undo:
                m.rollback(cp)
                assert _manager_state(m) == before, step
    assert kinds["cow"] >= 3 and kinds["hits"] >= 10 and kinds["allocate"] >= 50, kinds


def test_rolled_back_allocate_is_never_a_prefix_hit():
    m = BlockManager(64, 4)
    m.allocate("writer", [1, 2, 3, 4])                     # block 0 written
    cp = m.checkpoint("s")
    assert m.allocate("s", [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 4  # hit on block 0, two new blocks
    m.rollback(cp)
    # The new full block [5..8] was registered, never written: it must not be hit now.
    assert m.allocate("t", [1, 2, 3, 4, 5, 6, 7, 8]) == 4
    m.free("t")
    m.free("writer")
    assert m.allocate("u", [1, 2, 3, 4, 5, 6, 7, 8]) == 8   # t wrote [5..8]: now it is cached


def test_rollback_of_a_checkpoint_whose_op_never_happened_changes_nothing():
    m = BlockManager(16, 4)
    m.allocate("a", [1, 2, 3, 4, 5])
    before = _manager_state(m)
    m.rollback(m.checkpoint("b"))     # no allocate of b
    m.rollback(m.checkpoint("a"))     # no append to a
    assert _manager_state(m) == before
    with pytest.raises(KeyError):
        m.rollback(m.checkpoint("a").__class__("gone", True))


def test_failed_copy_on_write_gives_its_blocks_back():
    class FailingCopy(UnboundedStore):
        def copy_block(self, src: int, dst: int) -> None:
            raise RuntimeError("injected: the device copy failed")

    m = BlockManager(16, 4, store=FailingCopy(16))
    m.allocate("a", [1, 2, 3, 4, 5, 6])
    m.fork("a", "b")                                  # b shares a's partial last block
    before = _manager_state(m)
    with pytest.raises(RuntimeError, match="injected"):
        m.append_slots("b", [7, 8, 9])                # copy-on-write, and a new block after it
    assert _manager_state(m) == before


# ---- MultiAgentCache: the low-rank pool refused by the driver --------------------------------------
class _DriverRefuses:
    """Arms a page pool so that creating a page fails as `cuMemCreate` out of memory does."""

    def __init__(self, pages: vmm.PagePool) -> None:
        self.pages = pages
        self.state = pages._state
        self.armed = False
        self.refused = 0
        real = self.state.create_page

        def create_page() -> int:
            if self.armed:
                self.refused += 1
                raise vmm.OutOfMemoryError("injected: the driver has no memory for this page")
            return real()
        self.state.create_page = create_page


@contextmanager
def _cache(mode: str, one_page_pool: bool) -> Iterator[tuple[MultiAgentCache, _DriverRefuses]]:
    """The session over its pools, closed after (a page is a file descriptor on the host backend)."""
    be = vmm.get_backend()
    g = be.granularity
    kv_pages = vmm.PagePool(be, capacity_bytes=200 * g)
    lr_pages = kv_pages if one_page_pool else vmm.PagePool(be, capacity_bytes=200 * g)
    # Blocks of 4 tokens, a page a tensor: every new block maps pages, so the driver is asked.
    kv = KVPool(kv_pages, num_layers=1, num_kv_heads=1, head_dim=g // 16, block_size=4, max_blocks=48,
                dtype=torch.float32)
    lr = LowRankPool(lr_pages, num_layers=1, rank=g // 16, block_size=4, max_blocks=48, dtype=torch.float32)
    agents = [AgentSpec(f"a{i}", "llama", "A" if mode == "base_lr_shared" else f"A{i}") for i in range(2)]
    try:
        yield MultiAgentCache(mode, agents, kv, lr), _DriverRefuses(lr_pages)
    finally:
        kv.close()
        lr.close()
        kv_pages.close()
        lr_pages.close()


def _value(prefix: tuple) -> float:
    """What a model would store for the last token of `prefix`: depends on every token before it."""
    return float(hash(prefix) % 100003) + 0.5


def _write(s: MultiAgentCache, agent: str, sid, tokens: list[int], start: int = 0) -> None:
    slots = s.slot_mapping(agent, sid, start).kv
    for i, slot in enumerate(slots):
        if slot >= 0:
            p = start + i
            s.kv_pool.k_caches[0].view(-1, s.kv_pool.k_caches[0].shape[-1])[slot].fill_(_value(tuple(tokens[:p + 1])))


def _check_stored(s: MultiAgentCache, agent: str, sid, tokens: list[int], stored: int) -> None:
    """Every position the pool says it holds already must hold that prefix's value."""
    k, _ = s.kv_pool.read(0, (agent, sid))
    for p in range(stored):
        want = _value(tuple(tokens[:p + 1]))
        assert torch.all(k[p] == want), (agent, sid, p, k[p, 0, 0].item(), want)


def _live_state(s: MultiAgentCache, keys) -> tuple:
    m = s.kv_pool.manager
    return (tuple((p.block_table(k), p.num_tokens(k)) for p in (s.kv_pool, s.lr_pool) for k in keys),
            {b: m.refcount(b) for k in keys for b in m.block_table(k)}, m.num_used_blocks,
            s.lr_pool.memory_report()["used_blocks"])


@pytest.mark.parametrize("one_page_pool", [False, True])
@pytest.mark.parametrize("mode", ["base_shared", "base_lr_shared"])
def test_driver_refusal_in_the_low_rank_pool_undoes_the_base_pool(mode, one_page_pool, rng_seed):
    with _cache(mode, one_page_pool) as (s, driver):
        _driver_refusals(s, driver, random.Random(rng_seed))


def _driver_refusals(s: MultiAgentCache, driver: _DriverRefuses, rng: random.Random) -> None:
    tokens: dict[tuple, list[int]] = {}
    prompts = [[rng.randrange(50) for _ in range(rng.randint(5, 14))] for _ in range(4)]
    refused = {"allocate": 0, "append": 0}  # by the driver after the plan said yes
    for step in range(500):
        keys = list(tokens)
        op = rng.random()
        if op < 0.15 and keys:
            key = rng.choice(keys)
            s.free(*key)
            del tokens[key]
            continue
        driver.pages.trim()  # free pages back to the driver: growing asks it again
        driver.armed = rng.random() < 0.6
        before = _live_state(s, keys)
        registered = dict(s.kv_pool.manager._by_hash)
        cached = set(s.kv_pool.manager._lru)
        if op < 0.55 or not keys:
            agent = f"a{rng.randrange(2)}"
            toks = list(rng.choice(prompts))[:rng.randint(1, 14)] + [rng.randrange(50) for _ in range(rng.randint(0, 3))]
            said, made = s.can_allocate(agent, toks), driver.refused
            try:
                stored, _ = s.allocate(agent, step, toks)
            except CacheFullError:
                assert driver.refused > made or not said, step  # refused by the plan or the driver
                refused["allocate"] += said
                ok = False
            else:
                ok = True
                _check_stored(s, agent, step, toks, stored)
                _write(s, agent, step, toks)
                tokens[(agent, step)] = toks
        else:
            key = rng.choice(keys)
            new = [rng.randrange(50) for _ in range(rng.randint(1, 9))]
            said, made = s.can_append(*key, len(new)), driver.refused
            try:
                s.append_slots(*key, new)
            except CacheFullError:
                assert driver.refused > made or not said, step
                refused["append"] += said
                ok = False
            else:
                ok = True
                start = len(tokens[key])
                tokens[key] = tokens[key] + new
                _write(s, *key, tokens[key], start)
        driver.armed = False
        if not ok:
            assert _live_state(s, keys) == before, step
            now = s.kv_pool.manager._by_hash
            # Nothing new is registered; what is gone was only cached (evicted to make room).
            assert now.items() <= registered.items(), step
            assert {registered[h] for h in registered.keys() - now.keys()} <= cached, step
        for key, toks in tokens.items():  # the pools never drift apart
            assert s.kv_pool.num_tokens(key) == s.lr_pool.num_tokens(key) == len(toks)
    assert refused["allocate"] >= 3 and refused["append"] >= 3, refused
