"""Two pools on one page pool: the base pool evicts its own cached blocks rather than map the
last fresh pages when the low-rank pool needs those pages, `can_*` still predicts every outcome
exactly, a refusal changes nothing, and what was written stays readable."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

import vmm
from cachepool import AgentSpec, CacheFullError, KVPool, LowRankPool, MultiAgentCache

G = vmm.get_backend().granularity


def _page_block_pools(num_pages: int, lr_pages: int | None = None):
    """Blocks of 4 tokens, a page a tensor: a KV block takes 2 pages (K and V), a low-rank block
    1. One page pool of `num_pages` under both pools, or with `lr_pages` a second one for LR."""
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=num_pages * G)
    lr_pages_pool = pages if lr_pages is None else vmm.PagePool(be, capacity_bytes=lr_pages * G)
    kv = KVPool(pages, num_layers=1, num_kv_heads=1, head_dim=G // 8, block_size=4, max_blocks=64,
                dtype=torch.float16)
    lr = LowRankPool(lr_pages_pool, num_layers=1, rank=G // 8, block_size=4, max_blocks=64,
                     dtype=torch.float16)
    return pages, kv, lr


def _in_use(pages: vmm.PagePool) -> int:
    return pages.stats()["pages_in_use"]


def _snapshot(pages: vmm.PagePool, *pools) -> tuple:
    """Everything a refused request must leave as it was: pages, counters, block tables, tokens
    and the order of each pool's cached blocks."""
    out: list = [_in_use(pages)]
    for p in pools:
        m = p.manager
        out.append((repr(p.memory_report()), list(m._lru),
                    [(k, m.block_table(k), m.token_ids(k)) for k in m.seq_ids()]))
    return tuple(out)


def _cache_one_kv_block(kv: KVPool) -> None:
    """A block cached in the base pool only (another session's freed prefix)."""
    kv.allocate("other", [9, 8, 7, 6], "zzz")
    kv.free("other")


# ---------------------------------------------------------------- the refusal, deterministic
def test_allocate_evicts_base_cache_instead_of_taking_the_low_rank_pools_last_pages():
    """4 pages, 2 of them behind a cached base block. Mapping 2 fresh pages for the new base
    block would leave none for the low-rank block; reusing the cached block leaves 2."""
    pages, kv, lr = _page_block_pools(4)
    s = MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    _cache_one_kv_block(kv)
    assert _in_use(pages) == 2
    assert kv.pages_to_allocate([1, 2, 3, 4], "llama") == 2  # what mapping before evicting costs
    assert s.can_allocate("a", [1, 2, 3, 4])
    assert s.allocate("a", 0, [1, 2, 3, 4]) == (0, 0)
    assert _in_use(pages) == 3
    assert kv.memory_report()["cached_blocks"] == 0
    assert not kv.can_allocate([9, 8, 7, 6], "zzz")  # a hit would need no block: it was evicted


