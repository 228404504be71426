"""Multi-LoRA shrink / expand (kernels.lora) against the float64 references in kernels.lora_ref.

Every output the wrappers allocate is NaN-poisoned (torch.empty is patched for the call), so a
row or a K-split partial the kernel forgot to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from kernels.lora import (LoraPlan, lora_expand, lora_plan, lora_shrink, lora_shrink_all,
                          shares_one_a)
from kernels.lora_ref import lora_expand_ref, lora_shrink_all_ref, lora_shrink_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ||out - ref|| / ||ref||: fp32 keeps fp32 math (no tf32); half types round inputs and output.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
IMPLS = ["triton", "torch"]


@pytest.fixture
def poison(monkeypatch):
    """Make every float torch.empty NaN-filled while the test runs."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def mixed_ids(T: int, A: int, device, *, with_none: bool = True) -> torch.Tensor:
    """Random adapter ids in [-1, A) that use -1 and (for T > A) every adapter at least once."""
    lo = -1 if with_none else 0
    ids = torch.randint(lo, A, (T,), dtype=torch.int32)
    if T > A + 1:
        ids[: A + 1 if with_none else A] = torch.arange(lo, A, dtype=torch.int32)
        ids = ids[torch.randperm(T)]
    return ids.to(device)


def weights(A, K, N, dtype, device):
    # Scaled so outputs stay O(1) in half precision.
    return (torch.randn(A, K, N, device=device) / K ** 0.5).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,r,A", [(37, 203, 16, 3), (5, 97, 8, 4), (61, 75, 128, 2), (1, 129, 24, 5)])
