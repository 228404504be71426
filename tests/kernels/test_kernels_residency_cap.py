"""Paged decode's shifted-tail launches capped at the residency they were sized for.

The shifted-tail kernel needs less shared memory than the masked-tail one (74 KB against 106 at
128-key tiles, D 128), so an SM would run 3 of its programs where split and multi-wave launches
are sized for 2; `_launch_plan` asks for the shared memory of `_residency_cap_smem` instead and
`_relaunch` launches with it. On CPU: the arithmetic and the launch metadata; on the GPU: the
driver's own occupancy for the compiled kernel at both sizes, and outputs against the float64
reference with NaN in every cache slot no sequence owns, over repeated (direct) launches.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels import _relaunch as R
from kernels import attention as A

H200 = SimpleNamespace(shared_memory_per_multiprocessor=233472, shared_memory_per_block_optin=232448)


@pytest.fixture(autouse=True)
def _fresh_smem_optin():
    """`_smem_optin` is cached per device index: no fake device's figure may outlive its test."""
    A._smem_optin.cache_clear()
    yield
    A._smem_optin.cache_clear()


def _props(monkeypatch, props):
    monkeypatch.setattr(A.torch.cuda, "get_device_properties", lambda index: props)
    A._smem_optin.cache_clear()


@pytest.mark.parametrize("per_sm", [1, 2, 3, 4, 7])
def test_cap_fits_per_sm_programs_and_not_one_more(monkeypatch, per_sm):
    _props(monkeypatch, H200)
    cap = A._residency_cap_smem(torch.device("cuda", 0), per_sm)
    need = cap + A._RESERVED_SMEM
    assert per_sm * need <= H200.shared_memory_per_multiprocessor < (per_sm + 1) * need
    assert cap <= H200.shared_memory_per_block_optin


def test_no_cap_that_would_not_leave_room_for_per_sm(monkeypatch):
    # an SM with room for one program of the cap but a per-block limit below it
    _props(monkeypatch, SimpleNamespace(shared_memory_per_multiprocessor=233472, shared_memory_per_block_optin=100 * 1024))
    assert A._residency_cap_smem(torch.device("cuda", 0), 1) == 0
    assert A._residency_cap_smem(torch.device("cuda", 0), 2) > 0


def test_cap_on_a_small_device_and_off_the_gpu(monkeypatch):
    small = SimpleNamespace(shared_memory_per_multiprocessor=101 * 1024 + 17, shared_memory_per_block_optin=99 * 1024)
    _props(monkeypatch, small)
    cap = A._residency_cap_smem(torch.device("cuda", 1), 2)
    need = cap + A._RESERVED_SMEM
    assert 2 * need <= small.shared_memory_per_multiprocessor < 3 * need
    _props(monkeypatch, SimpleNamespace())  # a device that does not say
    assert A._residency_cap_smem(torch.device("cuda", 0), 2) == 0
    assert A._residency_cap_smem(torch.device("cpu"), 2) == 0
    assert A._residency_cap_smem(torch.device("meta"), 2) == 0


class _Compiled:
    def __init__(self, shared, packed=None):
        self.metadata = SimpleNamespace(shared=shared)
        self.packed_metadata = packed if packed is not None else (4, 1, shared)
        self.function, self.runs = "fn", []

    def run(self, g0, g1, g2, stream, function, packed, launch_meta, enter, exit_, *vals):
        self.runs.append(packed)

    def launch_metadata(self, grid, stream, *vals):
        return None


@pytest.mark.parametrize("shared, packed, min_shared, want", [
    (73760, None, 76928, (4, 1, 76928)),          # the shifted tail: raised to the cap
    (110000, None, 76928, (4, 1, 110000)),        # needs more already: its own
    (40000, None, 76928, (4, 1, 40000)),          # under 48 KB Triton keeps the 48 KB limit: its own
    (73760, (4, 1, 73760, 1, 1, 1), 76928, (4, 1, 76928, 1, 1, 1)),  # cluster dims after: kept
    (73760, (4, 73760), 76928, (4, 73760)),       # metadata of another shape: left alone
    (73760, (4, 1, 9), 76928, (4, 1, 9)),         # ... or whose third field is not the size
])
def test_with_shared_only_where_safe(shared, packed, min_shared, want):
    k = _Compiled(shared, packed)
    assert R._with_shared(k, k.packed_metadata, min_shared) == want