def test_append_evicts_base_cache_instead_of_taking_the_low_rank_pools_last_pages():
    pages, kv, lr = _page_block_pools(7)
    s = MultiAgentCache("base_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    s.allocate("a", 0, [1, 2, 3, 4])  # kv 2 pages, lr 1
    _cache_one_kv_block(kv)           # kv 2 more, cached
    assert _in_use(pages) == 5
    cached = kv.manager._lru.copy()
    assert s.can_append("a", 0, 1)
    slots = s.append_slots("a", 0, [5])
    assert slots.kv[0] // 4 in cached  # the new base block is the evicted one
    assert _in_use(pages) == 6 and kv.memory_report()["cached_blocks"] == 0


def test_base_pool_evicts_no_more_cached_blocks_than_the_low_rank_pool_needs():
    """8 pages, 4 behind two cached base blocks. A request of two new base blocks and two
    low-rank ones: mapping both base blocks fresh leaves the low-rank pool none, evicting one
    cached block leaves it the 2 it needs, so the other cached block stays."""
    pages, kv, lr = _page_block_pools(8)
    s = MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    kv.allocate("other", [9, 8, 7, 6, 5, 4, 3, 2], "zzz")
    kv.free("other")
    assert _in_use(pages) == 4 and kv.memory_report()["cached_blocks"] == 2
    assert [kv.pages_to_allocate(list(range(8)), "llama", evict_first=e) for e in (0, 1, 2, True)] == [4, 2, 0, 0]
    assert s.can_allocate("a", list(range(8)))
    assert s.allocate("a", 0, list(range(8))) == (0, 0)
    assert _in_use(pages) == 8 and kv.memory_report()["cached_blocks"] == 1
    # The least recently freed block went (the tail, freed first); the prefix's head stays.
    assert kv.allocate("again", [9, 8, 7, 6], "zzz") == 4


def test_evict_first_takes_a_bool_or_a_count():
    pages, kv, lr = _page_block_pools(8)
    with pytest.raises(ValueError, match="evict_first"):
        kv.allocate("x", [1, 2, 3], "ns", evict_first=-1)
    with pytest.raises(ValueError, match="evict_first"):
        kv.pages_to_allocate([1, 2, 3], "ns", evict_first=1.5)
    assert "x" not in kv and _in_use(pages) == 0
    kv.allocate("x", [1, 2, 3], "ns", evict_first=np.int64(2))  # numpy's ints are ints
    assert "x" in kv


def test_shared_pool_keeps_the_prefix_cache_while_fresh_pages_suffice():
    """Evicting first is the fallback: with a page left for the low-rank pool, the base pool
    maps fresh pages and keeps its cache."""
    pages, kv, lr = _page_block_pools(5)
    s = MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    _cache_one_kv_block(kv)
    s.allocate("a", 0, [1, 2, 3, 4])
    assert _in_use(pages) == 5 and kv.memory_report()["cached_blocks"] == 1


def test_separate_page_pools_keep_the_prefix_cache():
    """Without a shared page pool the base pool's pages are no use to the low-rank pool: it keeps
    its cache while it can map, and a request the low-rank pool cannot take is refused."""
    pages, kv, lr = _page_block_pools(4, lr_pages=1)
    s = MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    _cache_one_kv_block(kv)
    assert s.allocate("a", 0, [1, 2, 3, 4]) == (0, 0)
    assert _in_use(pages) == 4 and kv.memory_report()["cached_blocks"] == 1
    before = _snapshot(pages, kv, lr)
    assert not s.can_allocate("a", [5, 6, 7, 8])
    with pytest.raises(CacheFullError):
        s.allocate("a", 1, [5, 6, 7, 8])
    assert _snapshot(pages, kv, lr) == before


def test_a_cached_prefix_hit_is_not_counted_as_evictable():
    """The request hits the base pool's only cached block, so evicting first frees nothing: the
    new block still needs 2 fresh pages and the low-rank pool is left with none."""
    pages, kv, lr = _page_block_pools(5)
    s = MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    s.allocate("a", 0, [1, 2, 3, 4])
    s.free("a", 0)  # cached in both pools: kv 2 pages, lr 1
    toks = [1, 2, 3, 4, 5]
    assert kv.pages_to_allocate(toks, "llama", evict_first=True) == 2
    before = _snapshot(pages, kv, lr)
    assert not s.can_allocate("a", toks)
    with pytest.raises(CacheFullError):
        s.allocate("a", 1, toks)
    assert _snapshot(pages, kv, lr) == before


# ---------------------------------------------------------------- random operations
def _odd_pools(rng: random.Random, lr_prefix_caching: bool = True, num_pages: int | None = None):
    """Pools of odd, unrelated block sizes and shapes on one small page pool (`num_pages`, else
    a random odd count of 15 to 41): blocks straddle pages, and a page holds a different number
    of blocks in each pool."""
    slack = rng.randint(0, 1)
    layers = rng.randint(1, 2)
    kv_bs, lr_bs = rng.choice([3, 5, 7]), rng.choice([2, 5, 6])
    heads = rng.randint(1, 2)
    head_dim = max(1, int(rng.uniform(0.3, 1.1) * G / (kv_bs * heads * 2)))
    rank = max(1, int(rng.uniform(0.3, 1.1) * G / (lr_bs * 2)))
    pages = vmm.PagePool(vmm.get_backend(), capacity_bytes=(num_pages or rng.randrange(15, 42, 2)) * G)
    kv = KVPool(pages, num_layers=layers, num_kv_heads=heads, head_dim=head_dim, block_size=kv_bs,
                max_blocks=64, dtype=torch.float16, shrink_slack_pages=slack)
    lr = LowRankPool(pages, num_layers=layers, rank=rank, block_size=lr_bs, max_blocks=64,
                     dtype=torch.float16, shrink_slack_pages=slack, prefix_caching=lr_prefix_caching)
    return pages, kv, lr


class _Contents:
    """Known random values per (pool, namespace, token prefix): blocks are shared by exactly that
    key, so whichever sequence wrote a position, every sequence reading it expects this value."""

    def __init__(self, kv: KVPool, lr: LowRankPool, seed: int) -> None:
        self.kv, self.lr = kv, lr
        self.gen = torch.Generator().manual_seed(seed)
        self.values: dict[tuple, torch.Tensor] = {}

    def _value(self, tag: str, ns: str, prefix: tuple) -> torch.Tensor:
        key = (tag, ns, prefix)
        if key not in self.values:
            p = self.kv if tag == "kv" else self.lr
            shape = (p.num_layers, 2, p.num_kv_heads, p.head_dim) if tag == "kv" else (p.num_layers, p.rank)
            self.values[key] = torch.randn(shape, generator=self.gen).to(torch.float16)
        return self.values[key]

    def write(self, tag: str, ns: str, tokens: list[int], start: int, slots: list[int]) -> None:
        for i, slot in enumerate(slots):
            if slot < 0:
                continue  # stored already
            val = self._value(tag, ns, tuple(tokens[:start + i + 1]))
            for layer in range(val.shape[0]):
                if tag == "kv":
                    kc, vc = self.kv.k_caches[layer], self.kv.v_caches[layer]
                    kc.view(-1, *kc.shape[2:])[slot] = val[layer, 0]
                    vc.view(-1, *vc.shape[2:])[slot] = val[layer, 1]
                else:
                    c = self.lr.caches[layer]
                    c.view(-1, c.shape[2])[slot] = val[layer]

    def check(self, tag: str, ns: str, key: tuple, tokens: list[int]) -> None:
        want = torch.stack([self._value(tag, ns, tuple(tokens[:p + 1])) for p in range(len(tokens))])
        for layer in range(want.shape[1]):
            if tag == "kv":
                k, v = (t.cpu() for t in self.kv.read(layer, key))  # the pools may live on a GPU
                assert torch.equal(k, want[:, layer, 0]) and torch.equal(v, want[:, layer, 1]), (key, layer)
            else:
                assert torch.equal(self.lr.read(layer, key).cpu(), want[:, layer]), (key, layer)


def _default_plan_fits(lr: LowRankPool, pages_kv: int, lr_fits) -> bool:
    """What the joint check answered before the base pool could evict first."""
    with lr.store.holding_pages(pages_kv):
        return lr_fits()


def _random_run(rng: random.Random, mode: str, lr_prefix_caching: bool, steps: int) -> Counter:
    """Random requests on fresh odd pools, checked after each one; how many succeeded ("ok"),
    were refused ("full") and succeeded only because the base pool evicted first."""
    pages, kv, lr = _odd_pools(rng, lr_prefix_caching)
    agents = [AgentSpec(f"a{i}", "llama", "A" if mode == "base_lr_shared" else f"A{i}") for i in range(3)]
    s = MultiAgentCache(mode, agents, kv, lr)
    other = MultiAgentCache("non_shared", [AgentSpec("z", "qwen")], kv)  # caches in the base pool only
    contents = _Contents(kv, lr, rng.randrange(2**31))
    trajs = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    tokens: dict[tuple, list[int]] = {}  # (in session s, agent, seq) -> token ids
    counts: Counter = Counter()

    def write_new(sess: MultiAgentCache, agent: str, sid, start: int, slots) -> None:
        toks, r = tokens[(sess is s, agent, sid)], sess.route(agent)
        contents.write("kv", r.kv_namespace, toks, start, slots.kv)
        if slots.lr is not None:
            contents.write("lr", r.lr_namespace, toks, start, slots.lr)

    def check_all() -> None:
        for (in_s, agent, sid), toks in tokens.items():
            r, key = (s if in_s else other).route(agent), (agent, sid)
            assert kv.manager.token_ids(key) == toks
            contents.check("kv", r.kv_namespace, key, toks)
            if in_s:
                assert lr.manager.token_ids(key) == toks
                contents.check("lr", r.lr_namespace, key, toks)

    refused = False
    for step in range(steps):
        check_all()
        before = _snapshot(pages, kv, lr)
        # Freeing after a refusal keeps the page pool near full instead of stuck full.
        op = 0.7 if refused and rng.random() < 0.5 else rng.random()
        mine = [k for k in tokens if k[0]]
        if op < 0.25 or not mine:
            agent = f"a{rng.randrange(3)}"
            r = s.route(agent)
            toks = trajs[rng.randrange(3)][:rng.randint(1, 12)]  # prefixes hit, in agents' own namespaces
            toks += [rng.randrange(50) for _ in range(rng.randint(0, 3))]
            said = s.can_allocate(agent, toks)
            old_said = kv.can_allocate(toks, r.kv_namespace) and _default_plan_fits(
                lr, kv.pages_to_allocate(toks, r.kv_namespace), lambda: lr.can_allocate(toks, r.lr_namespace))
            plan = s._allocate_plan(r, toks)
            if plan:  # the fewest evictions: one fewer would leave the low-rank pool short
                assert not _default_plan_fits(lr, kv.pages_to_allocate(toks, r.kv_namespace, evict_first=plan - 1),
                                              lambda: lr.can_allocate(toks, r.lr_namespace)), step
                counts["evicted_some"] += plan < kv.manager.num_cached_blocks
            try:
                s.allocate(agent, step, toks)
            except CacheFullError:
                ok = False
            else:
                ok = True
                tokens[(True, agent, step)] = list(toks)
                write_new(s, agent, step, 0, s.slot_mapping(agent, step))
        elif op < 0.6:
            _, agent, sid = rng.choice(mine)
            key = (agent, sid)
            new = [rng.randrange(50) for _ in range(rng.randint(1, 6))]
            said = s.can_append(agent, sid, len(new))
            old_said = kv.can_append(key, len(new)) and _default_plan_fits(
                lr, kv.pages_to_append(key, len(new)), lambda: lr.can_append(key, len(new)))
            plan = s._append_plan(key, len(new))
            if plan:
                assert not _default_plan_fits(lr, kv.pages_to_append(key, len(new), evict_first=plan - 1),
                                              lambda: lr.can_append(key, len(new))), step
                counts["evicted_some"] += plan < kv.manager.num_cached_blocks
            try:
                slots = s.append_slots(agent, sid, new)
            except CacheFullError:
                ok = False
            else:
                ok = True
                start = len(tokens[(True, agent, sid)])
                tokens[(True, agent, sid)] += new
                write_new(s, agent, sid, start, slots)
        elif op < 0.64:
            _, agent, sid = rng.choice(mine)
            s.fork(agent, sid, ("fork", step))
            tokens[(True, agent, ("fork", step))] = list(tokens[(True, agent, sid)])
            continue
        elif op < 0.78:
            _, agent, sid = rng.choice(mine)
            s.free(agent, sid)
            del tokens[(True, agent, sid)]
            continue
        elif op < 0.98:
            theirs = [k for k in tokens if not k[0]]
            if theirs and rng.random() < 0.5:
                _, agent, sid = rng.choice(theirs)
                other.free(agent, sid)
                del tokens[(False, agent, sid)]
                continue
            toks = [rng.randrange(50) for _ in range(rng.randint(1, 12))]
            said = old_said = other.can_allocate("z", toks)
            try:
                other.allocate("z", step, toks)
            except CacheFullError:
                ok = False
            else:
                ok = True
                tokens[(False, "z", step)] = list(toks)
                write_new(other, "z", step, 0, other.slot_mapping("z", step))
        else:
            s.trim()
            continue
        refused = not ok
        assert said == ok, (step, op)
        assert old_said <= said, step  # evicting first only ever adds room
        counts["ok" if ok else "full"] += 1
        counts["evicted_first"] += said and not old_said
        if not ok:
            assert _snapshot(pages, kv, lr) == before, step
    check_all()
    kv.close()
    lr.close()
    return counts


@pytest.fixture
def one_thread():
    """Reading back gathers a few rows per call; on a busy CPU torch's intra-op threads make each
    call take milliseconds, and this test reads back every live sequence after every request."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("lr_prefix_caching", [True, False])
@pytest.mark.parametrize("mode", ["base_shared", "base_lr_shared"])
def test_random_requests_on_a_shared_page_pool(mode, lr_prefix_caching, rng_seed, one_thread):
    """Two sessions on one page pool (one with a low-rank pool, one base only) under random
    allocate / append / fork / free / trim: `can_*` says exactly whether each request succeeds,
    a refusal changes nothing, and every live sequence reads back what was written for it.
    Without low-rank prefix caching the low-rank pool cannot fall back on its own cache, so the
    base pool evicting first is what serves some requests: rounds on fresh pools go on until
    that has happened (it nearly always has after one)."""
    rng = random.Random(rng_seed)
    counts: Counter = Counter()
    for rnd in range(8):
        counts += _random_run(rng, mode, lr_prefix_caching, steps=200)
        if rnd >= 1 and (lr_prefix_caching or counts["evicted_first"]):
            break
    assert counts["ok"] > 40 and counts["full"] > 10, counts
    assert lr_prefix_caching or counts["evicted_first"] > 0, counts


@pytest.mark.parametrize("roomy", [False, True])
@pytest.mark.parametrize("evict_first", [False, True, "a count"])
def test_pages_to_predict_the_pages_mapped(evict_first, roomy, rng_seed):
    """A pool alone under random requests: `pages_to_*` with and without `evict_first` is
    exactly what the request then maps, `evict_first` never maps more, and whether a request
    fits does not depend on it. A tight page pool refuses often; in a roomy one (301 pages)
    cached blocks and fresh pages are there together — often, not always, so rounds on fresh
    pools go on until evicting first has saved a page at least once."""
    rng = random.Random(rng_seed)
    counts: Counter = Counter()
    for _ in range(8):
        _predict_run(rng, evict_first, roomy, counts)
        if counts["fewer_pages"] > 0 or not roomy:
            break
    assert counts["ok"] > 50 and (counts["fewer_pages"] > 0 if roomy else counts["full"] > 10), counts


def _predict_run(rng: random.Random, evict_first: bool | str, roomy: bool, counts: Counter) -> None:
    pages, kv, _ = _odd_pools(rng, num_pages=301 if roomy else None)
    live: list = []
    traj = [rng.randrange(30) for _ in range(60)]
    refused = False
    for step in range(400):
        op = 0.9 if refused and rng.random() < 0.5 else rng.random()
        refused = False
        if 0.75 <= op < 0.82 and live:
            src = rng.choice(live)
            kv.fork(src, ("f", step))
            live.append(("f", step))
            continue
        if op >= 0.82 and live:
            kv.free(live.pop(rng.randrange(len(live))))
            continue
        before = _snapshot(pages, kv)
        allocating = op < 0.4 or not live
        # "a count": at most this many cached blocks evicted before mapping, fresh each request
        ef_used = rng.randint(0, kv.manager.num_cached_blocks + 1) if evict_first == "a count" else evict_first
        caps = (False, True, ef_used)  # by position: 1 == True and 0 == False as dict keys
        if allocating:
            toks = traj[:rng.randint(1, 20)] + [rng.randrange(30) for _ in range(rng.randint(0, 4))]
            ns = rng.choice(["x", "y"])
            said = kv.can_allocate(toks, ns)
            plans = [kv.pages_to_allocate(toks, ns, evict_first=ef) for ef in caps] if said else []
        else:
            sid, toks = rng.choice(live), [rng.randrange(30) for _ in range(rng.randint(1, 8))]
            said = kv.can_append(sid, len(toks))
            plans = [kv.pages_to_append(sid, len(toks), evict_first=ef) for ef in caps] if said else []
        try:
            if allocating:
                kv.allocate(step, toks, ns, evict_first=ef_used)
                live.append(step)
            else:
                kv.append_slots(sid, toks, evict_first=ef_used)
        except CacheFullError:
            assert not said and _snapshot(pages, kv) == before, step
            counts["full"] += 1
            refused = True
            continue
        assert said, step
        keep, evict_all, used = plans
        assert evict_all <= used <= keep and _in_use(pages) - before[0] == used, step
        counts["ok"] += 1
        counts["fewer_pages"] += evict_all < keep
        counts["between"] += evict_all < used < keep