def test_shrink_matches_reference(impl, dtype, T, H, r, A, device, rng_seed, poison):
    x = torch.randn(T, H, device=device).to(dtype)
    a = weights(A, H, r, dtype, device)
    ids = mixed_ids(T, A, device)
    y = lora_shrink(x, a, ids, impl=impl)
    assert y.shape == (T, r) and y.dtype == dtype and y.device == x.device
    ref = lora_shrink_ref(x, a, ids)
    assert rel_err(y, ref) < TOL[dtype]
    assert torch.all(y[ids.cpu() < 0].cpu() == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,r,N,A", [(37, 16, 301, 3), (3, 8, 45, 2), (50, 128, 131, 4)])
def test_expand_matches_reference(impl, dtype, T, r, N, A, device, rng_seed, poison):
    y = torch.randn(T, r, device=device).to(dtype)
    b = weights(A, r, N, dtype, device)
    ids = mixed_ids(T, A, device)
    out = lora_expand(y, b, ids, scale=0.75, impl=impl)
    assert out.shape == (T, N) and out.dtype == dtype
    assert rel_err(out, lora_expand_ref(y, b, ids, scale=0.75)) < TOL[dtype]
    assert torch.all(out[ids.cpu() < 0].cpu() == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_expand_adds_into_out(impl, dtype, out_dtype, device, rng_seed):
    T, r, N, A = 41, 16, 259, 3
    y = torch.randn(T, r, device=device).to(dtype)
    b = weights(A, r, N, dtype, device)
    ids = mixed_ids(T, A, device)
    out = torch.randn(T, N, device=device).to(out_dtype)
    before = out.clone()
    ret = lora_expand(y, b, ids, out=out, scale=2.0, impl=impl)
    assert ret is out
    ref = lora_expand_ref(y, b, ids, out=before, scale=2.0)
    assert rel_err(out, ref) < TOL[dtype]
    none = ids < 0
    assert torch.equal(out[none], before[none]), "rows without an adapter must be left alone"
    # the added part alone, so a kernel that only rewrote `out` could not pass
    delta = out.double() - before.double()
    assert rel_err(delta[~none], (ref - before.cpu().double())[~none.cpu()]) < 3 * max(TOL[dtype], TOL[out_dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_a_fast_path_equals_general_path(impl, dtype, device, rng_seed, poison):
    T, H, r, A = 45, 131, 16, 4
    x = torch.randn(T, H, device=device).to(dtype)
    a1 = weights(1, H, r, dtype, device)[0]
    stacked = a1.unsqueeze(0).expand(A, H, r).contiguous()
    assert shares_one_a(stacked) and shares_one_a(a1)
    ids = mixed_ids(T, A, device)
    fast = lora_shrink(x, a1, ids, impl=impl)
    general = lora_shrink(x, stacked, ids, impl=impl)
    assert rel_err(fast, lora_shrink_ref(x, stacked, ids)) < TOL[dtype]
    torch.testing.assert_close(fast, general, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.all(fast[ids < 0] == 0)


def test_shares_one_a_detects_difference(device, rng_seed):
    a = weights(3, 33, 8, torch.float32, device)
    assert not shares_one_a(a)
    same = a[:1].expand(3, 33, 8).clone()
    assert shares_one_a(same)
    same[2, 7, 3] += 1e-3
    assert not shares_one_a(same)
    assert shares_one_a(a[:1])


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_split_k(split_k, dtype, device, rng_seed, poison):
    T, H, r, A = 29, 517, 8, 3
    x = torch.randn(T, H, device=device).to(dtype)
    a = weights(A, H, r, dtype, device)
    ids = mixed_ids(T, A, device)
    ref = lora_shrink_ref(x, a, ids, scale=0.5)
    assert rel_err(lora_shrink(x, a, ids, scale=0.5, split_k=split_k, impl="triton"), ref) < TOL[dtype]
    assert rel_err(lora_shrink(x, a[1], ids, split_k=split_k, impl="triton"),
                   lora_shrink_ref(x, a[1], ids)) < TOL[dtype]


def _split_counters_zero(device) -> bool:
    from kernels import _counters

    return int(_counters.split_counters(torch.device(device), 1).abs().sum()) == 0


@pytest.mark.parametrize("split_k", [4, 7])
def test_split_k_sums(split_k, device, rng_seed, poison):
    """The K splits' partials summed by the last split of each tile to arrive (no second
    launch) where a tile's partials are few, else by one torch.sum launch: every path
    (segmented over several row tiles, dense, stacked over A·r = 72 columns: 2 column tiles),
    the arrival counters left at zero, and a second call on fresh data (the same counters);
    [64 × 64] tiles over 16 splits go through the sum launch."""
    from kernels import lora as L

    T, H, r, A = 30, 1031, 24, 3  # H over split_k * 128
    real_sum = torch.sum
    for _ in range(2):
        x = torch.randn(T, H, device=device)
        a = weights(A, H, r, torch.float32, device)
        ids = mixed_ids(T, A, device)
        sums = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "sum", lambda *args, **kw: sums.append(1) or real_sum(*args, **kw))
            y = lora_shrink(x, a, ids, split_k=split_k, impl="triton")
            dense = lora_shrink(x, a[2], ids, split_k=split_k, impl="triton")
            stacked = lora_shrink_all(x, a, split_k=split_k, impl="triton")
            assert not sums  # at most 32 × 64 × 7 partials a tile: summed in the kernel
            x70 = torch.randn(70, H, device=device)
            many = lora_shrink_all(x70, a, split_k=16, impl="triton")
            assert len(sums) == 1  # 64 × 64 × 16: one sum launch
        assert rel_err(many, lora_shrink_all_ref(x70, a)) < TOL[torch.float32]
        assert rel_err(y, lora_shrink_ref(x, a, ids)) < TOL[torch.float32]
        assert rel_err(dense, lora_shrink_ref(x, a[2], ids)) < TOL[torch.float32]
        assert rel_err(stacked, lora_shrink_all_ref(x, a)) < TOL[torch.float32]
        assert _split_counters_zero(device)
    assert L._split_for(x, 1, H, 128, split_k) == split_k


def test_split_launch_refuses_to_add(device):
    from kernels import lora as L

    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="cannot add"):
        L._launch(x, x.view(1, 3, 8), x, ids=None, plan=None, M=3, N=8, K=8, R=8, w_strides=(0, 8, 1),
                  out_strides=(0, 8, 1), scale=1.0, add=True, block_m=16, block_n=16, block_k=16, split=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [None, 2])
def test_shrink_all_matches_reference(impl, dtype, split_k, device, rng_seed, poison):
    T, H, r, A = 19, 101, 8, 3
    x = torch.randn(T, H, device=device).to(dtype)
    a = weights(A, H, r, dtype, device)
    out = lora_shrink_all(x, a, split_k=split_k, impl=impl)
    assert out.shape == (A, T, r) and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, lora_shrink_all_ref(x, a)) < TOL[dtype]
    # agent a's slice is exactly what a single-adapter shrink would give it
    ids = torch.full((T,), 1, dtype=torch.int32, device=device)
    torch.testing.assert_close(out[1], lora_shrink(x, a, ids, impl=impl), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_reused_across_shrink_and_expand(impl, device, rng_seed, poison):
    T, H, r, N, A = 53, 77, 16, 99, 5
    x = torch.randn(T, H, device=device)
    a, b = weights(A, H, r, torch.float32, device), weights(A, r, N, torch.float32, device)
    ids = mixed_ids(T, A, device)
    plan = lora_plan(ids, A)
    y = lora_shrink(x, a, ids, plan=plan, impl=impl)
    res = torch.randn(T, N, device=device)
    ref = lora_expand_ref(lora_shrink_ref(x, a, ids), b, ids, out=res)
    lora_expand(y, b, ids, plan=plan, out=res, impl=impl)
    assert rel_err(res, ref) < 1e-5


@pytest.mark.parametrize("block_m", [None, 16, 64])
def test_plan_partitions_tokens_by_adapter(block_m, device, rng_seed):
    T, A = 203, 7
    ids = mixed_ids(T, A, device)
    plan = lora_plan(ids, A, block_m=block_m)
    assert isinstance(plan, LoraPlan) and plan.num_tokens == T
    order = plan.order.cpu().long()
    assert sorted(order.tolist()) == list(range(T))
    seen = torch.zeros(T, dtype=torch.int64)
    ids_c = ids.cpu().long()
    for adapter, start, length in plan.tiles.cpu().tolist():
        assert 1 <= length <= plan.block_m
        toks = order[start:start + length]
        assert torch.all(ids_c[toks] == adapter)
        seen[toks] += 1
    assert torch.all(seen == 1)
    assert list(plan.counts) == torch.bincount(ids_c + 1, minlength=A + 1).tolist()


def test_plan_from_host_ids_equals_plan_from_device_ids(device, rng_seed):
    """Ids on the host, plan wanted on `device` (the engine's way: no sync): the same plan as
    the one built from the ids on the device, its tensors views of one copy; and it drives
    shrink + expand to the reference result."""
    import kernels.lora as kl

    T, H, r, N, A = 61, 40, 8, 33, 4
    host = mixed_ids(T, A, "cpu")
    ref = kl._device_plan(host.to(device), A, None)  # the on-device algorithm, also on CPU ids
    for bm in (None, 16):
        want = kl._device_plan(host.to(device), A, bm)
        plan = lora_plan(host, A, device=device, block_m=bm)
        assert plan.adapter_ids.device.type == torch.device(device).type
        for f in ("adapter_ids", "order", "tiles"):
            assert torch.equal(getattr(plan, f).cpu(), getattr(want, f).cpu()), f
        assert plan.counts == want.counts and plan.block_m == want.block_m
        base = plan.adapter_ids.untyped_storage().data_ptr()
        assert plan.order.untyped_storage().data_ptr() == base == plan.tiles.untyped_storage().data_ptr()
    assert lora_plan(host, A).counts == ref.counts
    x = torch.randn(T, H, device=device)
    a, b = weights(A, H, r, torch.float32, device), weights(A, r, N, torch.float32, device)
    ids = host.to(device)
    want_out = lora_expand_ref(lora_shrink_ref(x, a, ids), b, ids)
    plan = lora_plan(host, A, device=device)
    got = lora_expand(lora_shrink(x, a, ids, plan=plan), b, ids, plan=plan)
    assert rel_err(got, want_out) < 1e-4
    for bad in ([0, A], [-2, 1]):
        for build in (lambda t: lora_plan(t, A, device=device), lambda t: kl._device_plan(t, A, None)):
            with pytest.raises(ValueError, match="out of range"):
                build(torch.tensor(bad, dtype=torch.int32))
    numpy_plan = lora_plan(host.numpy().astype("int64"), A, device=device)
    assert torch.equal(numpy_plan.tiles.cpu(), ref.tiles.cpu()) and numpy_plan.counts == ref.counts
    import numpy as np
    with pytest.raises(ValueError, match="out of range"):
        lora_plan(np.array([0, 2 ** 32 + 1]), A, device=device)  # not wrapped into range by a cast
    with pytest.raises(TypeError, match="integer array"):
        lora_plan(np.zeros(3), A, device=device)
    empty = lora_plan(torch.zeros(0, dtype=torch.int32), A, device=device)
    assert empty.num_tokens == 0 and empty.num_tiles == 0 and sum(empty.counts) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plan_for_another_device_needs_host_ids():
    ids = torch.tensor([0, 1, -1], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="on that device or on the CPU"):
        lora_plan(ids, 2, device="cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_batches(impl, device, rng_seed, poison):
    H, r, N, A = 67, 8, 45, 3
    a, b = weights(A, H, r, torch.float32, device), weights(A, r, N, torch.float32, device)
    # empty batch
    x0 = torch.randn(0, H, device=device)
    ids0 = torch.zeros(0, dtype=torch.int32, device=device)
    assert lora_shrink(x0, a, ids0, impl=impl).shape == (0, r)
    assert lora_expand(torch.randn(0, r, device=device), b, ids0, impl=impl).shape == (0, N)
    # all tokens without an adapter: zeros, and NaN inputs in those rows are never read
    T = 21
    x = torch.randn(T, H, device=device)
    x[3] = float("nan")
    none = torch.full((T,), -1, dtype=torch.int32, device=device)
    assert torch.all(lora_shrink(x, a, none, impl=impl) == 0)
    assert torch.all(lora_shrink(x, a[0], none, impl=impl) == 0)
    res = torch.randn(T, N, device=device)
    before = res.clone()
    lora_expand(torch.randn(T, r, device=device), b, none, out=res, impl=impl)
    assert torch.equal(res, before)
    # one adapter for all tokens, int64 ids accepted
    ids = torch.full((T,), 2, dtype=torch.int64, device=device)
    x[3] = torch.randn(H, device=device)
    assert rel_err(lora_shrink(x, a, ids, impl=impl), lora_shrink_ref(x, a, ids)) < 1e-5


def test_non_contiguous_inputs(device, rng_seed, poison):
    T, H, r, N, A = 23, 70, 16, 50, 3
    big = torch.randn(T, H + 9, device=device)
    x = big[:, 5:5 + H]  # row stride != H
    a = weights(A, r, H, torch.float32, device).transpose(1, 2)  # [A, H, r], column-major
    b = weights(A, N, r, torch.float32, device).transpose(1, 2)  # [A, r, N]
    ids = mixed_ids(T, A, device)
    y = lora_shrink(x, a, ids, impl="triton")
    assert rel_err(y, lora_shrink_ref(x, a, ids)) < 1e-5
    res_big = torch.randn(N + 3, T, device=device)
    res = res_big[:N].t()  # [T, N] with column stride
    before = res.clone()
    lora_expand(y, b, ids, out=res, impl="triton")
    assert rel_err(res, lora_expand_ref(y, b, ids, out=before)) < 1e-5


def test_bad_inputs_raise_before_any_change(device):
    T, H, r, N, A = 9, 33, 8, 17, 3
    x = torch.randn(T, H, device=device)
    a = torch.randn(A, H, r, device=device)
    b = torch.randn(A, r, N, device=device)
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0], dtype=torch.int32, device=device)
    y = torch.randn(T, r, device=device)
    out = torch.randn(T, N, device=device)
    before = out.clone()
    for bad in ([0, 1, 3, -1, 0, 1, 2, -1, 0], [0, 1, 2, -2, 0, 1, 2, -1, 0]):
        bad_ids = torch.tensor(bad, dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match="out of range"):
            lora_shrink(x, a, bad_ids)
        with pytest.raises(ValueError, match="out of range"):
            lora_expand(y, b, bad_ids, out=out)
    with pytest.raises(ValueError, match="out of range"):
        lora_shrink(x, a[0], torch.tensor([0] * 8 + [-5], dtype=torch.int32, device=device))
    assert torch.equal(out, before)
    with pytest.raises(TypeError):
        lora_shrink(x, a.half(), ids)  # dtype mismatch
    with pytest.raises(TypeError):
        lora_shrink(x.long(), a, ids)
    with pytest.raises(TypeError):
        lora_shrink(x, a, ids.float())
    with pytest.raises(ValueError):
        lora_shrink(x, a[:, :-1], ids)  # H mismatch
    with pytest.raises(ValueError):
        lora_shrink(x, a, ids[:-1])  # wrong T
    with pytest.raises(ValueError):
        lora_shrink(x[0], a, ids)  # x not 2-D
    with pytest.raises(ValueError):
        lora_shrink(x, torch.randn(2, 3, H, r, device=device), ids)
    with pytest.raises(ValueError):
        lora_shrink(x, torch.randn(A, H, r, device="meta"), ids)  # device mismatch
    with pytest.raises(ValueError):
        lora_expand(y, b, ids, out=torch.randn(T, N + 1, device=device))
    with pytest.raises(ValueError):
        lora_expand(y, b[:, :-1], ids)  # r mismatch
    with pytest.raises(ValueError):
        lora_shrink(x, a, ids, plan=lora_plan(ids, A + 1))  # plan for other weights
    with pytest.raises(ValueError):
        lora_shrink(x, a, ids, impl="cuda")
    with pytest.raises(ValueError):
        lora_shrink_all(x, a[0])
    with pytest.raises(ValueError):
        lora_plan(ids, 0)
    assert torch.equal(out, before)


# ---------------------------------------------------------------- GPU, realistic sizes

# A handful of cases: each new (block, dtype) combination is a compile, and the whole project's
# GPU tests share a few minutes.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,T,r", [(torch.bfloat16, 1, 16), (torch.bfloat16, 64, 8), (torch.bfloat16, 256, 64),
                                       (torch.bfloat16, 2049, 128), (torch.float16, 33, 128), (torch.float16, 255, 16)])
