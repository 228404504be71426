"""write_kv / write_lowrank vs their float64 references, on NaN-poisoned caches."""
from __future__ import annotations

import pytest
import torch

from kernels.cache_write import (gather_cache, write_kv, write_kv_reference, write_lowrank,
                                 write_lowrank_reference)


def _slots(T, num_slots, device, skip_every=3):
    s = torch.randperm(num_slots, device=device)[:T]
    s[::skip_every] = -1  # some tokens are stored already
    return s


def _assert_same(got, want_f64, downcast=False):
    # A write is a cast, so the result equals the float64 reference rounded to the cache dtype,
    # bit for bit, and NaN where nothing may be written. Compiled Triton rounds to nearest even
    # like torch; Triton's CPU interpreter truncates fp32 -> bf16, so there allow one ulp.
    rtol = torch.finfo(got.dtype).eps if downcast and not got.is_cuda else 0.0
    torch.testing.assert_close(got.double(), want_f64.to(got.dtype).double(), rtol=rtol, atol=0, equal_nan=True)


def _kv_case(device, T, H, D, NB, BS, src_dtype, cache_dtype, impl, strided):
    k = torch.randn(T, H, D, device=device, dtype=src_dtype)
    v = torch.randn(T, D, H, device=device, dtype=src_dtype).transpose(1, 2)  # non-contiguous source
    if strided:  # caches as views with padding between heads, like a sub-view of a bigger tensor
        k_cache = torch.full((NB, BS, H, D + 3), float("nan"), device=device, dtype=cache_dtype)[..., :D]
        v_cache = torch.full((NB, BS, H, D + 3), float("nan"), device=device, dtype=cache_dtype)[..., 3:]
    else:
        k_cache = torch.full((NB, BS, H, D), float("nan"), device=device, dtype=cache_dtype)
        v_cache = torch.full((NB, BS, H, D), float("nan"), device=device, dtype=cache_dtype)
    slots = _slots(T, NB * BS, device)
    want_k, want_v = write_kv_reference(k, v, k_cache, v_cache, slots)
    write_kv(k, v, k_cache, v_cache, slots, impl=impl)
    down = torch.finfo(cache_dtype).bits < torch.finfo(src_dtype).bits
    _assert_same(k_cache, want_k, down)
    _assert_same(v_cache, want_v, down)
    # every slot that was to be written was written (no NaN left there)
    kept = slots[slots >= 0].long()
    assert not k_cache[kept // BS, kept % BS].isnan().any()
    assert not v_cache[kept // BS, kept % BS].isnan().any()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32),
                                                   (torch.float32, torch.bfloat16),
                                                   (torch.float16, torch.float16)])
def test_write_kv_matches_reference(device, rng_seed, impl, src_dtype, cache_dtype):
    _kv_case(device, T=11, H=3, D=24, NB=7, BS=5, src_dtype=src_dtype, cache_dtype=cache_dtype,
             impl=impl, strided=cache_dtype == torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("r", [5, 8])
def test_write_lowrank_matches_reference(device, rng_seed, impl, r):
    T, NB, BS = 13, 6, 4
    x = torch.randn(T, r, device=device)
    cache = torch.full((NB, BS, r), float("nan"), device=device, dtype=torch.bfloat16)
    slots = _slots(T, NB * BS, device).to(torch.int32)
    want = write_lowrank_reference(x, cache, slots)
    write_lowrank(x, cache, slots, impl=impl)
    _assert_same(cache, want, downcast=True)


def test_gather_reads_back_in_order(device, rng_seed):
    NB, BS, H, D = 5, 3, 2, 4
    cache = torch.randn(NB, BS, H, D, device=device)
    table = [3, 0, 4]
    out = gather_cache(cache, table, 8)
    want = torch.cat([cache[3], cache[0], cache[4]])[:8]
    assert torch.equal(out, want)
    with pytest.raises(ValueError):
        gather_cache(cache, [1], 4)


def test_bad_inputs_raise_before_writing(device):
    k = torch.randn(4, 2, 8, device=device)
    cache = torch.full((3, 4, 2, 8), float("nan"), device=device)
    ok = torch.tensor([0, 1, -1, 11], device=device)
    with pytest.raises(ValueError):  # slot out of range
        write_kv(k, k, cache, cache.clone(), torch.tensor([0, 1, 2, 12], device=device))
    with pytest.raises(ValueError):
        write_kv(k, k, cache, cache.clone(), torch.tensor([0, 1, -2, 3], device=device))
    with pytest.raises(TypeError):
        write_kv(k, k, cache, cache.clone(), ok.float())
    with pytest.raises(ValueError):  # head dim mismatch
        write_kv(k[..., :4], k[..., :4], cache, cache.clone(), ok)
    with pytest.raises(ValueError):
        write_kv(k, k, cache, cache.clone(), ok[:3])
    with pytest.raises(ValueError):
        write_lowrank(torch.randn(4, 3, device=device), torch.zeros(3, 4, 5, device=device), ok)
    assert cache.isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_write_kv_gpu_llama_shapes(rng_seed, cache_dtype):
    _kv_case("cuda", T=777, H=8, D=128, NB=97, BS=16, src_dtype=torch.float32,
             cache_dtype=cache_dtype, impl="triton", strided=False)
    _kv_case("cuda", T=301, H=5, D=80, NB=41, BS=8, src_dtype=cache_dtype,
             cache_dtype=cache_dtype, impl="triton", strided=True)


@pytest.mark.gpu
def test_write_lowrank_gpu(rng_seed):
    T, NB, BS, r = 1001, 80, 16, 8
    x = torch.randn(T, r, device="cuda")
    cache = torch.full((NB, BS, r), float("nan"), device="cuda", dtype=torch.bfloat16)
    slots = _slots(T, NB * BS, "cuda")
    want = write_lowrank_reference(x, cache, slots)
    write_lowrank(x, cache, slots)
    _assert_same(cache, want)
