"""Cache modes: who shares which blocks, what may never be shared, and used bytes equal to the
closed form for K agents on one trajectory of T tokens."""
from __future__ import annotations

import random

import pytest
import torch

import vmm
from cachepool import AgentSpec, CacheMode, KVPool, LowRankPool, MultiAgentCache

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