def test_gpu_shrink_expand_realistic(dtype, T, r, device, rng_seed, poison):
    H, N, A = 4096, 4096, 16
    x = torch.randn(T, H, device=device).to(dtype)
    a, b = weights(A, H, r, dtype, device), weights(A, r, N, dtype, device)
    ids = mixed_ids(T, A, device)
    plan = lora_plan(ids, A)
    y = lora_shrink(x, a, ids, plan=plan)
    assert rel_err(y, lora_shrink_ref(x, a, ids)) < TOL[dtype]
    res = torch.randn(T, N, device=device).to(dtype)
    before = res.clone()
    lora_expand(y, b, ids, plan=plan, out=res, scale=0.5)
    assert rel_err(res, lora_expand_ref(y, b, ids, out=before, scale=0.5)) < TOL[dtype]
    assert torch.equal(res[ids < 0], before[ids < 0])
    fresh = lora_expand(y, b, ids, plan=plan)
    assert rel_err(fresh, lora_expand_ref(y, b, ids)) < TOL[dtype]
    fast = lora_shrink(x, a[3], ids)
    assert rel_err(fast, lora_shrink_ref(x, a[3], ids)) < TOL[dtype]
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 1000])
def test_gpu_shrink_all_and_fp32(T, device, rng_seed, poison):
    H, r, A = 4096, 16, 8
    x = torch.randn(T, H, device=device).to(torch.bfloat16)
    a = weights(A, H, r, torch.bfloat16, device)
    assert rel_err(lora_shrink_all(x, a), lora_shrink_all_ref(x, a)) < TOL[torch.bfloat16]
    x32, a32 = x.float(), a.float()
    ids = mixed_ids(T, A, device)
    assert rel_err(lora_shrink(x32, a32, ids), lora_shrink_ref(x32, a32, ids)) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_split_shrink_in_a_cuda_graph(rng_seed):
    """Decode-sized shrinks (split over K, summed by the last split of each tile) captured in a
    CUDA graph and replayed on fresh inputs: right every replay (the capture's own counters,
    zeroed by the graph), and bit for bit what the eager call gives (a sum in split order)."""
    from kernels import lora as L

    H, r, A, T = 4096, 16, 8, 5
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    a = weights(A, H, r, torch.bfloat16, "cuda")
    ids = mixed_ids(T, A, "cuda")
    plan = lora_plan(ids, A)
    assert L._split_for(x, plan.num_tiles, H, 128, None) > 1

    def calls():  # (the dense path checks its ids' range by a sync: not under capture)
        return lora_shrink(x, a, ids, plan=plan), lora_shrink_all(x, a)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and allocator warm-up outside the capture
        calls()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = calls()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(outs[0], lora_shrink_ref(x, a, ids)) < TOL[torch.bfloat16]
        assert rel_err(outs[1], lora_shrink_all_ref(x, a)) < TOL[torch.bfloat16]
        for o, e in zip(outs, calls()):
            assert torch.equal(o, e)