def test_relaunch_launches_a_kept_kernel_with_the_cap(monkeypatch):
    kernel = _Compiled(73760)

    class Jit:
        params = [SimpleNamespace(name="A", default=None)]

        def __getitem__(self, grid):
            return lambda *args, **meta: kernel

    monkeypatch.setattr(R, "_JITFunction", Jit)
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(R, "_driver", SimpleNamespace(active=active))
    monkeypatch.setattr(R, "_knobs", SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None,
                                                                              launch_exit_hook=None)))
    capped: dict = {}
    a = torch.randn(8)
    for _ in range(3):
        R.relaunch(Jit(), (5,), (a,), (), {}, capped, min_shared=76928)
    assert kernel.runs == [(4, 1, 76928), (4, 1, 76928)]  # the first went through Triton
    own: dict = {}  # another plan's cache, without a cap
    for _ in range(2):
        R.relaunch(Jit(), (5,), (a,), (), {}, own)
    assert kernel.runs[2:] == [(4, 1, 73760)]


# ---------------------------------------------------------------- GPU
def _occupancy(function: int, threads: int, smem: int) -> int:
    from cuda.bindings import driver as cu

    err, n = cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(cu.CUfunction(function), threads, smem)
    assert err == cu.CUresult.CUDA_SUCCESS, err
    return n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lens", [[4059], [3001, 4095, 1], [1023, 700, 9, 4096]])
def test_gpu_capped_launch_keeps_two_an_sm_and_matches_reference(rng_seed, lens):
    from kernels.attention_ref import paged_attention_decode_ref

    if not A._has_tma(torch.device("cuda")):
        pytest.skip("the shifted tail at full-width tiles needs TMA (compute capability 9.0+)")
    hq, hkv, d, bs = 32, 8, 128, 128
    width = -(-max(lens) // bs)
    nb = len(lens) * width + 5
    table = torch.randperm(nb, device="cuda")[:len(lens) * width].view(len(lens), width).int()
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    k = torch.full((nb, bs, hkv, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    v = torch.full_like(k, float("nan"))
    for i, n in enumerate(lens):  # only the slots each sequence owns hold numbers
        for j in range(-(-n // bs)):
            rows = min(bs, n - j * bs)
            k[table[i, j], :rows] = torch.randn(rows, hkv, d, device="cuda").to(k.dtype)
            v[table[i, j], :rows] = torch.randn(rows, hkv, d, device="cuda").to(v.dtype)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=torch.bfloat16)
    key = A._launch_key(q, k, v, q, paged=True, decode=True, batch=len(lens), block_tables=table, lora=None,
                        s2=None, max_seqlen_q=None, num_splits=None)
    plan = A._launch_plan(key)
    assert plan.meta["SHIFT_TAIL"] and plan.min_shared > 0 and plan.ring is None, plan.meta
    ref = paged_attention_decode_ref(q, k, v, table, sl, 0.088)
    for _ in range(3):  # the first through Triton, the rest direct with the cap
        out = torch.full_like(q, float("nan"))
        A.paged_attention_decode(q, k, v, table, sl, 0.088, out=out, validate=False)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, err
    kernel = next(iter(plan.compiled.values()))[0]
    threads = plan.meta["num_warps"] * 32
    own = _occupancy(kernel.function, threads, kernel.metadata.shared)
    capped = _occupancy(kernel.function, threads, plan.min_shared)
    assert capped == A._resident_per_sm(plan.meta["BLOCK_N"], d) <= own, (own, capped)
