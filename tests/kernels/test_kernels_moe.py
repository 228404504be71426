"""router_topk, reroute_experts and fused_moe against their float64 references.

On CPU the Triton kernels run through the interpreter (small odd sizes); `gpu` tests use
DeepSeek-V2-Lite-like sizes. Every output buffer the wrappers allocate is poisoned first so a
missed element shows up.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import kernels.moe as moe_mod
from kernels.moe import (ROUTER_RENORMALIZE, fused_moe, moe_align_block_size, reroute_experts,
                         router_topk)
from kernels.moe_ref import fused_moe_ref, reroute_experts_ref, router_topk_ref

_real_empty = torch.empty


@contextlib.contextmanager
def poisoned_outputs():
    """Make every torch.empty in the call NaN (floats) or -7777 (ints)."""
    def empty(*args, **kwargs):
        t = _real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-7777)
        return t
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = _real_empty


def _tol(dtype):
    return {torch.float32: (2e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (6e-2, 3e-2)}[dtype]


# ---------------------------------------------------------------- router top-k
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("T,E,k,dtype", [(1, 7, 2, torch.float32), (37, 60, 6, torch.bfloat16),
                                          (19, 129, 8, torch.float16), (70, 5, 1, torch.float32)])
@pytest.mark.parametrize("renorm", [False, True])
def test_router_topk_matches_reference(device, rng_seed, impl, T, E, k, dtype, renorm):
    # distinct logits per row (spacing above bf16's): tie order is not part of the contract
    perm = torch.argsort(torch.rand(T, E, device=device), dim=1)
    logits = (0.07 * perm - 3.0 + 0.01 * torch.rand(T, 1, device=device)).to(dtype)
    with poisoned_outputs():
        w, ids = router_topk(logits, k, renormalize=renorm, impl=impl)
    wr, ir = router_topk_ref(logits, k, renormalize=renorm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == (T, k) and ids.shape == (T, k)
    assert torch.isfinite(w).all() and (ids >= 0).all()
    # random logits have no ties, so ids must agree exactly, in order
    assert torch.equal(ids.cpu(), ir)
    torch.testing.assert_close(w.cpu().double(), wr, rtol=1e-5, atol=1e-6)
    if renorm:
        torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(T), rtol=1e-5, atol=1e-5)


def test_router_topk_strided_logits(device, rng_seed):
    big = torch.randn(11, 40, device=device)
    logits = big[:, ::3]  # non-contiguous columns
    w, ids = router_topk(logits, 4)
    wr, ir = router_topk_ref(logits, 4)
    assert torch.equal(ids.cpu(), ir)
    torch.testing.assert_close(w.cpu().double(), wr, rtol=1e-5, atol=1e-6)


def test_router_topk_errors(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError):
        router_topk(x, 9)
    with pytest.raises(ValueError):
        router_topk(x, 0)
    with pytest.raises(TypeError):
        router_topk(x, 2.0)
    with pytest.raises(ValueError):
        router_topk(x[0], 2)
    with pytest.raises(TypeError):
        router_topk(x.to(torch.int32), 2)
    assert ROUTER_RENORMALIZE["mixtral"] and not ROUTER_RENORMALIZE["qwen2_moe"]


# ---------------------------------------------------------------- reroute
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("T,k,M,A,id_dtype", [(1, 1, 5, 1, torch.int32), (29, 6, 64, 5, torch.int64),
                                               (1031, 3, 17, 9, torch.int32)])
def test_reroute_matches_reference(device, rng_seed, impl, T, k, M, A, id_dtype):
    topk = torch.randint(0, M, (T, k), device=device, dtype=id_dtype)
    adapters = torch.randint(-1, A, (T,), device=device, dtype=torch.int32)
    # rows: identity except a few columns moved to slots past M, as the store builds them
    emap = torch.arange(M, dtype=torch.int32).repeat(A, 1)
    for a in range(A):
        cols = torch.randperm(M)[: max(1, M // 4)]
        emap[a, cols] = M + torch.randint(0, 100, (cols.numel(),), dtype=torch.int32)
    emap = emap.to(device)
    with poisoned_outputs():
        out = reroute_experts(topk, adapters, emap, impl=impl)
    assert out.dtype == torch.int32 and out.shape == (T, k)
    assert torch.equal(out.cpu(), reroute_experts_ref(topk, adapters, emap))
    base = (adapters == -1).cpu()
    assert torch.equal(out.cpu()[base].long(), topk.cpu()[base].long())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_router_topk_fused_reroute(device, rng_seed, impl):
    """router_topk(..., adapter_ids, expert_map) == reroute_experts(router_topk(...)); the map
    may be a strided view (every other row of a bigger table, columns reversed)."""
    T, E, k, A = 45, 33, 4, 5
    perm = torch.argsort(torch.rand(T, E, device=device), dim=1)
    logits = 0.07 * perm - 1.0
    big = torch.randint(0, 500, (2 * A, 2 * E), dtype=torch.int32, device=device)
    emap = big[::2, ::2]
    assert emap.stride(1) != 1
    adapters = torch.randint(-1, A, (T,), device=device, dtype=torch.int32)
    with poisoned_outputs():
        w, ids = router_topk(logits, k, renormalize=True, adapter_ids=adapters, expert_map=emap, impl=impl)
    wr, ir = router_topk_ref(logits, k, renormalize=True)
    assert torch.equal(ids.cpu(), reroute_experts_ref(ir, adapters, emap))
    torch.testing.assert_close(w.cpu().double(), wr, rtol=1e-5, atol=1e-6)
    assert torch.equal(reroute_experts(ir.to(device), adapters, emap, impl=impl).cpu(), ids.cpu())
    with pytest.raises(ValueError, match="adapter_ids"):
        router_topk(logits, k, adapter_ids=adapters + A, expert_map=emap)
    with pytest.raises(ValueError, match="both"):
        router_topk(logits, k, adapter_ids=adapters)
    with pytest.raises(ValueError, match="columns"):
        router_topk(logits, k, adapter_ids=adapters, expert_map=emap[:, :-1])


def test_reroute_empty_and_errors(device):
    emap = torch.arange(6, dtype=torch.int32, device=device).repeat(3, 1)
    ids = torch.randint(0, 6, (4, 2), device=device, dtype=torch.int32)
    ad = torch.tensor([0, -1, 2, 1], device=device, dtype=torch.int32)
    assert reroute_experts(ids[:0], ad[:0], emap).shape == (0, 2)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        reroute_experts(ids + 6, ad, emap)
    with pytest.raises(ValueError, match="adapter_ids"):
        reroute_experts(ids, ad + 1, emap)  # 3 is not a row
    with pytest.raises(ValueError, match="adapter_ids"):
        reroute_experts(ids, ad - 1, emap)  # -2
    with pytest.raises(ValueError, match="expert_map"):
        reroute_experts(ids, ad, emap.long())
    with pytest.raises(ValueError, match="tokens"):
        reroute_experts(ids, ad[:3], emap)
    with pytest.raises(ValueError):
        reroute_experts(ids.float(), ad, emap)


# ---------------------------------------------------------------- align
@pytest.mark.parametrize("impl", ["triton", "triton-3-launch", "torch"])
@pytest.mark.parametrize("T,k,E,bm", [(23, 3, 11, 4), (1, 6, 40, 16), (300, 2, 5, 16), (9, 2, 70, 8),
                                      (60, 4, 300, 8)])
def test_moe_align_block_size_invariants(device, rng_seed, impl, T, k, E, bm, monkeypatch):
    if impl == "triton-3-launch":  # the path for batches over the one-program limit
        monkeypatch.setattr(moe_mod, "ALIGN_ONE_PROGRAM_MAX_PAIRS", 0)
        impl = "triton"
    ids = torch.randint(0, E, (T, k), device=device, dtype=torch.int32)
    if T > 100:
        ids[: T // 2] = 3  # one crowded expert
    with poisoned_outputs():
        sorted_ids, expert_ids, num_post = moe_align_block_size(ids, bm, E, impl=impl)
    sorted_ids, expert_ids, n = sorted_ids.cpu(), expert_ids.cpu(), int(num_post.item())
    flat = ids.reshape(-1).cpu().long()
    counts = torch.bincount(flat, minlength=E)
    assert n == int(((counts + bm - 1) // bm * bm).sum())        # exactly the padded total
    assert n % bm == 0 and n <= sorted_ids.numel()
    assert expert_ids.numel() == sorted_ids.numel() // bm
    valid = sorted_ids[:n][sorted_ids[:n] < T * k].long()
    assert sorted(valid.tolist()) == list(range(T * k))          # every pair exactly once
    assert ((sorted_ids[:n] >= 0) & (sorted_ids[:n] <= T * k)).all()
    assert (sorted_ids[n:] == T * k).all()                         # past the end: padding only
    for b in range(n // bm):
        blk = sorted_ids[b * bm:(b + 1) * bm].long()
        blk = blk[blk < T * k]
        assert blk.numel() > 0 and (flat[blk] == expert_ids[b]).all()  # one expert per tile
    assert expert_ids[: n // bm].tolist() == sorted(expert_ids[: n // bm].tolist())


# ---------------------------------------------------------------- fused MoE
def _moe_inputs(device, T, H, I, E, k, dtype, used=None):
    x = torch.randn(T, H, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) / I ** 0.5).to(dtype)
    logits = torch.randn(T, E if used is None else used, device=device)
    tw, ids = router_topk(logits, k, impl="torch")
    return x, w13, w2, tw, ids


@pytest.mark.parametrize("T,H,I,E,k,dtype", [
    (1, 40, 24, 5, 2, torch.float32),
    (13, 72, 40, 7, 3, torch.float32),
    (37, 48, 24, 9, 4, torch.bfloat16),
    (9, 40, 56, 6, 2, torch.float16),
])
def test_fused_moe_matches_reference(device, rng_seed, T, H, I, E, k, dtype):
    x, w13, w2, tw, ids = _moe_inputs(device, T, H, I, E, k, dtype)
    with poisoned_outputs():
        out = fused_moe(x, w13, w2, tw, ids, impl="triton")
    ref = fused_moe_ref(x, w13, w2, tw, ids)
    assert out.dtype == dtype and out.shape == (T, H)
    assert torch.isfinite(out).all()
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_fused_moe_torch_fallback(device, rng_seed):
    x, w13, w2, tw, ids = _moe_inputs(device, 21, 33, 17, 6, 2, torch.float32)
    out = fused_moe(x, w13, w2, tw, ids, impl="torch")
    torch.testing.assert_close(out.double(), fused_moe_ref(x, w13, w2, tw, ids), rtol=1e-4, atol=1e-5)


def test_fused_moe_large_tiles_and_strides(device, rng_seed):
    """Every tile shape the heuristic picks (BLOCK_M 16/32/64, L2 grouping on), through `config`
    (small inputs stay small); x and the ids are non-contiguous views."""
    T, H, I, E, k = 70, 40, 24, 3, 2
    xbig = torch.randn(T, 2 * H, device=device)
    x = xbig[:, ::2]
    _, w13, w2, tw, ids = _moe_inputs(device, T, H, I, E, k, torch.float32)
    ids_nc = ids.t().contiguous().t()
    tw_nc = tw.t().contiguous().t()
    assert not ids_nc.is_contiguous() and not x.is_contiguous()
    ref = fused_moe_ref(x, w13, w2, tw, ids)
    out = fused_moe(x, w13, w2, tw_nc, ids_nc, impl="triton")
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=1e-4)
    for cfg in (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
                dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)):
        out = fused_moe(x, w13, w2, tw, ids, impl="triton", config=cfg)
        torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=1e-4)


def test_fused_moe_chunks_long_batches(device, rng_seed, monkeypatch):
    import kernels.moe as moe

    monkeypatch.setattr(moe, "MAX_CHUNK_TOKENS", 4)
    x, w13, w2, tw, ids = _moe_inputs(device, 11, 40, 24, 5, 2, torch.float32)
    with poisoned_outputs():
        out = fused_moe(x, w13, w2, tw, ids, impl="triton")
    assert out.shape == (11, 40)
    torch.testing.assert_close(out.double(), fused_moe_ref(x, w13, w2, tw, ids), rtol=2e-4, atol=1e-4)


def test_fused_moe_reads_only_named_experts(device, rng_seed):
    """Experts nobody routes to may be garbage (in the store: unmapped slots)."""
    T, H, I, E, k = 11, 40, 24, 8, 2
    x, w13, w2, tw, ids = _moe_inputs(device, T, H, I, E, k, torch.float32, used=4)
    ids = ids * 2  # only even experts are named
    w13[1::2] = float("nan")
    w2[1::2] = float("nan")
    out = fused_moe(x, w13, w2, tw, ids, impl="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), fused_moe_ref(x, w13, w2, tw, ids), rtol=2e-4, atol=1e-4)


def test_fused_moe_errors(device):
    x, w13, w2, tw, ids = _moe_inputs(device, 5, 16, 8, 4, 2, torch.float32)
    with pytest.raises(TypeError):
        fused_moe(x.half(), w13, w2, tw, ids)
    with pytest.raises(ValueError, match="shape"):
        fused_moe(x, w13[:, :-1], w2, tw, ids)
    with pytest.raises(ValueError, match="shape"):
        fused_moe(x, w13, w2[:3], tw, ids)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        fused_moe(x, w13, w2, tw, ids + 4)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, w13, w2, tw[:, :1], ids)
    with pytest.raises(ValueError, match="tokens"):
        fused_moe(x[:4], w13, w2, tw, ids)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, tw, ids.float())
    assert fused_moe(x[:0], w13, w2, tw[:0], ids[:0]).shape == (0, 16)


# ---------------------------------------------------------------- GPU, realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 256, 2048])  # one per tile config
def test_fused_moe_gpu_deepseek_lite_shapes(rng_seed, T):
    H, I, E, k = 2048, 1408, 78, 6  # 64 base experts + 14 adapter slots
    x, w13, w2, tw, ids = _moe_inputs("cuda", T, H, I, E, k, torch.bfloat16)
    with poisoned_outputs():
        out = fused_moe(x, w13, w2, tw, ids)
    ref = fused_moe_ref(x, w13, w2, tw, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=2e-2)
    # the align step orders an expert's pairs by atomics; each row is computed on its own, so
    # the result must not depend on that order
    assert torch.equal(fused_moe(x, w13, w2, tw, ids), out)


@pytest.mark.gpu
def test_reroute_and_router_gpu_8k(rng_seed):
    T, k, M, A = 8192, 6, 64, 20
    perm = torch.argsort(torch.rand(T, M, device="cuda"), dim=1)  # no ties (order is not contract)
    logits = (0.07 * perm - 2.0).to(torch.bfloat16)
    w, ids = router_topk(logits, k)
    wr, ir = router_topk_ref(logits, k)
    assert torch.equal(ids.cpu(), ir)
    torch.testing.assert_close(w.cpu().double(), wr, rtol=1e-5, atol=1e-6)
    emap = torch.arange(M, dtype=torch.int32).repeat(A, 1)
    emap[:, ::9] += 100
    emap = emap.cuda()
    ad = torch.randint(-1, A, (T,), device="cuda", dtype=torch.int32)
    out = reroute_experts(ids, ad, emap)
    assert torch.equal(out.cpu(), reroute_experts_ref(ids, ad, emap))
