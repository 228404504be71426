"""Cache modes: who shares which blocks, what may never be shared, and used bytes equal to the
closed form for K agents on one trajectory of T tokens."""
from __future__ import annotations

import random

import pytest
import torch

import vmm
from cachepool import AgentSpec, CacheFullError, CacheMode, KVPool, LowRankPool, MultiAgentCache

L, H, D, KV_BS, LR_BS = 2, 2, 8, 4, 8


def _pools(rank, max_blocks=256):
    be = vmm.get_backend()
    pages = vmm.PagePool(be, capacity_bytes=256 * be.granularity)
    kv = KVPool(pages, num_layers=L, num_kv_heads=H, head_dim=D, block_size=KV_BS,
                max_blocks=max_blocks, dtype=torch.float32)
    lr = LowRankPool(pages, num_layers=L, rank=rank, block_size=LR_BS, max_blocks=max_blocks,
                     dtype=torch.float32)
    return kv, lr


def _agents(k, shared_a=True):
    return [AgentSpec(f"agent{i}", "llama", "A" if shared_a else f"A{i}") for i in range(k)]


def _closed_form(mode, k, t, rank):
    """Blocks referenced per pool, times bytes per block, written out independently."""
    kv_block = L * 2 * KV_BS * H * D * 4
    lr_block = L * LR_BS * rank * 4

    def shared(bs):  # full blocks once, partial last block once per agent
        return t // bs + k * (t % bs > 0)

    def private(bs):
        return k * -(-t // bs)

    kv_blocks = private(KV_BS) if mode == "non_shared" else shared(KV_BS)
    lr_blocks = {"base_shared": private(LR_BS), "base_lr_shared": shared(LR_BS)}.get(mode, 0)
    return kv_blocks * kv_block + lr_blocks * lr_block


@pytest.mark.parametrize("rank", [3, 8])
@pytest.mark.parametrize("mode", [m.value for m in CacheMode])
def test_used_bytes_equal_closed_form(mode, rank):
    rng = random.Random(rank)
    for k in (1, 2, 3, 5):
        for t in (1, 7, 16, 33, 64):
            kv, lr = _pools(rank)
            session = MultiAgentCache(mode, _agents(k, shared_a=True), kv, lr)
            traj = [rng.randrange(1000) for _ in range(t)]
            for a in session.agents:
                session.allocate(a, 0, traj)
            rep = session.memory_report()
            assert rep["total"]["used_bytes"] == _closed_form(mode, k, t, rank), (k, t)
            assert rep["mode"] == mode and rep["agents"] == k
            assert ("lowrank" in rep["pools"]) == CacheMode(mode).uses_lowrank
            # blocks are packed from 0, so exactly the pages under them are mapped
            for name, pool in (("kv", kv), ("lowrank", lr)):
                if name in rep["pools"]:
                    st = pool.store
                    pages = -(-pool.manager.top * st.block_bytes // st.page_size)
                    assert rep["pools"][name]["mapped_bytes"] == pages * st.page_size * st.num_tensors
            kv.close()
            lr.close()


def test_ratio_base_lr_shared_vs_non_shared():
    # K=3 agents, long trajectory, Llama-like proportions scaled down: r / (2 * H * D) small
    rank = 2
    per_mode = {}
    traj = list(range(640))
    for mode in ("non_shared", "base_lr_shared"):
        kv, lr = _pools(rank, max_blocks=512)
        s = MultiAgentCache(mode, _agents(3), kv, lr)
        for a in s.agents:
            s.allocate(a, 0, traj)
        per_mode[mode] = s.memory_report()["total"]["used_bytes"]
    ratio = per_mode["base_lr_shared"] / per_mode["non_shared"]
    assert ratio == pytest.approx((1 + rank / (2 * H * D)) / 3)


@pytest.mark.parametrize("mode", [m.value for m in CacheMode])
def test_who_shares_what(mode):
    kv, lr = _pools(4)
    s = MultiAgentCache(mode, [AgentSpec("a", "llama", "A"), AgentSpec("b", "llama", "A")]
                        if mode == "base_lr_shared" else
                        [AgentSpec("a", "llama", "Aa"), AgentSpec("b", "llama", "Ab")], kv, lr)
    traj = list(range(3 * LR_BS))  # whole blocks in both pools
    s.allocate("a", 0, traj)
    stored_kv, stored_lr = s.allocate("b", 0, traj)
    ta, tb = s.block_table("a", 0), s.block_table("b", 0)
    kv_shared = mode != "non_shared"
    assert (ta.kv == tb.kv) == kv_shared and bool(set(ta.kv) & set(tb.kv)) == kv_shared
    assert stored_kv == (len(traj) if kv_shared else 0)
    if CacheMode(mode).uses_lowrank:
        lr_shared = mode == "base_lr_shared"
        assert (ta.lr == tb.lr) == lr_shared and bool(set(ta.lr) & set(tb.lr)) == lr_shared
        assert stored_lr == (len(traj) if lr_shared else 0)
        assert (s.slot_mapping("b", 0).lr == [-1] * len(traj)) == lr_shared
    else:
        assert ta.lr is None and stored_lr is None
    # an agent's own later request hits its own blocks in every mode
    assert s.allocate("a", 1, traj)[0] == len(traj)


def test_full_shared_reads_first_agents_kv(rng_seed):
    from kernels import write_kv
    kv, lr = _pools(4)
    s = MultiAgentCache("full_shared", [AgentSpec("a", "llama"), AgentSpec("b", "llama")], kv, lr)
    traj = list(range(2 * KV_BS + 3))
    s.allocate("a", 0, traj)
    k = torch.randn(len(traj), H, D, device=kv.device)
    slots = torch.tensor(s.slot_mapping("a", 0).kv, device=kv.device)
    write_kv(k, -k, kv.k_caches[1], kv.v_caches[1], slots)
    s.allocate("b", 0, traj)
    kb, vb = kv.read(1, ("b", 0))
    n = 2 * KV_BS  # full blocks are shared; b's partial block is its own to write
    assert torch.equal(kb[:n], k[:n]) and torch.equal(vb[:n], -k[:n])
    assert s.slot_mapping("b", 0).kv[:n] == [-1] * n and -1 not in s.slot_mapping("b", 0).kv[n:]


def test_forbidden_sharing_is_refused():
    kv, lr = _pools(4)
    with pytest.raises(ValueError, match="one A"):
        MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A1"), AgentSpec("b", "llama", "A2")], kv, lr)
    for mode in ("base_shared", "base_lr_shared", "full_shared"):
        with pytest.raises(ValueError, match="kv_namespace"):
            MultiAgentCache(mode, [AgentSpec("a", "llama", "A"), AgentSpec("b", "qwen", "A")], kv, lr)
    with pytest.raises(ValueError):
        MultiAgentCache("base_shared", [AgentSpec("a", "llama", None)], kv, lr)
    with pytest.raises(ValueError):
        MultiAgentCache("base_shared", [AgentSpec("a", "llama", "A")], kv, None)
    with pytest.raises(ValueError):
        MultiAgentCache("shared", [AgentSpec("a", "llama", "A")], kv, lr)
    with pytest.raises(ValueError):
        MultiAgentCache("non_shared", [AgentSpec("a", "x"), AgentSpec("a", "y")], kv, lr)
    # two sessions on one pool over different base models never share a block
    s1 = MultiAgentCache("full_shared", [AgentSpec("a", "llama")], kv, lr)
    s2 = MultiAgentCache("full_shared", [AgentSpec("z", "qwen")], kv, lr)
    traj = list(range(4 * KV_BS))
    s1.allocate("a", 0, traj)
    assert s2.allocate("z", 0, traj) == (0, None)
    assert not set(s1.block_table("a", 0).kv) & set(s2.block_table("z", 0).kv)


def test_append_fork_free_through_session():
    kv, lr = _pools(4)
    s = MultiAgentCache("base_shared", _agents(2, shared_a=False), kv, lr)
    s.allocate("agent0", 0, list(range(5)))
    slots = s.append_slots("agent0", 0, [9, 9, 9])
    assert len(slots.kv) == len(slots.lr) == 3
    s.fork("agent0", 0, 1)
    assert s.block_table("agent0", 1) == s.block_table("agent0", 0)
    s.free("agent0", 0)
    s.free("agent0", 1)
    rep = s.memory_report()
    assert rep["total"]["used_bytes"] == 0
    with pytest.raises(KeyError):
        s.free("nobody", 0)


# ---------------------------------------------------------------- one page pool under both pools
def _state(s: MultiAgentCache, keys) -> tuple:
    pools = [s.kv_pool, s.lr_pool]
    return (s.kv_pool.store.page_pool.stats()["pages_in_use"], repr(s.memory_report()),
            tuple((p.block_table(k), p.num_tokens(k)) for p in pools for k in keys))


def _page_block_pools(num_pages: int):
    """A page pool of `num_pages` pages under both pools, blocks of 4 tokens a page a tensor:
    a KV block takes 2 pages (K and V), a low-rank block 1."""
    be = vmm.get_backend()
    g = be.granularity
    pages = vmm.PagePool(be, capacity_bytes=num_pages * g)
    kv = KVPool(pages, num_layers=1, num_kv_heads=1, head_dim=g // 8, block_size=4, max_blocks=64,
                dtype=torch.float16)
    lr = LowRankPool(pages, num_layers=1, rank=g // 8, block_size=4, max_blocks=64, dtype=torch.float16)
    return pages, kv, lr


@pytest.mark.parametrize("mode", ["base_shared", "base_lr_shared"])
def test_requests_on_one_page_pool_are_all_or_nothing(mode, rng_seed):
    """Both pools draw on one small page pool: each pool alone always has room for what the
    other just took, so only a joint check answers right. `can_*` must predict the outcome, and
    a refused request must leave both pools exactly as they were."""
    rng = random.Random(rng_seed)
    pages, kv, lr = _page_block_pools(11)
    agents = [AgentSpec(f"a{i}", "llama", "A" if mode == "base_lr_shared" else f"A{i}") for i in range(3)]
    s = MultiAgentCache(mode, agents, kv, lr)
    live: list[tuple[str, int]] = []
    outcomes = {"ok": 0, "full": 0}
    for step in range(160):
        keys = list(live)
        before = _state(s, keys)
        op = rng.random()
        if op < 0.3 or not live:
            agent, toks = f"a{rng.randrange(3)}", [rng.randrange(1000) for _ in range(rng.randint(1, 7))]
            said = s.can_allocate(agent, toks)
            try:
                s.allocate(agent, step, toks)
                live.append((agent, step))
                ok = True
            except CacheFullError:
                ok = False
        elif op < 0.8:
            agent, sid = rng.choice(live)
            toks = [rng.randrange(1000) for _ in range(rng.randint(1, 4))]
            said = s.can_append(agent, sid, len(toks))
            try:
                slots = s.append_slots(agent, sid, toks)
                assert len(slots.kv) == len(slots.lr) == len(toks)
                ok = True
            except CacheFullError:
                ok = False
        else:
            agent, sid = live.pop(rng.randrange(len(live)))
            s.free(agent, sid)
            continue
        assert said == ok, (step, op)
        outcomes["ok" if ok else "full"] += 1
        if not ok:
            assert _state(s, keys) == before, step
        for agent, sid in live:  # the pools never drift apart
            assert kv.num_tokens((agent, sid)) == lr.num_tokens((agent, sid))
    assert outcomes["ok"] > 20 and outcomes["full"] > 20, outcomes


def test_refused_allocate_with_free_cached_blocks_then_succeeds():
    """The base pool can serve a request by evicting a cached block (mapping nothing), so the
    low-rank pool keeps the last page: the joint check must count that and say yes."""
    pages, kv, lr = _page_block_pools(6)
    s = MultiAgentCache("base_lr_shared", [AgentSpec("a", "llama", "A0")], kv, lr)
    s.allocate("a", 0, [1, 2, 3, 4])                              # kv 2 pages, lr 1
    kv.allocate("other", [9, 8, 7, 6], "zzz")
    kv.free("other")                                              # cached in kv: 2 more pages
    assert pages.stats()["pages_in_use"] == 5
    assert s.can_allocate("a", [5, 6, 7, 8])
    assert s.allocate("a", 1, [5, 6, 7, 8]) == (0, 0)
    assert pages.stats()["pages_in_use"] == 6 and kv.memory_report()["cached_blocks"] == 0
    # Now nothing is left: refused, unchanged.
    before = _state(s, [("a", 0), ("a", 1)])
    assert not s.can_allocate("a", [11, 12])
    with pytest.raises(CacheFullError):
        s.allocate("a", 2, [11, 12])
    assert _state(s, [("a", 0), ("a", 1)]) == before
    s.free("a", 1)
    s.trim()  # hands the cached pages back to the page pool
    assert pages.stats()["pages_in_use"] == 3
    assert s.allocate("a", 2, [11, 12]) == (0, 0)


def test_a_sequence_half_present_is_refused_before_anything_changes():
    kv, lr = _pools(rank=3)
    s = MultiAgentCache("base_shared", _agents(2, shared_a=False), kv, lr)
    lr.allocate(("agent0", 7), [1, 2, 3], s.route("agent0").lr_namespace)
    before = (kv.memory_report(), lr.memory_report())
    with pytest.raises(ValueError, match="already allocated"):
        s.allocate("agent0", 7, [1, 2, 3])
    with pytest.raises(KeyError, match="no live sequence"):
        s.append_slots("agent0", 7, [4])
    assert (kv.memory_report(), lr.memory_report()) == before


@pytest.mark.parametrize("mode", ["non_shared", "base_shared"])
def test_private_namespaces_never_collide(mode):
    """Private namespaces join a namespace and an agent name; names holding the separator
    must not make two pairs (or a pair and a shared namespace) the same namespace."""
    kv, lr = _pools(rank=3)
    toks = list(range(16))
    first = MultiAgentCache(mode, [AgentSpec("a", "llama@x", "A@x"), AgentSpec("b", "llama@x", "A@x")],
                            kv, lr)
    assert first.allocate("a", 0, toks)[0] == 0
    if mode == "non_shared":
        # ("llama@x", "a") against ("llama", "x@a"): the same text once joined with "@".
        other = MultiAgentCache(mode, [AgentSpec("x@a", "llama")], kv)
        assert other.allocate("x@a", 1, toks) == (0, None)
        assert other.route("x@a").kv_namespace != first.route("a").kv_namespace
    else:
        # A session sharing base K/V under the name "llama@x@a" must not read agent a's.
        lr_other = MultiAgentCache("base_shared", [AgentSpec("a", "A@x@a", "B")], kv, lr)
        assert lr_other.route("a").kv_namespace != first.route("a").lr_namespace
        assert lr_other.allocate("a", 1, toks)[0] == 0
        twin = MultiAgentCache(mode, [AgentSpec("x@a", "llama@x", "A")], kv, lr)
        assert twin.allocate("x@a", 2, toks) == (16, 0)  # base K/V shared, as the mode says
    routes = {first.route(a) for a in ("a", "b")}
    assert len(routes) == 2


def test_agent_spec_fields_must_be_strings():
    with pytest.raises(TypeError, match="kv_namespace"):
        AgentSpec("a", None)
    with pytest.raises(TypeError, match="name"):
        AgentSpec(3, "llama")
    assert AgentSpec("a", "llama").lr_namespace is None
